"""The pattern library: what each query block of a chunk may see.

Every pattern is a frozen dataclass with

* ``select(view) -> BlockTable`` — the table for one pass of one layer (vectorised),
* ``cache_policy`` — what the cache keeps (``patterns.CachePolicy``: the retained frames, the
  persistent memory of C pages per kv head updated at commit from the evicted pages, and
  ``footprint()``, the symbolic KV-cache size), built from ``window_frames``,
  ``sink_frames`` and ``persistent_blocks``,
* ``full_sequence_visibility(...)`` — its form for bidirectional full-sequence attention,
  where it has one.

Windows count every frame a chunk attends to, its own F frames and the sinks included (the
eager ``runtime.RollingCache`` applies the same ``CachePolicy``): with ``window_frames = W``
and ``sink_frames = S`` a chunk sees the first S frames of the video, the most recent
``W − F − S`` frames before it and itself. Window patterns therefore hold at most ``W − F``
history frames per layer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from patterns.block_table import BlockTable, expand_heads
from patterns.cache_policy import CachePolicy
from patterns.cache_view import CacheView
from patterns.checks import check_int
from patterns.footprint import Footprint
from patterns.fused_select import fused_select_supported
from patterns.geometry import VideoGeometry
from patterns.selection import (
    block_logits,
    columns,
    default_scorer,
    gather_reps,
    max_own_pages,
    topk_mask,
    visible_heads,
    window_columns,
)

__all__ = ["Pattern", "Dense", "SinkWindow", "TopK", "PersistentLocal", "FullSequenceLayout"]


def _check_fraction(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


@dataclass(frozen=True)
class FullSequenceLayout:
    """Block structure of bidirectional attention over a whole video of contiguous KV.

    q_frames: int64 ``[Mq, 2]`` first/last frame of each query block; k_frames: int64
    ``[N, 2]`` the same for each key block (key blocks of ``page_size`` tokens tile the flat
    sequence, so unlike cached pages they may straddle two frames). q_block_span: most frames
    one query block touches (host int). For patterns that score blocks (``needs_scores``)
    one call's q_reps ``[B, H, Mq, D]``, k_reps ``[B, Hkv, N, D]`` (raw means) and the
    layer's scorer (None: an untrained one).
    """

    geometry: VideoGeometry
    num_frames: int
    q_frames: Tensor
    k_frames: Tensor
    q_block_span: int
    q_reps: Tensor | None = None
    k_reps: Tensor | None = None
    scorer: nn.Module | None = None

    def frame_overlap(self, radius: int) -> Tensor:
        """bool ``[Mq, N]``: key block n touches a frame within ``radius`` frames of one of
        query block m's frames."""
        q, k = self.q_frames, self.k_frames
        return (k[None, :, 0] <= q[:, None, 1] + radius) & (k[None, :, 1] >= q[:, None, 0] - radius)

    def max_blocks_within(self, radius: int) -> int:
        """Most key blocks a query block has within ``radius`` frames (host int)."""
        span = self.q_block_span + 2 * radius
        tokens = min(span, self.num_frames) * self.geometry.tokens_per_frame
        # a run of whole frames can start mid-block: one block more at most
        return min(self.k_frames.shape[0], math.ceil(tokens / self.geometry.page_size) + 1)


class Pattern(ABC):
    """Base class of the patterns (see the module docstring for the protocol)."""

    sink_frames: int = 0
    window_frames: int | None = None
    persistent_blocks: int = 0

    @property
    def cache_policy(self) -> CachePolicy:
        """What the cache keeps for this pattern: its window, sinks and persistent memory."""
        return CachePolicy(self.window_frames, self.sink_frames, self.persistent_blocks)

    @property
    def needs_scores(self) -> bool:
        """Whether ``select``/``update_persistent`` read ``query_reps`` (the runtime pools the
        queries only then)."""
        return False

    def check_geometry(self, geometry: VideoGeometry) -> None:
        """Raise ValueError when the pattern cannot run on ``geometry``."""
        self.cache_policy.check_fits(geometry.frames_per_chunk)

    def footprint(self) -> Footprint:
        """Symbolic per-layer cache size (``cache_policy.footprint()``)."""
        return self.cache_policy.footprint()

    @abstractmethod
    def select(self, view: CacheView) -> BlockTable:
        """The block table of one pass of one layer."""

    def full_sequence_visibility(self, layout: FullSequenceLayout) -> tuple[Tensor, int]:
        """Visibility ``[B|1, H|1, Mq|1, N]`` for bidirectional full-sequence attention, and a
        bound on the visible count per row. The layout carries the pooled reps when
        ``needs_scores``."""
        raise ValueError(f"{type(self).__name__} has no full-sequence form")

    def _params(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))

    def __str__(self) -> str:
        return f"{type(self).__name__}({self._params()}); {self.footprint()}"


