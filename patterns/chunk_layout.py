"""`ChunkLayout`: the tensors a chunk's cache layout decides, derived once per chunk.

Selections need the same derived tensors on every pass of a chunk (4 denoising passes and
the commit): the candidate columns, their validity per query head, the own-frame mask, the
all-visible table. They depend on the layout only (page ids, frames, the chunk's start,
shapes), never on the queries or the pool's contents, so each is built on first use by
``patterns.selection`` and kept in the ``CacheView.layout`` that every pass's view of the
chunk shares.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor

from patterns.block_table import BlockTable

__all__ = ["ChunkLayout", "Columns", "WindowColumns"]


@dataclass(frozen=True)
class Columns:
    """A view's candidate pages as columns: ``[persistent C | history Fh·ppf | chunk F·ppf]``.

    ids: int64 ``[B, Hkv, N]`` physical page ids (meaningless where not valid).
    valid: bool ``[B, Hkv, N]`` the column names a held page.
    frame: int64 ``[N]`` absolute frame of the column's page (−1 for persistent columns).
    """

    ids: Tensor
    valid: Tensor
    frame: Tensor
    num_persistent: int
    num_chunk: int


@dataclass(frozen=True)
class WindowColumns:
    """The window's columns (history and chunk pages, after the C persistent ones) as the
    torch top-K selection reads them.

    rep_index: int64 ``[B, Hkv, Nw, D]`` gather index of their key reps in the pool's
    ``key_reps``; allowed / blocked: bool ``[B, H, 1, Nw]`` validity per query head and its
    negation; own: bool ``[Mq, Nw]`` the page lies in a frame of the query block;
    persistent: bool ``[B, H, 1, C]`` validity of the persistent columns; ids: int32
    ``[B, Hkv, C + Nw]`` every column's page id.
    """

    rep_index: Tensor
    allowed: Tensor
    blocked: Tensor
    own: Tensor
    persistent: Tensor
    ids: Tensor


@dataclass
class ChunkLayout:
    """Per-chunk derived tensors, each None until first built (see the module docstring).

    columns: the candidate columns; visible_heads: bool ``[B, H, 1, N]`` their validity per
    query head; own_frames: bool ``[Mq, N]`` column n lies in a frame query block m touches;
    all_visible: the table listing every held page for every query block; window: the
    window's columns for the torch top-K selection.
    """

    columns: Columns | None = None
    visible_heads: Tensor | None = None
    own_frames: Tensor | None = None
    all_visible: BlockTable | None = None
    window: WindowColumns | None = None

    def clear(self) -> None:
        """Forget every derived tensor (the next selection rebuilds what it reads)."""
        for f in fields(self):
            setattr(self, f.name, None)
