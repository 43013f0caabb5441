"""Autograd of `sparse_forcing::pbsa_site`: gradcheck through the op, a rewritten model's
gradients against the original's, a compiled training step, and the cached-mode refusal."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patterns import Dense, PersistentLocal, VideoGeometry
from runtime import FullSequenceAttention
from sparsify import sparsify
from sparsify.ops import PBSA_SITE, bind

GEOMETRY = VideoGeometry(8, page_size=4, q_block=4)  # 2 pages per 8-token frame


def _qkv(frames=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = frames * GEOMETRY.tokens_per_frame
    shapes = ((1, n, 4, 8), (1, n, 2, 8), (1, n, 2, 8))
    return tuple(torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes)


@pytest.mark.parametrize("pattern", [Dense(), PersistentLocal(1, 2, local_topk=1)])
def test_gradcheck_through_pbsa_site(pattern):
    attention = FullSequenceAttention(pattern, GEOMETRY, 4, 2, 8, backend="torch").double()
    site = bind(attention)
    assert torch.autograd.gradcheck(
        lambda q, k, v: PBSA_SITE(q, k, v, site), _qkv(), fast_mode=True
    )


def test_site_backward_recomputes_for_tensors_it_did_not_see():
    attention = FullSequenceAttention(PersistentLocal(1, 2, local_topk=1), GEOMETRY, 4, 2, 8)
    q, k, v = (t.detach() for t in _qkv(dtype=torch.float32))
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    out = attention(q, k, v)
    reused = attention.site_backward(q, k, v, out, grad)
    recomputed = attention.site_backward(q.clone(), k.clone(), v.clone(), out, grad)
    for a, b in zip(reused, recomputed, strict=True):
        torch.testing.assert_close(a, b)
    q.add_(1.0)  # an in-place change: the saved table and LSE are stale, so not reused
    changed = attention.site_backward(q, k, v, attention(q.clone(), k, v), grad)
    assert not torch.allclose(changed[0], reused[0])


class TinyVideoBlock(nn.Module):
    """One GQA self-attention (SDPA) with projections over a [B, L, C] token sequence."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, length, 2, self.kv_heads, self.head_dim).unbind(2)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        )
        return x + self.out(out.transpose(1, 2).reshape(b, length, -1))


def _rewritten(pattern):
    torch.manual_seed(0)
    model = TinyVideoBlock()
    x = torch.randn(1, 3 * GEOMETRY.tokens_per_frame, 64)
    module = sparsify(model, (x,), pattern, GEOMETRY, backend="torch", mode="full_sequence")
    assert len(module.plan.rewritten) == 1
    return model, module, x


def test_dense_rewritten_model_has_the_original_gradients():
    model, module, x = _rewritten(Dense())
    for m in (model, module):
        m(x).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    got = {n.removeprefix("graph_module."): p.grad for n, p in module.named_parameters()}
    for name, grad in grads.items():
        torch.testing.assert_close(got[name], grad, atol=1e-5, rtol=1e-5)


def test_compiled_training_step_matches_eager():
    _, module, x = _rewritten(PersistentLocal(1, 2, local_topk=1))
    compiled_module = copy.deepcopy(module)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def make_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)

        def step():
            loss = (m(x) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    eager, compiled = make_step(module), torch.compile(make_step(compiled_module))
    losses = [(eager(), compiled()) for _ in range(2)]
    for a, b in losses:
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert losses[1][0] < losses[0][0]  # it trains
    for a, b in zip(module.parameters(), compiled_module.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_backward_through_a_cached_rollout_step_is_refused():
    from runtime import CausalWanModel, WanConfig

    model = CausalWanModel(WanConfig.preset("tiny", num_kv_heads=2))
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 3, 16, 16, generator=g), torch.randn(1, 8, 32, generator=g)
    timestep = torch.full((1, 3), 500.0)
    module = sparsify(model, (x, timestep, context, 0), Dense(), backend="torch")
    module.reset(1, "cpu", torch.float32, 3)
    out = module(x.requires_grad_(), timestep, context, 0, commit=False)
    with pytest.raises(RuntimeError, match="cached rollout step .* not supported"):
        out.sum().backward()