def _all_visible(view: CacheView) -> BlockTable:
    """Every held page of the view, the same for all query blocks (once per chunk: the
    layout alone decides it)."""
    layout = view.layout
    if layout.all_visible is None:
        g = view.geometry
        layout.all_visible = BlockTable.from_visibility(
            visible_heads(view),
            g.q_block,
            g.page_size,
            columns(view).ids,
            num_q_blocks=g.q_blocks_per_chunk,
        )
    return layout.all_visible


@dataclass(frozen=True)
class Dense(Pattern):
    """Self-Forcing's dense cached attention: every held frame plus the current chunk.

    window_frames: None keeps every committed frame (global cache, grows with t); W attends
        to at most W frames (``runtime.RollingCache``): the sinks, the most recent frames
        and the current chunk. sink_frames: first frames of the video, always kept.
    """

    window_frames: int | None = None
    sink_frames: int = 0

    def __post_init__(self) -> None:
        if self.window_frames is not None:
            check_int(self.window_frames, "window_frames", 1)
        check_int(self.sink_frames, "sink_frames", 0)

    def select(self, view: CacheView) -> BlockTable:
        return _all_visible(view)

    def full_sequence_visibility(self, layout: FullSequenceLayout) -> tuple[Tensor, int]:
        if self.window_frames is not None or self.sink_frames:
            raise ValueError("only Dense() (no window, no sink) has a full-sequence form")
        n = layout.k_frames.shape[0]
        return torch.ones(1, 1, 1, n, dtype=torch.bool, device=layout.k_frames.device), n


@dataclass(frozen=True)
class SinkWindow(Pattern):
    """StreamingLLM / LongLive: the first ``sink_frames`` frames plus the most recent ones, at
    most ``window_frames`` frames in all (sinks and the current chunk included), all dense."""

    sink_frames: int
    window_frames: int

    def __post_init__(self) -> None:
        check_int(self.sink_frames, "sink_frames", 0)
        check_int(self.window_frames, "window_frames", 1)

    def select(self, view: CacheView) -> BlockTable:
        return _all_visible(view)


