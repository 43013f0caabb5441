"""Gather-based PBSA in plain torch: the CPU default and the fallback on any device.

Per (batch, head, query block) the listed pages are gathered into one
[Kmax·page, D] key/value slab, padding slots and invalid tokens are masked, and one softmax
runs over the slab. Query blocks are processed in chunks sized to a memory budget, so the only
Python loop is over chunks, never over blocks or heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from codegen.problem import Problem, check_table_values

# Bytes of float32 intermediates (gathered K and V plus scores) allowed per chunk.
_CHUNK_BYTES = 1 << 28


def _chunk_size(p: Problem) -> int:
    slab = p.max_blocks * p.page_size
    per_block = p.batch * p.heads * slab * (2 * p.head_dim + p.q_block) * 4
    return max(1, _CHUNK_BYTES // max(per_block, 1))


def pbsa_torch(p: Problem, return_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """out in q's layout and dtype; lse float32 [B, H, Lq] (-inf, out 0 where nothing visible).

    Differentiable in q, k and v by autograd (the reference of the backward kernels).
    float64 inputs are computed, and their lse returned, in float64 (for gradcheck).
    """
    check_table_values(p)
    acc = torch.float64 if p.q.dtype == torch.float64 else torch.float32
    k_pool, v_pool, page_lens = p.paged_kv()
    q = p.q_bhld()
    mq, qb, page, kmax = p.num_q_blocks, p.q_block, p.page_size, p.max_blocks
    pad_rows = mq * qb - p.q_len
    q = torch.nn.functional.pad(q, (0, 0, 0, pad_rows))
    q = q.reshape(p.batch, p.heads, mq, qb, p.head_dim)

    out = torch.empty(p.batch, p.heads, mq, qb, p.head_dim, dtype=acc, device=q.device)
    lse = torch.empty(p.batch, p.heads, mq, qb, dtype=acc, device=q.device)
    b_idx = torch.arange(p.batch, device=q.device).view(-1, 1, 1, 1)
    g_idx = (torch.arange(p.heads, device=q.device) // p.group).view(1, -1, 1, 1)
    slots = torch.arange(kmax, device=q.device)
    tokens = torch.arange(page, device=q.device)

    step = _chunk_size(p)
    for m0 in range(0, mq, step):
        m1 = min(mq, m0 + step)
        counts = p.kv_num_blocks[:, :, m0:m1]
        listed = slots < counts.unsqueeze(-1)  # [B, H, mc, Kmax]
        # Padding slots may hold anything: point them at page 0 and mask them below.
        idx = torch.where(listed, p.kv_indices[:, :, m0:m1], 0).long()
        k = k_pool[b_idx, g_idx, idx].to(acc)  # [B, H, mc, Kmax, page, D]
        v = v_pool[b_idx, g_idx, idx].to(acc)
        valid = listed.unsqueeze(-1) & (tokens < page_lens[b_idx, g_idx, idx].unsqueeze(-1))
        shape = (p.batch, p.heads, m1 - m0, kmax * page)
        k, v = k.reshape(*shape, p.head_dim), v.reshape(*shape, p.head_dim)
        valid = valid.reshape(shape)

        s = torch.matmul(q[:, :, m0:m1].to(acc), k.transpose(-1, -2)) * p.scale
        s = s.masked_fill(~valid.unsqueeze(-2), float("-inf"))
        # Shift by the row max as the kernel does: exp(s - max) is exact for tied logits at
        # any magnitude, where exp(s - lse) would carry lse's rounding (an ulp of 1 at 1e7).
        # Empty rows (max -inf) shift by 0, so exp(-inf) = 0 rather than NaN.
        # The shift cancels in out and lse, so it is a constant for autograd (detached: no
        # gradient through amax's ties).
        top = s.detach().amax(dim=-1, keepdim=True)
        top = torch.where(torch.isinf(top), 0.0, top)
        probs = torch.exp(s - top)
        total = probs.sum(dim=-1, keepdim=True)
        out[:, :, m0:m1] = torch.matmul(probs, v) / torch.where(total > 0, total, 1.0)
        lse[:, :, m0:m1] = (top + torch.log(total)).squeeze(-1)  # -inf where total is 0

    out = out.reshape(p.batch, p.heads, mq * qb, p.head_dim)[:, :, : p.q_len].to(p.q.dtype)
    if p.layout == "BLHD":
        out = out.transpose(1, 2)
    lse = lse.reshape(p.batch, p.heads, mq * qb)[:, :, : p.q_len].contiguous()
    return out.contiguous(), (lse if return_lse else None)
