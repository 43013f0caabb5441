"""Unfused spellings beyond the common ones: baddbmm scores, learned temperatures (a 0-dim
buffer, one value per head) and softmaxes that look like attention but match no pattern."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from sparsify.capture import capture
from sparsify.sites import find_sites

METHODS = ["torch.export", "dynamo", "fx.symbolic_trace"]


def _merged(*ts: Tensor) -> list[Tensor]:
    """BLHD → [B·H, L, D]."""
    b, _, h, d = ts[0].shape
    return [t.permute(0, 2, 1, 3).reshape(b * h, t.shape[1], d) for t in ts]


def baddbmm_scores(q, k, v):
    b, length, h, d = q.shape
    qm, km, vm = _merged(q, k, v)
    bias = qm.new_zeros((b * h, length, km.shape[1])) + float("nan")  # ignored: beta=0
    scores = torch.baddbmm(bias, qm, km.transpose(1, 2), beta=0, alpha=0.3)
    return torch.bmm(scores.softmax(-1), vm).view(b, h, length, d).transpose(1, 2)


def baddbmm_biased(q, k, v):
    b, length, h, d = q.shape
    qm, km, vm = _merged(q, k, v)
    bias = torch.ones_like(qm[:, :, :1]) * qm[:, :, :1]  # depends on the input: a dense bias
    scores = torch.baddbmm(bias.expand(-1, -1, km.shape[1]), qm, km.transpose(1, 2), alpha=0.25)
    return torch.bmm(scores.softmax(-1), vm).view(b, h, length, d).transpose(1, 2)


@pytest.mark.parametrize("method", METHODS)
def test_baddbmm_scores_are_found_and_rewritten_exactly(method, two_stream, inputs, rewrite_sites):
    model = two_stream(baddbmm_scores)
    x, ctx = inputs()
    gm, sites, verdicts, reasons, oracles = rewrite_sites(model, (x, ctx), (method,))
    assert [s.form for s in sites] == ["unfused", "unfused"]
    assert [verdicts[s.index].kind for s in sites] == ["self", "cross"]
    assert sites[0].effective_scale() == pytest.approx(0.3)
    assert list(oracles) == [0]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, ctx), model(x, ctx), atol=1e-5, rtol=1e-5)


def test_baddbmm_with_a_bias_is_kept_as_masked(two_stream, inputs, rewrite_sites):
    x, ctx = inputs()
    _, sites, _, reasons, oracles = rewrite_sites(two_stream(baddbmm_biased), (x, ctx))
    assert len(sites) == 2 and oracles == {}
    assert "attn_mask" in reasons[0]


class Temperature(nn.Module):
    """Self-attention whose scores are scaled by module state of shape `shape`."""

    def __init__(self, shape: tuple[int, ...], divide: bool = False, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.divide = heads, divide
        self.qkv = nn.Linear(32, 3 * heads * 16)
        self.register_buffer("temperature", torch.rand(shape) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, 16).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        scores = scores / self.temperature if self.divide else scores * self.temperature
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape, divide", [((), False), ((), True), ((2, 1, 1), False), ((1, 2, 1, 1), True)]
)
def test_learned_temperature_is_folded_into_q_and_read_at_run_time(
    shape, divide, method, rewrite_sites
):
    model = Temperature(shape, divide).eval()
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    gm, sites, _, reasons, oracles = rewrite_sites(model, (x,), (method,))
    (site,) = sites
    assert reasons[0] is None and list(oracles) == [0]
    assert [f.per_head for f in site.scale_factors] == [len(shape) > 0]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)
        # The graph shares the buffer's storage: a new temperature reaches both.
        model.temperature.mul_(3.0)
        torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_temperature_per_key_is_kept_with_a_reason(rewrite_sites):
    model = Temperature((1, 1, 1, 12)).eval()
    _, sites, _, reasons, oracles = rewrite_sites(model, (torch.randn(2, 12, 32),))
    assert len(sites) == 1 and oracles == {}
    assert "neither one value nor one per head" in reasons[0]


class SoftCapped(nn.Module):
    """Logit soft-capping (tanh) between the products: attention no pattern matches."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = torch.tanh((q @ k.transpose(-1, -2)) / 30.0) * 30.0
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("method", METHODS)
def test_unmatched_softmax_between_products_is_a_site_with_a_reason(method):
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    (site,) = find_sites(capture(SoftCapped(), (q, k, v), methods=(method,)).graph_module)
    assert site.q is None
    assert "looks like attention" in site.unsupported and "tanh" in site.unsupported