@dataclass(frozen=True)
class TopK(Pattern):
    """Light Forcing: hierarchical top-k over the history, with forced frames.

    Forced (always visible): the current chunk, the first ``sink_frames`` frames and the
    ``nearest_frames`` most recent history frames. The other history frames are scored per
    query block and head by pooled q·k (through the layer's scorer): first the best
    ``ceil(frame_density · n)`` frames by frame score (mean key of the frame), then, among
    their pages, the best ``ceil(density_i · n · ppf)`` pages, where n is the number of
    scored frames.

    Sparsity schedule: ``s_i = (1 − density) − β·α_i`` with ``α_i = sqrt(F / frames_i)``
    (frames_i: history frames held at chunk i), clamped to [0, 1]; ``density_i = 1 − s_i``.
    The first chunk has no history and is dense. ``window_frames`` None keeps every frame
    (Light Forcing saves compute, not memory).
    """

    density: float = 0.25
    frame_density: float = 0.5
    sink_frames: int = 1
    nearest_frames: int = 3
    window_frames: int | None = None
    beta: float = 0.0

    def __post_init__(self) -> None:
        _check_fraction(self.density, "density")
        _check_fraction(self.frame_density, "frame_density")
        check_int(self.sink_frames, "sink_frames", 0)
        check_int(self.nearest_frames, "nearest_frames", 0)
        if self.window_frames is not None:
            check_int(self.window_frames, "window_frames", 1)
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or self.beta < 0:
            raise ValueError(f"beta must be a number >= 0, got {self.beta!r}")

    @property
    def needs_scores(self) -> bool:
        return True

    def density_at(self, history_frames: int, frames_per_chunk: int) -> float:
        """Block density of a chunk that sees ``history_frames`` frames of history."""
        if history_frames <= 0:
            return 1.0
        alpha = math.sqrt(frames_per_chunk / history_frames)
        sparsity = min(1.0, max(0.0, (1.0 - self.density) - self.beta * alpha))
        return 1.0 - sparsity

    def select(self, view: CacheView) -> BlockTable:
        g = view.geometry
        ppf = g.pages_per_frame
        present = view.present_history
        nearest_from = view.chunk_start - self.nearest_frames
        scored = [f for f in present if f >= self.sink_frames and f < nearest_from]
        density = self.density_at(len(present), g.frames_per_chunk)
        if not scored or density >= 1.0:
            return _all_visible(view)

        cols = columns(view)
        frame_index = view.frame_index
        # the chunk's position from the device (see CacheView.start), not as a constant
        nearest_from_t = view.chunk_frames()[0] - self.nearest_frames
        scored_frame = (frame_index >= self.sink_frames) & (frame_index < nearest_from_t)
        scored_col = torch.nn.functional.pad(
            scored_frame.repeat_interleave(ppf), (cols.num_persistent, cols.num_chunk)
        )  # [N]: only history columns are ever scored
        forced = cols.valid & ~scored_col  # [B, Hkv, N]

        b, hkv = view.batch, view.num_kv_heads
        hist_ids = view.frame_pages.reshape(b, hkv, -1)
        page_reps = gather_reps(view.key_reps, hist_ids)  # [B, Hkv, Fh·ppf, D]
        lens = view.page_lens.gather(2, hist_ids).to(page_reps.dtype)[..., None]
        frame_reps = (page_reps * lens).unflatten(2, (-1, ppf)).sum(3)
        frame_reps = frame_reps / lens.unflatten(2, (-1, ppf)).sum(3).clamp(min=1)

        frame_scores = block_logits(view, frame_reps)  # [B, H, Mq, Fh]
        frames_kept = math.ceil(self.frame_density * len(scored))
        chosen_frames = topk_mask(frame_scores, frames_kept, scored_frame)
        page_scores = block_logits(view, page_reps)  # [B, H, Mq, Fh·ppf]
        pages_kept = min(math.ceil(density * len(scored) * ppf), frames_kept * ppf)
        chosen = topk_mask(page_scores, pages_kept, chosen_frames.repeat_interleave(ppf, dim=-1))
        chosen = torch.nn.functional.pad(chosen, (cols.num_persistent, cols.num_chunk))
        vis = expand_heads(forced, view.num_heads, "forced")[:, :, None, :] | chosen

        forced_pages = cols.num_persistent + (len(present) - len(scored)) * ppf + cols.num_chunk
        return BlockTable.from_visibility(
            vis, g.q_block, g.page_size, cols.ids, max_blocks=forced_pages + pages_kept
        )


