"""Fused attention forms: SDPA (every graph spelling), flex_attention, flash-attn custom ops."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import Graph, GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sparsify.capture import capture
from sparsify.ops import bind
from sparsify.rewrite import rewrite
from sparsify.sites import find_sites
from sparsify.sites.fx import module_path
from sparsify.sites.records import layout_name

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

FUSED = ["sdpa_positional", "sdpa_keyword_scaled", "sdpa_gqa"]


@pytest.mark.parametrize("method", ["torch.export", "dynamo", "fx.symbolic_trace"])
@pytest.mark.parametrize("name", FUSED)
def test_sdpa_spellings(name, method, two_stream, inputs, rewrite_sites, scales):
    model = two_stream(name)
    x, ctx = inputs()
    gm, sites, verdicts, reasons, oracles = rewrite_sites(model, (x, ctx), (method,))
    assert [s.form for s in sites] == ["sdpa", "sdpa"]
    assert [verdicts[s.index].kind for s in sites] == ["self", "cross"]
    assert sites[0].layout == "BHLD"
    assert sites[0].module_path == "self_attn.attn"
    assert sites[1].module_path == "cross_attn.attn"
    heads, kv_heads = (4, 2) if name == "sdpa_gqa" else (2, 2)
    assert sites[0].q_shape == (2, 12, heads, 16)
    assert sites[0].k_shape == (2, 12, kv_heads, 16)
    assert sites[0].effective_scale() == pytest.approx(scales.get(name, 0.25))
    assert reasons[1] is not None and "cross" in reasons[1]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, ctx), model(x, ctx), atol=1e-5, rtol=1e-5)
    assert oracles[0].calls[0][1] == (2, 12, kv_heads, 16)


def _hand_built(target, names: list[str], extra_args: tuple, shapes, tuple_output: bool):
    """placeholders → target(*placeholders, *extra_args) [→ getitem 0] → output."""
    graph = Graph()
    inputs = [graph.placeholder(n) for n in names]
    node = graph.call_function(target, (*inputs, *extra_args))
    out = graph.call_function(operator.getitem, (node, 0)) if tuple_output else node
    graph.output(out)
    gm = GraphModule(nn.Module(), graph)
    values = [torch.randn(s) for s in shapes]
    FakeTensorProp(gm).propagate(*values)
    return gm, values


def test_post_dispatch_sdpa_with_getitem():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    shapes = [(1, 2, 6, 16)] * 3
    gm, (q, k, v) = _hand_built(op, ["q", "k", "v"], (0.0, False), shapes, tuple_output=True)
    (site,) = find_sites(gm)
    assert site.form == "sdpa_post_dispatch"
    assert site.layout == "BHLD" and site.q_shape == (1, 6, 2, 16)
    assert site.unsupported is None
    expected = F.scaled_dot_product_attention(q, k, v)
    oracle = _Oracle()
    rewrite(gm, [site], {site.index: bind(oracle)})
    assert not any(n.target is op for n in gm.graph.nodes)
    torch.testing.assert_close(gm(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_post_dispatch_sdpa_with_used_lse_is_unsupported():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    graph = Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    node = graph.call_function(op, (q, k, v))
    graph.output((graph.call_function(operator.getitem, (node, 0)),
                  graph.call_function(operator.getitem, (node, 1))))  # fmt: skip
    gm = GraphModule(nn.Module(), graph)
    FakeTensorProp(gm).propagate(*(torch.randn(1, 2, 6, 16) for _ in range(3)))
    (site,) = find_sites(gm)
    assert "log-sum-exp" in site.unsupported


class _Oracle(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v)


# -- flash-attn: ops of those namespaces cannot run here; register stand-ins by name. ----------


def _flash_forward(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """BLHD attention and a (dummy) log-sum-exp, like flash_attn's forward."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale,
        is_causal=causal, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), q.new_zeros(q.shape[0], q.shape[2], q.shape[1])


def _flash_fake(q, k, v, *rest):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1])


FLASH_OPS = {}
for _name in (
    "flash_attn::_sf_test_forward",
    "flashattn::sf_test_fwd",
    "flash_attn_3::sf_test_fwd",
):
    _op = torch.library.custom_op(_name, _flash_forward, mutates_args=())
    _op.register_fake(_flash_fake)
    FLASH_OPS[_name] = getattr(
        getattr(torch.ops, _name.split("::")[0]), _name.split("::")[1]
    ).default


