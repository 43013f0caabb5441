"""One layer's commit: a host plan (which frames stay, page counts) and its device work.

The commit moves the chunk from the scratch pages into the layer's cache in the order that
``patterns.footprint`` counts: (1) when the pattern keeps persistent pages, pages for the
chunk's frames that leave the window at once, so that they compete for persistence; (2)
evict the history frames that left, score evicted ∪ persistent, keep the top C, free the
rest; (3) pages for the chunk's retained frames, copied from scratch. The plan is plain host
data, so a CUDA-graph replay of a commit pass redoes only its counts (``reserve_commit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patterns import CacheView, Pattern, VideoGeometry
from runtime.pool import PagePool

__all__ = ["CommitPlan", "execute_commit", "plan_commit", "reserve_commit"]


@dataclass(frozen=True)
class CommitPlan:
    """The host side of one layer's commit: which frames stay, and page counts per row.

    keep_old / evict_old: positions in the history; keep_new / evict_new: positions in the
    chunk; frames: the history afterwards (absolute frames); transient: pages allocated for
    chunk frames that leave the window at once (they compete for persistence); evicted:
    pages offered to the persistent set; kept: persistent pages afterwards; freed: pages
    returned to the pool; new: pages allocated for the chunk's kept frames.
    """

    keep_old: list[int]
    evict_old: list[int]
    keep_new: list[int]
    evict_new: list[int]
    frames: list[int]
    transient: int
    evicted: int
    kept: int
    freed: int
    new: int


def plan_commit(
    pattern: Pattern,
    geometry: VideoGeometry,
    history: Sequence[int],
    num_persistent: int,
    chunk_start: int,
) -> CommitPlan:
    """The plan of committing the chunk at ``chunk_start`` to a layer holding the
    ``history`` frames (absolute, ascending) and ``num_persistent`` persistent pages."""
    f, ppf = geometry.frames_per_chunk, geometry.pages_per_frame
    chunk = list(range(chunk_start, chunk_start + f))
    policy = pattern.cache_policy
    retained = set(policy.retained_frames(chunk_start + f, f))
    keep_old = [i for i, fr in enumerate(history) if fr in retained]
    evict_old = [i for i, fr in enumerate(history) if fr not in retained]
    keep_new = [j for j, fr in enumerate(chunk) if fr in retained]
    evict_new = [j for j, fr in enumerate(chunk) if fr not in retained]
    transient = len(evict_new) * ppf if policy.persistent_capacity else 0
    evicted = len(evict_old) * ppf + transient
    kept, freed = num_persistent, 0
    if evicted:
        kept = policy.persistent_after(num_persistent, evicted)
        freed = num_persistent + evicted - kept
    return CommitPlan(
        keep_old,
        evict_old,
        keep_new,
        evict_new,
        frames=[history[i] for i in keep_old] + [chunk[j] for j in keep_new],
        transient=transient,
        evicted=evicted,
        kept=kept,
        freed=freed,
        new=len(keep_new) * ppf,
    )


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ints as (first, stop)."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs


def _take(x: Tensor, dim: int, index: list[int]) -> Tensor:
    """``x.index_select(dim, index)`` as slices of runs: no host → device index copy."""
    if not index:
        return x.narrow(dim, 0, 0)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in _runs(index)], dim=dim)


def execute_commit(
    plan: CommitPlan,
    pool: PagePool,
    view: CacheView,
    pattern: Pattern,
    frame_pages: Tensor,
    frame_index: Tensor,
    persistent: Tensor,
    num_persistent: int,
) -> None:
    """The device work of ``plan``, in place in the layer's buffers.

    frame_pages: int64 ``[B, Hkv, capacity, ppf]`` and frame_index: int64 ``[capacity]``,
    whose first ``len(history)`` slots are the history before the commit and the first
    ``len(plan.frames)`` slots after it; persistent: int64 ``[B, Hkv, C]``, its first
    ``num_persistent`` ids valid. ``view`` is this commit pass's (its clean queries score
    the evicted pages, its scorer is the layer's).
    """
    g = view.geometry
    f, ppf = g.frames_per_chunk, g.pages_per_frame
    b, hkv = pool.batch_size, pool.num_kv_heads
    scratch = pool.scratch_ids.view(b, hkv, f, ppf)
    held = len(plan.keep_old) + len(plan.evict_old)
    history = frame_pages[:, :, :held]

    evicted = [_take(history, 2, plan.evict_old).reshape(b, hkv, -1)]
    if plan.transient:
        ids = pool.allocate(plan.transient)
        pool.copy(_take(scratch, 2, plan.evict_new).reshape(b, hkv, -1), ids)
        evicted.append(ids)
    if plan.evicted:
        updated, kept, freed = pattern.cache_policy.update_persistent(
            persistent,
            num_persistent,
            torch.cat(evicted, dim=-1),
            pool.key_reps,
            view.pooled_queries() if pattern.needs_scores else None,
            view.scorer,
        )
        if (kept, freed.shape[-1]) != (plan.kept, plan.freed):
            raise RuntimeError(
                f"{type(pattern).__name__}.update_persistent kept {kept} and freed "
                f"{freed.shape[-1]} pages; persistent_after planned {plan.kept} and "
                f"{plan.freed}"
            )
        if plan.freed:
            pool.free(freed)
        if updated is not persistent:
            persistent.copy_(updated)

    new_pages = pool.allocate(plan.new)
    if plan.keep_new:
        pool.copy(_take(scratch, 2, plan.keep_new).reshape(b, hkv, -1), new_pages)
    n = len(plan.frames)
    frame_pages[:, :, :n] = torch.cat(
        [_take(history, 2, plan.keep_old), new_pages.view(b, hkv, len(plan.keep_new), ppf)],
        dim=2,
    )
    frame_index[:n] = torch.cat(
        [
            _take(frame_index[:held], 0, plan.keep_old),
            _take(view.chunk_frames(), 0, plan.keep_new),
        ]
    )


def reserve_commit(plan: CommitPlan, pool: PagePool) -> None:
    """The pool's counts of ``plan`` alone, in the order ``execute_commit`` allocates and
    frees (for a commit whose device work a CUDA graph replayed)."""
    pool.reserve(plan.transient)
    pool.release(plan.freed)
    pool.reserve(plan.new)
