"""The transposed block table: for each (batch, kv head, page), the (query head, query block)
pairs whose table rows list it. The dK/dV kernel walks it, so that each key tile has one
owner (no atomics, a fixed summation order).

Built in block space with device-side torch ops (a stable sort and a searchsorted), without
a host sync and never through a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TransposedTable:
    """CSR form over keys (b·Hkv + g)·NP + page.

    offsets: int32 [B·Hkv·NP + 1]; the pairs of key n are entries[offsets[n]:offsets[n+1]].
    entries: int32 [B·H·Mq·Kmax]; a pair is h·Mq + query block, ascending within each key.
        Slots past offsets[-1] are padding (unlisted table slots) and never read.
    """

    offsets: Tensor
    entries: Tensor


def transpose_table(
    kv_num_blocks: Tensor, kv_indices: Tensor, *, kv_heads: int, num_pages: int
) -> TransposedTable:
    """The transposed table of (kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, Kmax]) over
    `kv_heads` kv heads (dividing H) and `num_pages` pages. Listed page ids must lie in
    [0, num_pages) and rows must be duplicate-free (as `pbsa_attention` requires)."""
    if kv_indices.dim() != 4 or tuple(kv_num_blocks.shape) != tuple(kv_indices.shape[:3]):
        raise ValueError(
            "kv_num_blocks, kv_indices: expected shapes [B, H, Mq] and [B, H, Mq, Kmax], got "
            f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}"
        )
    batch, heads, mq, kmax = kv_indices.shape
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"kv_heads: expected a divisor of H={heads}, got {kv_heads}")
    dev = kv_indices.device
    n_keys = batch * kv_heads * num_pages
    listed = torch.arange(kmax, device=dev) < kv_num_blocks.unsqueeze(-1)
    b = torch.arange(batch, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=dev).view(1, -1, 1, 1)
    row = torch.arange(mq, device=dev).view(1, 1, -1, 1)
    # Unlisted slots get key n_keys and sort past every real key.
    key = torch.where(
        listed, (b * kv_heads + h // (heads // kv_heads)) * num_pages + kv_indices, n_keys
    )
    # Slots are enumerated in (b, h, block, slot) order and a row lists a page at most once,
    # so a stable sort leaves each key's pairs in ascending (h, block) order.
    sorted_key, order = torch.sort(key.reshape(-1), stable=True)
    pair = (h * mq + row).expand(batch, heads, mq, kmax).reshape(-1)
    entries = pair[order].to(torch.int32)
    bounds = torch.arange(n_keys + 1, device=dev, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, bounds).to(torch.int32)
    return TransposedTable(offsets=offsets, entries=entries)