@dataclass(frozen=True)
class PersistentLocal(Pattern):
    """Sparse Forcing: persistent memory plus a locally top-K window.

    Every query block sees (one softmax over the union):

    * all persistent pages: at most ``persistent_blocks`` (C) per kv head, chosen from the
      pages evicted out of the window — at each commit ``P ← TopC(P ∪ evicted)`` by the
      layer scorer's importance for the chunk's clean queries;
    * its row-wise top-K pages (per query head) among the window's pages — the history
      frames of the window and the current chunk — with K = ``local_topk``, or
      ``ceil(local_density · window pages)``; neither keeps the window dense;
    * the pages of its own frame(s) when ``force_own_frame``.

    ``window_frames`` counts the current chunk's frames. With K = all window pages it is
    ``Dense(window_frames)`` plus the persistent pages. ``radius_frames`` is the temporal
    half-window of the full-sequence form (default ``window_frames // 2``).
    """

    persistent_blocks: int
    window_frames: int
    local_topk: int | None = None
    local_density: float | None = None
    force_own_frame: bool = True
    radius_frames: int | None = None

    def __post_init__(self) -> None:
        check_int(self.persistent_blocks, "persistent_blocks", 0)
        check_int(self.window_frames, "window_frames", 1)
        if self.local_topk is not None and self.local_density is not None:
            raise ValueError("pass local_topk or local_density, not both")
        if self.local_topk is not None:
            check_int(self.local_topk, "local_topk", 1)
        if self.local_density is not None:
            _check_fraction(self.local_density, "local_density")
        if not isinstance(self.force_own_frame, bool):
            raise ValueError(f"force_own_frame must be a bool, got {self.force_own_frame!r}")
        if self.radius_frames is not None:
            check_int(self.radius_frames, "radius_frames", 0)

    @property
    def needs_scores(self) -> bool:
        return self.persistent_blocks > 0 or self._is_sparse

    @property
    def _is_sparse(self) -> bool:
        return self.local_topk is not None or self.local_density is not None

    def local_k(self, window_pages: int) -> int:
        """Pages each query block takes by score among ``window_pages`` window pages."""
        if self.local_topk is not None:
            return min(self.local_topk, window_pages)
        if self.local_density is not None:
            return min(math.ceil(self.local_density * window_pages), window_pages)
        return window_pages

    def select(self, view: CacheView) -> BlockTable:
        g = view.geometry
        cols = columns(view)
        c = cols.num_persistent
        window_pages = (len(view.present_history) + g.frames_per_chunk) * g.pages_per_frame
        k = self.local_k(window_pages)
        if k >= window_pages:
            return _all_visible(view)
        own_pages = max_own_pages(g) if self.force_own_frame else 0
        num_columns = c + (len(view.history_frames) + g.frames_per_chunk) * g.pages_per_frame
        bound = min(num_columns, c + k + own_pages)
        if fused_select_supported(view):
            from patterns.select_kernel import persistent_local_table  # imports triton

            return persistent_local_table(view, k, bound, self.force_own_frame)
        window = window_columns(view)
        scores = block_logits(view, view.key_reps.gather(2, window.rep_index))
        # topk_mask inlined over the per-chunk mask (saves a negation and a copy per pass)
        masked = scores.masked_fill(window.blocked, float("-inf"))
        picked = torch.zeros(masked.shape, dtype=torch.bool, device=masked.device)
        local = picked.scatter_(-1, masked.topk(k, dim=-1).indices, True) & window.allowed
        if self.force_own_frame:
            local = local | window.own  # chunk pages are always valid
        vis = torch.cat([window.persistent.expand(*local.shape[:3], c), local], dim=-1)
        return BlockTable.from_visibility(vis, g.q_block, g.page_size, window.ids, bound)

    def full_sequence_visibility(self, layout: FullSequenceLayout) -> tuple[Tensor, int]:
        n = layout.k_frames.shape[0]
        radius = self.window_frames // 2 if self.radius_frames is None else self.radius_frames
        window = layout.frame_overlap(radius)[None, None]  # [1, 1, Mq, N]
        window_max = layout.max_blocks_within(radius)
        k = self.local_k(window_max)
        c = min(self.persistent_blocks, n)
        if k >= window_max and c == 0:
            return window, window_max
        q_reps, k_reps = layout.q_reps, layout.k_reps
        if q_reps is None or k_reps is None:
            raise ValueError("PersistentLocal scores blocks here: q_reps and k_reps are required")
        heads, kv_heads, dim = q_reps.shape[1], k_reps.shape[1], q_reps.shape[3]
        scorer = default_scorer(layout.scorer, heads, kv_heads, dim, q_reps.device)
        local, own_max = window, 0
        if k < window_max:
            local = topk_mask(scorer.block_logits(q_reps, k_reps), k, window)
            if self.force_own_frame:
                local = local | layout.frame_overlap(0)
                own_max = layout.max_blocks_within(0)
        if c:
            everything = torch.ones(k_reps.shape[:3], dtype=torch.bool, device=k_reps.device)
            importance = scorer.importance(q_reps, k_reps, everything)
            persistent = topk_mask(importance, c)  # [B, Hkv, N]
            local = local | expand_heads(persistent, heads, "persistent")[:, :, None, :]
        return local, min(n, c + k + own_max)
