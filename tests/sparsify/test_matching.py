"""The unfused-attention matcher (networkx view + VF2 patterns) on many spellings and graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsify.capture import capture
from sparsify.matching import find_sites, find_unfused, graph_view, match_chains

UNFUSED = ["matmul_permute", "einsum_blhd", "bmm_prescaled", "matmul_gqa_repeat"]
METHODS = ["torch.export", "dynamo", "fx.symbolic_trace"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", UNFUSED)
def test_unfused_spellings_found_and_rewritten_exactly(
    name, method, two_stream, inputs, rewrite_sites, scales
):
    model = two_stream(name)
    x, ctx = inputs()
    gm, sites, verdicts, reasons, oracles = rewrite_sites(model, (x, ctx), (method,))
    assert [s.form for s in sites] == ["unfused", "unfused"]
    assert [verdicts[s.index].kind for s in sites] == ["self", "cross"]
    self_site = sites[0]
    heads, kv_heads = (4, 2) if name == "matmul_gqa_repeat" else (2, 2)
    assert self_site.q_shape == (2, 12, heads, 16)
    assert self_site.k_shape == self_site.v_shape == (2, 12, kv_heads, 16)
    assert sites[1].k_shape == (2, 5, kv_heads, 16)
    assert self_site.effective_scale() == pytest.approx(scales.get(name, 16**-0.5))
    assert list(oracles) == [0]
    with torch.no_grad():
        expected, got = model(x, ctx), gm(x, ctx)
    # The oracle saw Hkv heads (no GQA expansion) exactly once.
    assert oracles[0].calls == [((2, 12, heads, 16), (2, 12, kv_heads, 16), (2, 12, kv_heads, 16))]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_matched_chain_shape_and_view(two_stream, inputs):
    gm = capture(two_stream("einsum_blhd"), inputs()).graph_module
    view = graph_view(gm)
    kinds = {n: d["kind"] for n, d in view.graph.nodes(data=True)}
    # casts and views are contracted away: only roles remain in the networkx view
    assert set(kinds.values()) <= {"matmul", "softmax", "scale", "mask", "dropout"}
    chains = list(match_chains(view))
    assert len(chains) == 2
    assert [kinds[n] for n in chains[0]] == ["matmul", "scale", "softmax", "matmul"]


class ScoresOnly(nn.Module):
    """softmax(x·Wᵀ) over a non-key dim, then a matmul: not attention."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        scores = x @ self.w
        return scores.softmax(dim=1) @ self.w


def test_softmax_over_other_dim_is_not_attention():
    gm = capture(ScoresOnly(), (torch.randn(2, 4, 8),)).graph_module
    assert list(find_unfused(gm)) == []
    assert find_sites(gm) == []


class Leaky(nn.Module):
    """Attention that also returns its probabilities."""

    def forward(self, q, k, v):
        probs = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
        return probs @ v, probs


def test_probabilities_used_elsewhere_are_unsupported():
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    (site,) = find_sites(capture(Leaky(), (q, k, v)).graph_module)
    assert site.unsupported and "used outside the attention" in site.unsupported


class MaskedDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)) * 0.25
        scores = scores.masked_fill(~mask, float("-inf"))
        return self.drop(F.softmax(scores, dim=-1)) @ v


@pytest.mark.parametrize("method", METHODS)
def test_mask_and_dropout_are_recorded(method):
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    mask = torch.rand(6, 6) > 0.3
    model = MaskedDropout(0.1).train()
    (site,) = find_sites(capture(model, (q, k, v, mask), methods=(method,)).graph_module)
    assert site.mask is not None
    assert site.dropout == pytest.approx(0.1)
    assert site.scale == pytest.approx(0.25)
    model.eval()
    (site,) = find_sites(capture(model, (q, k, v, mask), methods=(method,)).graph_module)
    assert site.dropout == 0.0


class AddedBias(nn.Module):
    def forward(self, q, k, v, bias):
        return torch.softmax(torch.matmul(q, k.mT) / math.sqrt(16) + bias, -1) @ v


def test_additive_mask_is_recorded():
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    bias = torch.randn(1, 1, 6, 6)
    (site,) = find_sites(capture(AddedBias(), (q, k, v, bias)).graph_module)
    assert site.mask is not None and site.mask.name == "bias"
    assert site.scale == pytest.approx(0.25)


class Headless(nn.Module):
    """3-D attention on inputs that were never 4-D: no head split to recover."""

    def forward(self, q, k, v):
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)


def test_three_d_attention_without_heads_is_unsupported():
    q, k, v = (torch.randn(4, 6, 16) for _ in range(3))
    (site,) = find_sites(capture(Headless(), (q, k, v)).graph_module)
    assert site.q is None
    assert "head split" in site.unsupported
