"""The rewrite pass: what it inserts, what it removes, what it must keep."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn
from torch.fx import Graph, GraphModule

from sparsify.capture import capture
from sparsify.ops import PBSA_SITE, bind
from sparsify.rewrite import remove_dead_code, rewrite
from sparsify.sites import find_sites


def test_only_chosen_sites_are_rewritten(two_stream, inputs, oracle):
    model = two_stream("sdpa_positional")
    x, ctx = inputs()
    gm = capture(model, (x, ctx)).graph_module
    sites = find_sites(gm)
    kept = sites[1].anchor
    rewrite(gm, sites, {0: bind(keep := oracle())})
    calls = [n for n in gm.graph.nodes if n.target is PBSA_SITE]
    assert len(calls) == 1 and calls[0].meta["nn_module_stack"]  # module stack carried over
    assert kept in gm.graph.nodes
    with torch.no_grad():
        torch.testing.assert_close(gm(x, ctx), model(x, ctx), atol=1e-5, rtol=1e-5)
    assert len(keep.calls) == 1


def test_bad_site_ids(two_stream, inputs, oracle):
    gm = capture(two_stream("sdpa_positional"), inputs()).graph_module
    sites = find_sites(gm)
    with pytest.raises(ValueError, match="no site with index"):
        rewrite(gm, sites, {7: bind(oracle())})


def _graph_with_fresh_write(use_buffer_after: bool) -> tuple[GraphModule, Graph]:
    """x → buf = zeros; buf.add_(x) → (buf used or not)."""
    graph = Graph()
    x = graph.placeholder("x")
    buf = graph.call_function(torch.ops.aten.zeros.default, ([3],))
    graph.call_function(torch.ops.aten.add_.Tensor, (buf, x))
    graph.output(graph.call_function(operator.mul, (buf, 2)) if use_buffer_after else x)
    return GraphModule(nn.Module(), graph), graph


@pytest.mark.parametrize("used", [True, False])
def test_dead_code_keeps_writes_that_are_read_later(used):
    gm, graph = _graph_with_fresh_write(used)
    remove_dead_code(graph)
    gm.recompile()
    targets = [n.target for n in graph.nodes]
    assert (torch.ops.aten.add_.Tensor in targets) == used
    x = torch.ones(3)
    torch.testing.assert_close(gm(x), x * 2 if used else x)


def test_dead_code_keeps_writes_to_inputs():
    graph = Graph()
    x = graph.placeholder("x")
    graph.call_function(torch.ops.aten.add_.Tensor, (x, 1))
    graph.output(None)
    remove_dead_code(graph)
    assert torch.ops.aten.add_.Tensor in [n.target for n in graph.nodes]
