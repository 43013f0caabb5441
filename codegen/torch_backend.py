"""Gather-based PBSA in plain torch: the CPU default and the fallback on any device.

Per (batch, head, query block) the listed pages are gathered into one
[Kmax·page, D] key/value slab, padding slots and invalid tokens are masked, and one softmax
runs over the slab. Query blocks are processed in chunks sized to a memory budget, so the only
Python loop is over chunks, never over blocks or heads. The backward (`pbsa_torch_backward`)
recomputes the probabilities from the saved LSE over the same slabs and scatter-adds the
slabs' dK/dV into the pools.
"""

from __future__ import annotations

import torch
from torch import Tensor

from codegen.problem import Problem, check_table_values

# Bytes of float32 intermediates (gathered K and V plus scores) allowed per chunk.
_CHUNK_BYTES = 1 << 28


def _chunk_size(p: Problem, slabs: int = 2, scores: int = 1) -> int:
    """Query blocks per chunk with `slabs` [slab, D] and `scores` [q_block, slab] float32
    intermediates per block."""
    slab = p.max_blocks * p.page_size
    per_block = p.batch * p.heads * slab * (slabs * p.head_dim + scores * p.q_block) * 4
    return max(1, _CHUNK_BYTES // max(per_block, 1))


def _acc(p: Problem) -> torch.dtype:
    """The compute dtype: float64 for float64 inputs (gradcheck), float32 otherwise."""
    return torch.float64 if p.q.dtype == torch.float64 else torch.float32


def _gather(
    p: Problem, pools: tuple[Tensor, Tensor, Tensor], m0: int, m1: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Query blocks m0..m1's slabs: k, v [B, H, mc, Kmax·page, D] in the compute dtype, their
    validity [B, H, mc, Kmax·page] and the gathered page ids [B, H, mc, Kmax] (0 in padding
    slots)."""
    k_pool, v_pool, page_lens = pools
    dev = p.q.device
    b_idx = torch.arange(p.batch, device=dev).view(-1, 1, 1, 1)
    g_idx = (torch.arange(p.heads, device=dev) // p.group).view(1, -1, 1, 1)
    counts = p.kv_num_blocks[:, :, m0:m1]
    listed = torch.arange(p.max_blocks, device=dev) < counts.unsqueeze(-1)  # [B, H, mc, Kmax]
    # Padding slots may hold anything: point them at page 0 and mask them.
    idx = torch.where(listed, p.kv_indices[:, :, m0:m1], 0).long()
    k = k_pool[b_idx, g_idx, idx].to(_acc(p))  # [B, H, mc, Kmax, page, D]
    v = v_pool[b_idx, g_idx, idx].to(_acc(p))
    tokens = torch.arange(p.page_size, device=dev)
    valid = listed.unsqueeze(-1) & (tokens < page_lens[b_idx, g_idx, idx].unsqueeze(-1))
    shape = (p.batch, p.heads, m1 - m0, p.max_blocks * p.page_size)
    return k.reshape(*shape, p.head_dim), v.reshape(*shape, p.head_dim), valid.reshape(shape), idx


def _blocks(p: Problem, t: Tensor) -> Tensor:
    """A q-shaped tensor as [B, H, Mq, q_block, D] in the compute dtype, zero-padded past Lq."""
    t = t if p.layout == "BHLD" else t.transpose(1, 2)
    t = torch.nn.functional.pad(t.to(_acc(p)), (0, 0, 0, p.num_q_blocks * p.q_block - p.q_len))
    return t.reshape(p.batch, p.heads, p.num_q_blocks, p.q_block, p.head_dim)


def _unblock(p: Problem, t: Tensor) -> Tensor:
    """[B, H, Mq, q_block, D] back to q's shape and layout (contiguous, q's dtype)."""
    t = t.reshape(p.batch, p.heads, -1, p.head_dim)[:, :, : p.q_len].to(p.q.dtype)
    return (t if p.layout == "BHLD" else t.transpose(1, 2)).contiguous()


def pbsa_torch(p: Problem, return_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """out in q's layout and dtype; lse float32 [B, H, Lq] (-inf, out 0 where nothing visible).

    Differentiable in q, k and v by autograd (the reference of the backward kernels);
    float64 inputs are computed, and their lse returned, in float64 (for gradcheck).
    """
    check_table_values(p)
    pools = p.paged_kv()
    q = _blocks(p, p.q)
    mq = p.num_q_blocks
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=_acc(p), device=q.device)
    step = _chunk_size(p)
    for m0 in range(0, mq, step):
        m1 = min(mq, m0 + step)
        k, v, valid, _ = _gather(p, pools, m0, m1)
        s = torch.matmul(q[:, :, m0:m1], k.transpose(-1, -2)) * p.scale
        s = s.masked_fill(~valid.unsqueeze(-2), float("-inf"))
        # Shift by the row max as the kernel does: exp(s - max) is exact for tied logits at
        # any magnitude, where exp(s - lse) would carry lse's rounding (an ulp of 1 at 1e7).
        # Empty rows (max -inf) shift by 0, so exp(-inf) = 0 rather than NaN.
        # Detached: the shift cancels in the result, so it needs no gradient.
        top = s.amax(dim=-1, keepdim=True).detach()
        top = torch.where(torch.isinf(top), 0.0, top)
        probs = torch.exp(s - top)
        total = probs.sum(dim=-1, keepdim=True)
        out[:, :, m0:m1] = torch.matmul(probs, v) / torch.where(total > 0, total, 1.0)
        lse[:, :, m0:m1] = (top + torch.log(total)).squeeze(-1)  # -inf where total is 0

    lse = lse.reshape(p.batch, p.heads, mq * p.q_block)[:, :, : p.q_len].contiguous()
    return _unblock(p, out), (lse if return_lse else None)


def pbsa_torch_backward(
    p: Problem, out: Tensor, lse: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in q's, k's and v's shapes and dtypes, from the forward's out and lse.

    P = exp(s - lse) over each block's gathered slab; dS = P·(dO·Vᵀ - rowsum(dO·O)). Slab
    entries that are not valid keys are zeroed before use (stale or non-finite values in
    unlisted pages or past a page's length cannot leak), so their gradients are 0.
    """
    check_table_values(p)
    pools = p.paged_kv()
    q, o, do = (_blocks(p, t) for t in (p.q, out, grad_out))
    mq, qb, page = p.num_q_blocks, p.q_block, p.page_size
    lse = torch.nn.functional.pad(lse.to(_acc(p)), (0, mq * qb - p.q_len), value=float("-inf"))
    # Rows that saw nothing (and padding rows) get +inf, so exp(s - lse) = 0 for them.
    lse = torch.where(torch.isinf(lse), float("inf"), lse).reshape(p.batch, p.heads, mq, qb, 1)
    delta = (do * o).sum(-1, keepdim=True)
    dq = torch.empty_like(q)
    # dK/dV accumulate per (b, kv head, page) row of a flat pool.
    rows = p.batch * p.kv_heads * p.num_pages
    dk = torch.zeros(rows, page, p.head_dim, dtype=_acc(p), device=q.device)
    dv = torch.zeros_like(dk)
    b_idx = torch.arange(p.batch, device=q.device).view(-1, 1, 1, 1)
    g_idx = (torch.arange(p.heads, device=q.device) // p.group).view(1, -1, 1, 1)
    step = _chunk_size(p, slabs=4, scores=3)
    for m0 in range(0, mq, step):
        m1 = min(mq, m0 + step)
        k, v, valid, idx = _gather(p, pools, m0, m1)
        k = torch.where(valid.unsqueeze(-1), k, 0.0)
        v = torch.where(valid.unsqueeze(-1), v, 0.0)
        qc, doc = q[:, :, m0:m1], do[:, :, m0:m1]
        s = torch.matmul(qc, k.transpose(-1, -2)) * p.scale
        probs = torch.where(valid.unsqueeze(-2), torch.exp(s - lse[:, :, m0:m1]), 0.0)
        ds = probs * (torch.matmul(doc, v.transpose(-1, -2)) - delta[:, :, m0:m1])
        dq[:, :, m0:m1] = torch.matmul(ds, k) * p.scale
        slab = (*idx.shape, page, p.head_dim)  # [B, H, mc, Kmax, page, D]
        dk_slab = (torch.matmul(ds.transpose(-1, -2), qc) * p.scale).reshape(slab)
        dv_slab = torch.matmul(probs.transpose(-1, -2), doc).reshape(slab)
        # Padding slots point at page 0 with all-zero slabs: adding them changes nothing.
        target = ((b_idx * p.kv_heads + g_idx) * p.num_pages + idx).reshape(-1)
        dk.index_add_(0, target, dk_slab.reshape(-1, page, p.head_dim))
        dv.index_add_(0, target, dv_slab.reshape(-1, page, p.head_dim))
    return _unblock(p, dq), _unpool(p, dk, p.k), _unpool(p, dv, p.v)


def _unpool(p: Problem, grad: Tensor, like: Tensor) -> Tensor:
    """A flat pool gradient [B·Hkv·NP, page, D] in `like`'s shape (the paged pool, or
    contiguous K/V in q's layout) and dtype."""
    grad = grad.reshape(p.batch, p.kv_heads, p.num_pages * p.page_size, p.head_dim)
    if p.paged:
        return grad.reshape(like.shape).to(like.dtype)
    grad = grad[:, :, : p.kv_len].to(like.dtype)
    return (grad if p.layout == "BHLD" else grad.transpose(1, 2)).contiguous()