@pytest.mark.parametrize("qualname", sorted(FLASH_OPS))
def test_flash_attn_ops_on_a_hand_built_graph(qualname):
    op = FLASH_OPS[qualname]
    shapes = [(1, 6, 4, 16), (1, 6, 2, 16), (1, 6, 2, 16)]  # BLHD, GQA
    gm, (q, k, v) = _hand_built(op, ["q", "k", "v"], (0.0, 0.3, False, -1, -1), shapes, True)
    (site,) = find_sites(gm)
    assert site.form == "flash_attn" and site.op == qualname
    assert site.layout == "BLHD"
    assert site.q_shape == (1, 6, 4, 16) and site.k_shape == (1, 6, 2, 16)
    assert site.scale == pytest.approx(0.3) and not site.causal and site.unsupported is None


@pytest.mark.parametrize(
    ("extra", "reason"),
    [((0.0, 0.25, True, -1, -1), None), ((0.0, 0.25, False, 2, 2), "sliding window")],
)
def test_flash_attn_causal_and_window(extra, reason):
    op = FLASH_OPS["flash_attn::_sf_test_forward"]
    gm, _ = _hand_built(op, ["q", "k", "v"], extra, [(1, 6, 2, 16)] * 3, True)
    (site,) = find_sites(gm)
    assert site.causal == extra[2]
    assert (site.unsupported is None) if reason is None else (reason in site.unsupported)


def flash_spelling(q, k, v):
    return FLASH_OPS["flash_attn::_sf_test_forward"](q, k, v, 0.0, 0.3, False, -1, -1)[0]


def test_flash_attn_in_a_model_is_rewritten_exactly(two_stream, inputs, rewrite_sites):
    model = two_stream(flash_spelling)
    x, ctx = inputs()
    gm, sites, verdicts, reasons, oracles = rewrite_sites(model, (x, ctx))
    assert [(s.form, verdicts[s.index].kind) for s in sites] == [
        ("flash_attn", "self"),
        ("flash_attn", "cross"),
    ]
    op = FLASH_OPS["flash_attn::_sf_test_forward"]
    assert sum(n.target is op for n in gm.graph.nodes) == 1  # the cross-attention's
    with torch.no_grad():
        torch.testing.assert_close(gm(x, ctx), model(x, ctx), atol=1e-5, rtol=1e-5)


# -- flex_attention ---------------------------------------------------------------------------


def test_flex_plain_is_rewritten_exactly(two_stream, inputs, rewrite_sites):
    model = two_stream("flex_plain")
    x, ctx = inputs()
    with torch.no_grad():
        expected = model(x, ctx)
    gm, sites, verdicts, reasons, oracles = rewrite_sites(model, (x, ctx))
    assert [s.form for s in sites] == ["flex", "flex"]
    assert sites[0].mask is None and sites[0].unsupported is None
    assert reasons[0] is None
    # the rewritten site's block-mask construction (a vmap region) is gone with the op
    flex = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.flex_attention]
    assert len(flex) == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(x, ctx), expected, atol=1e-5, rtol=1e-5)


class FlexVariants(nn.Module):
    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant

    def forward(self, q, k, v):
        if self.variant == "score_mod":
            return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: s + (i - j))
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, 8, 8, device="cpu")
        return flex_attention(q, k, v, block_mask=mask)


@pytest.mark.parametrize("variant", ["score_mod", "block_mask"])
def test_flex_with_score_mod_or_block_mask_is_flagged(variant):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    (site,) = find_sites(capture(FlexVariants(variant), (q, k, v)).graph_module)
    if variant == "score_mod":
        assert "score_mod" in site.unsupported
    else:
        assert site.mask == "flex block_mask" and site.unsupported is None


# -- SDPA arguments -----------------------------------------------------------------------------


class SdpaArgs(nn.Module):
    def forward(self, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        c = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        return a + b + c


def test_sdpa_mask_causal_dropout_are_recorded():
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    mask = torch.rand(6, 6) > 0.5
    a, b, c = find_sites(capture(SdpaArgs(), (q, k, v, mask)).graph_module)
    assert a.mask is not None and not a.causal and a.dropout == 0.0
    assert b.mask is None and b.causal
    assert c.dropout == pytest.approx(0.2)


def test_layout_names_and_module_paths():
    assert layout_name((0, 1, 2, 3)) == "BHLD"
    assert layout_name((0, 2, 1, 3)) == "BLHD"
    assert layout_name((0, 1, 2)) == "(B·H)LD"

    class Node:
        def __init__(self, path):
            self.meta = {"nn_module_stack": {"k": (path, nn.Module)}}

    assert module_path(Node("L['self'].blocks[3].attn1")) == "blocks.3.attn1"
    assert module_path(Node("blocks.3.self_attn.attn")) == "blocks.3.self_attn.attn"
    assert module_path(Node("L['self']._modules['blocks']._modules['0'].attn")) == "blocks.0.attn"
