"""`CacheView`: the plain-data picture of one layer's paged KV cache that patterns select from.

The runtime builds it for every pass; patterns read it and return a `BlockTable`. Page ids
are physical ids into the pool ``[B, Hkv, NP, page_size, D]``; every (batch, kv head) row has
its own ids, but the frame structure (which frames are held) is shared by all rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from patterns.chunk_layout import ChunkLayout
from patterns.geometry import VideoGeometry
from patterns.scoring import pool_query_blocks

__all__ = ["CacheView"]


@dataclass(frozen=True)
class CacheView:
    """One layer's cache as a pattern sees it during one pass.

    geometry: the video geometry (F frames per chunk, ppf pages per frame, ...).
    num_heads: query heads H (a multiple of the kv heads).
    chunk_start: absolute frame index of the current chunk's first frame.
    history_frames: host copy of ``frame_index`` (a tuple of ints), so that counts that size
        a top-k are known without a device sync.
    frame_index: int64 ``[Fh]`` absolute frame of each history slot in temporal order
        (−1: absent slot, its page ids are meaningless).
    frame_pages: int64 ``[B, Hkv, Fh, ppf]`` page ids of each history slot.
    chunk_pages: int64 ``[B, Hkv, F, ppf]`` page ids holding the current chunk's K/V.
    persistent_pages: int64 ``[B, Hkv, C]`` persistent page ids (−1: empty slot).
    page_lens: int32 ``[B, Hkv, NP]`` valid tokens per page (the pool's).
    key_reps: float ``[B, Hkv, NP, D]`` raw mean of each page's keys (the pool's).
    query_reps: float ``[B, H, Mq, D]`` raw mean of each query block of the current chunk,
        or None: then ``pooled_queries()`` pools ``queries`` on first use.
    queries: the current pass's queries ``[B, F·T, H, D]`` (BLHD), or None. Selections that
        pool and score in one kernel read them instead of ``query_reps``.
    scorer: the layer's ``BlockScorer`` (None: an untrained one, i.e. raw pooled q·k).
    start: int64 0-dim tensor on the cache's device equal to ``chunk_start``, or None. The
        runtime gives it so that device work never bakes the chunk's position in: a CUDA
        graph captured over one chunk's view then replays at a later chunk of the same shape.
    layout: the chunk's derived tensors (``patterns.ChunkLayout``), built on first use; views
        made from one another (a shallow copy, ``dataclasses.replace``) share it, so the
        runtime builds them once per chunk.
    """

    geometry: VideoGeometry
    num_heads: int
    chunk_start: int
    history_frames: tuple[int, ...]
    frame_index: Tensor
    frame_pages: Tensor
    chunk_pages: Tensor
    persistent_pages: Tensor
    page_lens: Tensor
    key_reps: Tensor
    query_reps: Tensor | None = None
    queries: Tensor | None = None
    scorer: nn.Module | None = None
    start: Tensor | None = None
    layout: ChunkLayout = field(default_factory=ChunkLayout, compare=False, repr=False)

    def __post_init__(self) -> None:
        g = self.geometry
        b, hkv = self.chunk_pages.shape[:2]
        if self.num_heads % hkv:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of Hkv ({hkv})")
        fh = len(self.history_frames)
        expected = {
            "frame_index": (self.frame_index, (fh,)),
            "frame_pages": (self.frame_pages, (b, hkv, fh, g.pages_per_frame)),
            "chunk_pages": (self.chunk_pages, (b, hkv, g.frames_per_chunk, g.pages_per_frame)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if self.persistent_pages.dim() != 3 or tuple(self.persistent_pages.shape[:2]) != (b, hkv):
            raise ValueError(
                f"persistent_pages must be [B={b}, Hkv={hkv}, C], "
                f"got {tuple(self.persistent_pages.shape)}"
            )

    @property
    def batch(self) -> int:
        return self.chunk_pages.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.chunk_pages.shape[1]

    @property
    def num_persistent_slots(self) -> int:
        return self.persistent_pages.shape[2]

    def chunk_frames(self) -> Tensor:
        """int64 ``[F]``: absolute frames of the current chunk, on the device (from ``start``
        when given, so that no absolute frame is a constant of the work)."""
        rel = torch.arange(self.geometry.frames_per_chunk, device=self.chunk_pages.device)
        return rel + (self.chunk_start if self.start is None else self.start)

    def pooled_queries(self) -> Tensor:
        """``query_reps``, pooled from ``queries`` on first use (kept on this view only: the
        queries change every pass)."""
        if self.query_reps is None:
            if self.queries is None:
                raise ValueError("this pattern scores blocks: the view needs query_reps or queries")
            reps = pool_query_blocks(self.queries, self.geometry.q_block)
            object.__setattr__(self, "query_reps", reps)
        return self.query_reps

    @property
    def present_history(self) -> tuple[int, ...]:
        """Absolute frames actually held, in temporal order (host)."""
        return tuple(f for f in self.history_frames if f >= 0)
