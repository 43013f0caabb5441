"""The float64 oracle: materialise the token mask from the block table, then dense attention.

Deliberately naive (a dense [B, H, Lq, NP·page] mask) so that it shares no indexing logic with
the backends it checks. Only for small shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from codegen.problem import Problem, check_table_values, validate


def pbsa_reference(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """`codegen.pbsa_attention`'s arguments (less backend and return_lse); returns float64
    out (q's layout) and lse [B, H, Lq]; -inf and out 0 for rows with nothing visible.
    """
    p = validate(*args, **kwargs)
    check_table_values(p)
    return _attend(p)


def pbsa_reference_backward(
    grad_out: Tensor, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (dq, dk, dv) of sum(out · grad_out), by autograd of the float64 oracle, in
    q's, k's and v's shapes. `grad_out`: q's shape; then `pbsa_reference`'s arguments.
    Gradients of rows with nothing visible, of tokens past a page's length and of pages
    never listed are 0. The inputs must be finite (a NaN anywhere reaches every gradient
    through the dense products)."""
    p = validate(*args, **kwargs)
    check_table_values(p)
    if grad_out.shape != p.q.shape:
        raise ValueError(
            f"grad_out: expected q's shape {tuple(p.q.shape)}, got {tuple(grad_out.shape)}"
        )
    leaves = [t.detach().double().requires_grad_() for t in (p.q, p.k, p.v)]
    out, _ = _attend(dataclasses.replace(p, q=leaves[0], k=leaves[1], v=leaves[2]))
    dq, dk, dv = torch.autograd.grad(out, leaves, grad_out.double())
    return dq, dk, dv


def _attend(p: Problem) -> tuple[Tensor, Tensor]:
    """Dense masked float64 attention of a checked call: (out in q's layout, lse)."""
    k_pool, v_pool, lens = p.paged_kv()
    page = p.page_size
    dev = p.q.device
    # Dense [B, H, NP·page, D] keys/values per query head (GQA: repeat kv heads).
    k_all = k_pool.double().reshape(p.batch, p.kv_heads, -1, p.head_dim)
    v_all = v_pool.double().reshape(p.batch, p.kv_heads, -1, p.head_dim)
    k_all = k_all.repeat_interleave(p.group, dim=1)
    v_all = v_all.repeat_interleave(p.group, dim=1)

    listed = torch.arange(p.max_blocks, device=dev) < p.kv_num_blocks.unsqueeze(-1)
    block = torch.zeros(
        p.batch, p.heads, p.num_q_blocks, p.num_pages + 1, dtype=torch.bool, device=dev
    )
    # Unlisted slots scatter into a spare column that is dropped afterwards.
    block.scatter_(3, torch.where(listed, p.kv_indices, p.num_pages).long(), True)
    block = block[..., : p.num_pages]
    rows = torch.arange(p.q_len, device=dev) // p.q_block
    tok_ok = torch.arange(page, device=dev) < lens.repeat_interleave(p.group, 1).unsqueeze(-1)
    mask = block[:, :, rows].unsqueeze(-1) & tok_ok.unsqueeze(2)  # [B, H, Lq, NP, page]
    mask = mask.reshape(p.batch, p.heads, p.q_len, -1)

    s = torch.matmul(p.q_bhld().double(), k_all.transpose(-1, -2)) * p.scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # Empty rows shift by 0: exp(-inf) = 0 for them (and so does their gradient).
    probs = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.matmul(probs, v_all)
    if p.layout == "BLHD":
        out = out.transpose(1, 2)
    return out, lse
