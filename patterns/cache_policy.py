"""`CachePolicy`: what a KV cache keeps for one pattern, frame by frame and page by page.

One object answers every retention question, so the eager dense baseline
(``runtime.FrameCache``), the paged runtime (``runtime.AttentionState``) and the footprint
formula cannot disagree:

* ``retained_frames`` — the history frames kept once some frames are committed: the first
  ``sink_frames`` frames and the most recent ones, so that the next chunk, its own frames and
  the sinks included, attends to at most ``window_frames`` frames (None keeps every frame);
* ``update_persistent`` / ``persistent_after`` — the persistent memory: at most
  ``persistent_capacity`` pages per (batch, kv head), ``P ← TopC(P ∪ evicted)`` by the
  layer scorer's importance; ``persistent_after`` is the host count that update keeps (the
  runtime plans a commit before running it);
* ``footprint`` — the symbolic per-layer cache size (``patterns.footprint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp
from torch import Tensor, nn

from patterns.checks import check_int
from patterns.footprint import Footprint, frames_per_chunk, pages_per_frame, t, window_history
from patterns.selection import top_c_update

__all__ = ["CachePolicy"]


@dataclass(frozen=True)
class CachePolicy:
    """Retention rule of a cache (see the module docstring).

    window_frames: most frames a chunk attends to, itself and the sinks included (None: all).
    sink_frames: first frames of the video, always kept.
    persistent_capacity: persistent pages kept per (batch, kv head); 0 frees evicted pages.
    """

    window_frames: int | None = None
    sink_frames: int = 0
    persistent_capacity: int = 0

    def __post_init__(self) -> None:
        if self.window_frames is not None:
            check_int(self.window_frames, "window_frames", 1)
        check_int(self.sink_frames, "sink_frames", 0)
        check_int(self.persistent_capacity, "persistent_capacity", 0)

    def check_fits(self, frames_per_chunk: int) -> None:
        """Raise ValueError when the window cannot hold the sinks and one chunk."""
        window = self.window_frames
        if window is not None and window < self.sink_frames + frames_per_chunk:
            raise ValueError(
                f"window_frames={self.window_frames} must be at least sink_frames="
                f"{self.sink_frames} + frames_per_chunk={frames_per_chunk} (the window holds "
                "the sinks and one chunk)"
            )

    def retained_runs(self, num_committed: int, frames_per_chunk: int) -> tuple[range, ...]:
        """The history frames kept once frames ``[0, num_committed)`` are committed, as
        ascending runs of consecutive frames (the sinks, then the most recent; none empty)."""
        if self.window_frames is None:
            runs = (range(num_committed),)
        else:
            sinks = min(self.sink_frames, num_committed)
            recent = self.window_frames - frames_per_chunk - sinks
            runs = (range(sinks), range(max(sinks, num_committed - recent), num_committed))
        return tuple(run for run in runs if run)

    def retained_frames(self, num_committed: int, frames_per_chunk: int) -> list[int]:
        """``retained_runs`` as one ascending list of absolute frames."""
        return [f for run in self.retained_runs(num_committed, frames_per_chunk) for f in run]

    def attended_frames(self, num_frames: int) -> int:
        """Most frames (history ∪ the chunk) a chunk attends to in a rollout of
        ``num_frames`` frames."""
        if self.window_frames is None:
            return num_frames
        return min(self.window_frames, num_frames)

    def persistent_after(self, num_persistent: int, num_evicted: int) -> int:
        """How many persistent pages ``update_persistent`` keeps out of ``num_persistent``
        held and ``num_evicted`` offered (host ints)."""
        return min(self.persistent_capacity, num_persistent + num_evicted)

    def update_persistent(
        self,
        persistent: Tensor,
        num_persistent: int,
        evicted: Tensor,
        key_reps: Tensor,
        query_reps: Tensor | None,
        scorer: nn.Module | None,
    ) -> tuple[Tensor, int, Tensor]:
        """Persistent memory after evicting ``evicted`` (int64 ``[B, Hkv, E]``).

        persistent: int64 ``[B, Hkv, C]``, the ``num_persistent`` valid ids first, −1 after;
        key_reps: the pool's ``[B, Hkv, NP, D]``; query_reps: the chunk's clean pooled queries
        ``[B, H, Mq, D]`` (needed when there is memory). Returns (persistent ids
        ``[B, Hkv, C]``, valid ids first then −1; their count, ``persistent_after(...)``;
        page ids to free ``[B, Hkv, n]``). Without memory every evicted page is freed.
        """
        if self.persistent_capacity == 0:
            return persistent, num_persistent, evicted
        if query_reps is None:
            raise ValueError("query_reps is required: the persistent update scores pages")
        return top_c_update(
            persistent,
            num_persistent,
            evicted,
            self.persistent_capacity,
            key_reps,
            query_reps,
            scorer,
        )

    def footprint(self) -> Footprint:
        """Symbolic per-layer cache size as a function of the committed chunk count t."""
        history = window_history(self.window_frames)
        if self.persistent_capacity == 0 or self.window_frames is None:
            return Footprint(history, sp.Integer(0))  # nothing is ever kept as memory
        evicted_frames = t * frames_per_chunk - history
        persistent = sp.Min(self.persistent_capacity, pages_per_frame * evicted_frames)
        # chunk frames that leave the window at their own commit compete for persistence
        transient = pages_per_frame * sp.Max(0, 2 * frames_per_chunk - self.window_frames)
        return Footprint(history, persistent, transient)
