"""The unfused-attention matcher (networkx view + VF2 patterns) on many spellings and graphs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsify.capture import capture
from sparsify.sites import find_sites
from sparsify.sites.unfused import graph_view, match_chains

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
    """softmax(x·Wᵀ) over a non-key dim, then a matmul: not attention, but listed with why."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        scores = x @ self.w
        return scores.softmax(dim=1) @ self.w


def test_softmax_over_other_dim_is_listed_but_not_attention():
    gm = capture(ScoresOnly(), (torch.randn(2, 4, 8),)).graph_module
    (site,) = find_sites(gm)
    assert site.q is None and "not over the last dimension" in site.unsupported


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


def _to_layout(t, layout: str):
    """BLHD tensor permuted to `layout` (a permutation of "blhd")."""
    return t.permute(*("blhd".index(c) for c in layout))


class AnyLayout(nn.Module):
    """Self-attention whose q, k, v, scores and output are einsum'd in arbitrary layouts."""

    def __init__(self, heads, groups, dim, layouts, scale):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.groups, self.dim = heads, groups, dim
        self.qkv = nn.Linear(32, (heads + 2 * (heads // groups)) * dim)
        self.layouts, self.scale = layouts, scale

    def forward(self, x):
        b, n, _ = x.shape
        kv_heads = self.heads // self.groups
        q, k, v = self.qkv(x).split(
            [self.heads * self.dim, kv_heads * self.dim, kv_heads * self.dim], -1
        )
        q, k, v = (t.view(b, n, -1, self.dim) for t in (q, k, v))  # BLHD
        k, v = (t.repeat_interleave(self.groups, dim=2) for t in (k, v))
        lq, lk, lv, lo = self.layouts
        q, k, v = (_to_layout(t, lay) for t, lay in zip((q, k, v), (lq, lk, lv), strict=True))
        kl, vl = lk.replace("l", "m"), lv.replace("l", "m")
        scores = torch.einsum(f"{lq},{kl}->bhlm", q, k) * self.scale
        out = torch.einsum(f"bhlm,{vl}->{lo}", scores.softmax(-1), v)
        return out.permute(*(lo.index(c) for c in "blhd")).flatten(2)


@given(
    heads=st.sampled_from([2, 4]),
    groups=st.sampled_from([1, 2]),
    dim=st.sampled_from([16, 32]),
    length=st.integers(3, 9),
    layouts=st.tuples(*[st.permutations("blhd").map("".join)] * 4),
    scale=st.floats(0.05, 1.0),
)
def test_any_layout_is_normalised_and_rewritten_exactly(
    heads, groups, dim, length, layouts, scale, rewrite_sites
):
    model = AnyLayout(heads, groups, dim, layouts, scale).eval()
    x = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(length))
    gm, sites, verdicts, reasons, oracles = rewrite_sites(model, (x,), ("fx.symbolic_trace",))
    (site,) = sites
    assert reasons[0] is None
    assert site.q_shape == (2, length, heads, dim)
    assert site.k_shape == (2, length, heads // groups, dim)  # GQA not expanded
    assert site.effective_scale() == pytest.approx(scale)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
