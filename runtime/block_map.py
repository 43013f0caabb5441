"""What one layer's queries see, in temporal page order, for pictures and diagnostics.

Physical page ids say nothing to a reader; `block_map` lays the cache out as columns a person
can follow: the persistent pages first, then the window's history frames oldest to newest,
then the current chunk, each frame tiled into its pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from patterns.block_table import expand_heads
from patterns.selection import columns
from runtime.attention_state import AttentionState


@dataclass(frozen=True)
class BlockMap:
    """visible: bool ``[B, H, Mq, N]`` — query block m of head h sees column n.
    column_frame: int64 ``[N]`` — absolute frame of each column (−1 for persistent pages,
    whose frame of origin the cache does not keep).
    chunk_start: absolute frame of the current chunk's first frame."""

    visible: Tensor
    column_frame: Tensor
    chunk_start: int


def block_map(state: AttentionState, q: Tensor) -> BlockMap:
    """The table `state` builds for the chunk's queries q ``[B, Lc, H, D]`` (BLHD, the
    current pass's), without running attention or touching the cache."""
    view = state.view(q)
    table = state.pattern.select(view)
    # the pattern's own candidate columns: persistent | history frames | current chunk
    cols = columns(view)
    ids = expand_heads(cols.ids, state.num_heads, "ids")  # [B, H, N] per query head
    valid = expand_heads(cols.valid, state.num_heads, "valid")
    seen = table.visible_pages(view.page_lens.shape[-1])  # [B, H, Mq, NP]
    visible = torch.gather(seen, 3, ids[:, :, None, :].expand(-1, -1, seen.shape[2], -1))
    visible &= valid[:, :, None, :]
    return BlockMap(
        visible=visible.cpu(), column_frame=cols.frame.cpu(), chunk_start=view.chunk_start
    )
