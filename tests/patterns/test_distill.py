"""`patterns.distill`: the blockwise dense block mass and the scorer's distillation term."""

import pytest
import torch

import codegen
from patterns import BlockScorer
from patterns.distill import dense_block_mass, distillation_loss
from patterns.scoring import block_attention_mass


def _qk(seed=0, lq=40, lk=72, heads=4, kv_heads=2, dim=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, lq, heads, dim, generator=g), torch.randn(
        1, lk, kv_heads, dim, generator=g
    )


def _sparse_lse(q, k, q_block=16, kv_block=8):
    """The LSE of a sparse pass over the first two key blocks only (a lower bound)."""
    mq = -(-q.shape[1] // q_block)
    counts = torch.full((1, q.shape[2], mq), 2, dtype=torch.int32)
    idx = torch.tensor([0, 1], dtype=torch.int32).expand(1, q.shape[2], mq, 2).contiguous()
    _, lse = codegen.pbsa_attention(
        q, k, k, counts, idx, q_block=q_block, page_size=kv_block, backend="torch"
    )
    return lse


def test_mass_equals_the_dense_softmax_mass_for_any_lse_shift():
    q, k = _qk()
    expected = block_attention_mass(q, k, 16, 8)
    b, lq, h, _ = q.shape
    dense_lse = torch.logsumexp(
        torch.einsum("blhd,bmhd->bhlm", q, k.repeat_interleave(2, dim=2)) / 4.0, dim=-1
    )
    for lse in (dense_lse, _sparse_lse(q, k), torch.full((b, h, lq), float("-inf"))):
        got = dense_block_mass(q, k, lse, 16, 8)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_loss_is_zero_only_at_the_target_and_trains_only_the_scorer():
    q, k = _qk(seed=1)
    q.requires_grad_()
    scorer = BlockScorer(4, 2, 16)
    lse = _sparse_lse(q, k)
    loss = distillation_loss(scorer, q, k, lse, 16, 8)
    assert loss > 0
    loss.backward()
    assert q.grad is None and scorer.wq.grad.abs().sum() > 0
    opt = torch.optim.Adam(scorer.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        step = distillation_loss(scorer, q, k, lse, 16, 8)
        step.backward()
        opt.step()
    assert distillation_loss(scorer, q, k, lse, 16, 8) < 0.8 * loss


def test_bad_lse_shape_is_named():
    q, k = _qk()
    with pytest.raises(ValueError, match="lse: expected shape"):
        dense_block_mass(q, k, torch.zeros(1, 4, 3), 16, 8)
