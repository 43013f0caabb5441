"""Small attention models in every spelling of ATTENTION_FORMS, and a float64 oracle.

`TwoStream` self-attends over x then cross-attends to a context, both through one spelling
(a function of BLHD q, k, v). Test files cannot import this module (importlib mode), so it is
reached through the fixtures at the bottom.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention

from sparsify.capture import capture
from sparsify.classify import classify, keep_reason
from sparsify.ops import bind
from sparsify.rewrite import rewrite
from sparsify.sites import find_sites


def _bhld(*ts: Tensor) -> list[Tensor]:
    return [t.transpose(1, 2) for t in ts]


def sdpa_positional(q, k, v):
    return F.scaled_dot_product_attention(*_bhld(q, k, v)).transpose(1, 2)


def sdpa_keyword_scaled(q, k, v):
    qh, kh, vh = _bhld(q, k, v)
    out = F.scaled_dot_product_attention(query=qh, key=kh, value=vh, scale=0.3)
    return out.transpose(1, 2)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(*_bhld(q, k, v), enable_gqa=True).transpose(1, 2)


def matmul_permute(q, k, v):
    qh, vh = _bhld(q, v)
    scores = (qh @ k.permute(0, 2, 3, 1)) * q.shape[-1] ** -0.5
    return (scores.softmax(-1) @ vh).transpose(1, 2)


def einsum_blhd(q, k, v):
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / 3.0  # not the default 1/√D
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.einsum("bhlm,bmhd->blhd", probs, v)


def bmm_prescaled(q, k, v):
    b, length, h, d = q.shape
    merge = [t.permute(0, 2, 1, 3).reshape(b * h, t.shape[1], d) for t in (q, k, v)]
    qm, km, vm = merge
    probs = F.softmax(torch.bmm(qm * d**-0.5, km.mT), dim=-1)
    return torch.bmm(probs, vm).view(b, h, length, d).transpose(1, 2)


def matmul_gqa_repeat(q, k, v):
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    probs = torch.matmul(qh, kh.transpose(-1, -2)).div(math.sqrt(q.shape[-1])).softmax(dim=-1)
    return torch.matmul(probs, vh).to(q.dtype).transpose(1, 2)


def flex_plain(q, k, v):
    return flex_attention(*_bhld(q, k, v)).transpose(1, 2)


SPELLINGS = {
    "sdpa_positional": sdpa_positional,
    "sdpa_keyword_scaled": sdpa_keyword_scaled,
    "sdpa_gqa": sdpa_gqa,
    "matmul_permute": matmul_permute,
    "einsum_blhd": einsum_blhd,
    "bmm_prescaled": bmm_prescaled,
    "matmul_gqa_repeat": matmul_gqa_repeat,
    "flex_plain": flex_plain,
}
GQA = {"sdpa_gqa", "matmul_gqa_repeat"}
SCALES = {"sdpa_keyword_scaled": 0.3, "einsum_blhd": 1 / 3}


class Attend(nn.Module):
    """Holds a spelling so that it runs under a named module (self_attn / cross_attn)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.fn(q, k, v)


class Projections(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, fn):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.attn = Attend(fn)

    def forward(self, x: Tensor, source: Tensor) -> Tensor:
        b, n, m = x.shape[0], x.shape[1], source.shape[1]
        q = self.q(x).view(b, n, self.heads, -1)
        k = self.k(source).view(b, m, self.kv_heads, -1)
        v = self.v(source).view(b, m, self.kv_heads, -1)
        return self.o(self.attn(q, k, v).flatten(2))


class TwoStream(nn.Module):
    """x [B, L, dim] → self-attention → cross-attention to context [B, Lc, dim]."""

    def __init__(self, fn, dim=32, heads=2, kv_heads=2, head_dim=16, names=("self", "cross")):
        super().__init__()
        torch.manual_seed(0)
        self.names = names
        self.add_module(f"{names[0]}_attn", Projections(dim, heads, kv_heads, head_dim, fn))
        self.add_module(f"{names[1]}_attn", Projections(dim, heads, kv_heads, head_dim, fn))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        first, second = (getattr(self, f"{n}_attn") for n in self.names)
        x = x + first(x, x)
        return x + second(x, context)


class Oracle(nn.Module):
    """float64 softmax(q·kᵀ/√D)·v on BLHD inputs (GQA by head groups); records shapes."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], ...]] = []

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self.calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        groups = q.shape[2] // k.shape[2]
        k, v = (t.double().repeat_interleave(groups, dim=2) for t in (k, v))
        scores = torch.einsum("blhd,bmhd->bhlm", q.double(), k) / math.sqrt(q.shape[-1])
        return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).to(q.dtype)


def rewrite_self_sites(model, inputs, methods=("torch.export",)):
    """Capture, find, classify; rewrite every rewritable site to an `Oracle`.

    Returns (graph module, sites, verdicts, reasons, oracles by site index).
    """
    captured = capture(model, inputs, methods=methods)
    gm = captured.graph_module
    sites = find_sites(gm)
    verdicts = {s.index: classify(s, sites, gm) for s in sites if s.q is not None}
    reasons = {s.index: keep_reason(s, verdicts.get(s.index)) for s in sites}
    oracles = {i: Oracle() for i, r in reasons.items() if r is None}
    rewrite(gm, sites, {i: bind(o) for i, o in oracles.items()})
    return gm, sites, verdicts, reasons, oracles


def two_stream_inputs(length: int = 12, context: int = 5, dim: int = 32) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, length, dim, generator=generator),
        torch.randn(2, context, dim, generator=generator),
    )


@pytest.fixture(scope="session")
def spellings():
    return SPELLINGS


@pytest.fixture(scope="session")
def two_stream():
    """factory(spelling name or function, **kwargs) → TwoStream in eval mode (GQA spellings:
    4 query heads, 2 kv heads)."""

    def make(spelling, **kwargs) -> TwoStream:
        if spelling in GQA:
            kwargs = {"heads": 4, "kv_heads": 2, **kwargs}
        fn = spelling if callable(spelling) else SPELLINGS[spelling]
        return TwoStream(fn, **kwargs).eval()

    return make


@pytest.fixture(scope="session")
def inputs():
    return two_stream_inputs


@pytest.fixture(scope="session")
def rewrite_sites():
    return rewrite_self_sites


@pytest.fixture(scope="session")
def oracle():
    return Oracle


@pytest.fixture(scope="session")
def scales():
    return SCALES
