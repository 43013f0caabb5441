"""Gradients to the block scorer while the model trains with sparse attention.

Selection is discrete (top-K of block scores), so the attention output has no gradient with
respect to a ``BlockScorer``. The documented choice here is **distillation**: a training loop
adds ``weight · distillation_loss(scorer, q, k, lse, ...)`` to its loss, the KL divergence
from the dense block attention mass of the layer's real tokens to the scorer's block
distribution (the objective `patterns.train_scorers` optimises offline, here online, on the
q/k of the current step). The target is computed blockwise, key block by key block, from q,
k and a per-row LSE (no [Lq, Lk] mask or score matrix is ever held), and is detached: the
term trains the scorer only and never pulls the model towards its scorer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from patterns.scoring import _block_sum, pool_key_blocks, pool_query_blocks, query_block_rows

__all__ = ["dense_block_mass", "distillation_loss"]

# Key blocks per step of the blockwise pass: bounds the scores held at once to
# B·H·Lq·KV_CHUNK_BLOCKS·kv_block.
KV_CHUNK_BLOCKS = 8


def dense_block_mass(
    q: Tensor, k: Tensor, lse: Tensor, q_block: int, kv_block: int, *, scale: float | None = None
) -> Tensor:
    """Dense attention mass per (query block, key block), float32 (float64 stays)
    ``[B, H, Mq, N]``; each row sums to 1.

    q ``[B, Lq, H, D]``, k ``[B, Lk, Hkv, D]`` (BLHD, contiguous keys; key block n is tokens
    ``[n·kv_block, (n+1)·kv_block)``); lse float ``[B, H, Lq]``: the shift of each row's
    exponentials, ideally the dense LSE; the sparse forward's LSE (a lower bound of it) works
    too, since each row is renormalised over all key blocks. Rows with a non-finite lse
    (they saw nothing) fall back to a shift by their own maximum block.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q, k: expected BLHD [B, L, H, D] tensors, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")  # fmt: skip
    batch, lq, heads, dim = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"k: kv heads ({kv_heads}) must divide q's heads ({heads})")
    if tuple(lse.shape) != (batch, heads, lq):
        raise ValueError(f"lse: expected shape {(batch, heads, lq)}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = heads // kv_heads
    qg = q.to(dtype).reshape(batch, lq, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
    kh = k.to(dtype).permute(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    shift = lse.to(dtype).reshape(batch, kv_heads, group, lq, 1)
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    chunk = KV_CHUNK_BLOCKS * kv_block
    parts = []
    for start in range(0, lk, chunk):
        s = torch.matmul(qg, kh[:, :, None, start : start + chunk].transpose(-1, -2))
        parts.append(_block_sum(torch.exp(s * scale - shift), kv_block, dim=-1))
    per_row = torch.cat(parts, dim=-1)  # [B, Hkv, G, Lq, N]
    per_row = per_row / per_row.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    rows = query_block_rows(lq, q_block, device=q.device).to(dtype)
    mass = _block_sum(per_row, q_block, dim=3) / rows[:, None]
    return mass.reshape(batch, heads, -1, mass.shape[-1])


def distillation_loss(
    scorer: nn.Module,
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    q_block: int,
    kv_block: int,
    *,
    scale: float | None = None,
) -> Tensor:
    """KL(dense block mass ‖ softmax of the scorer's block logits), a 0-dim tensor whose
    gradient reaches only `scorer` (a `patterns.BlockScorer`).

    Arguments as for `dense_block_mass`. Rows are weighted by their token count (a partial
    last query block counts less) and averaged over batch and heads, as in
    `patterns.train_scorers`.
    """
    q, k, lse = q.detach(), k.detach(), lse.detach()
    target = dense_block_mass(q, k, lse, q_block, kv_block, scale=scale)
    logits = scorer.block_logits(pool_query_blocks(q, q_block), pool_key_blocks(k, kv_block))
    log_pred = logits.log_softmax(-1).to(target.dtype)
    kl_rows = (torch.xlogy(target, target) - target * log_pred).sum(-1)  # [B, H, Mq]
    rows = query_block_rows(q.shape[1], q_block, device=q.device).to(target.dtype)
    return (kl_rows * rows).sum(-1).mean() / q.shape[1]
