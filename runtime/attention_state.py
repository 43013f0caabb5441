"""`AttentionState`: one self-attention layer bound to the shared page pool.

Called with the current chunk's q, k, v (BLHD, post-RoPE) it writes k, v to the scratch
pages, asks the pattern for a block table over (persistent ∪ history ∪ chunk) pages and runs
the PBSA kernel. In the commit pass it then moves the chunk into the cache (see
``patterns.footprint`` for the exact order of allocation and freeing, which the footprint
formula counts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import codegen
from patterns import BlockScorer, CacheView, Pattern, VideoGeometry
from runtime.pool import PagePool

__all__ = ["AttentionState", "RuntimeCursor"]

PHASES = ("denoise", "commit")


@dataclass
class RuntimeCursor:
    """Where the rollout is, shared (by reference) between a runtime and its states.

    pool: the page pool (None before ``reset``); phase: None outside a pass, else one of
    ``PHASES``; chunk_start: first frame of the current chunk; start: the same as an int64
    0-dim tensor on the pool's device (device work reads it, so a CUDA graph of a pass
    replays at any chunk); backend: the kernel backend; debug: validate every block table
    and every freed page (syncs with the device).
    """

    pool: PagePool | None = None
    phase: str | None = None
    chunk_start: int = 0
    start: Tensor | None = None
    backend: str = "auto"
    debug: bool = False


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


class AttentionState(nn.Module):
    """Self-attention of one layer over the paged cache.

    Holds the layer's ``BlockScorer`` (``self.scorer``, so its projections are in the
    state_dict), its history frames (absolute indices, temporal order, with their page ids
    ``[B, Hkv, frames, ppf]``) and its persistent page ids ``[B, Hkv, C]``.
    """

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        cursor: RuntimeCursor,
    ):
        super().__init__()
        self.pattern = pattern
        self.geometry = geometry
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scorer = BlockScorer(num_heads, num_kv_heads, head_dim)
        self._cursor = cursor
        # Device state lives in buffers allocated by ``reset`` and only ever updated in place:
        # a CUDA graph captured over one chunk reads them at fixed addresses.
        self._frames: list[int] = []
        self._frame_pages: Tensor | None = None  # int64 [B, Hkv, capacity, ppf]
        self._frame_index_buffer: Tensor | None = None  # int64 [capacity]
        self._persistent: Tensor | None = None  # int64 [B, Hkv, C], valid first, -1 after
        self._num_persistent = 0
        self._committed = 0  # frames this layer has committed
        self._layout: CacheView | None = None  # this chunk's view without query reps

    def extra_repr(self) -> str:
        return f"{self.pattern}, {self.geometry}"

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def frames(self) -> tuple[int, ...]:
        """Absolute indices of the history frames held, ascending."""
        return tuple(self._frames)

    @property
    def num_persistent(self) -> int:
        return self._num_persistent

    @property
    def committed_frames(self) -> int:
        return self._committed

    def page_ids(self) -> Tensor:
        """Every page this layer holds: int64 ``[B, Hkv, n]`` (history, then persistent)."""
        pool = self._require_pool()
        hist = self._frame_pages[:, :, : len(self._frames)].reshape(
            pool.batch_size, pool.num_kv_heads, -1
        )
        return torch.cat([hist, self._persistent[..., : self._num_persistent]], dim=-1)

    def reset(self, pool: PagePool, max_history_frames: int) -> None:
        """Forget everything; bind to ``pool``. Buffers of the same shapes are cleared in
        place, not reallocated (CUDA graphs captured over them stay valid)."""
        b, hkv, device = pool.batch_size, pool.num_kv_heads, pool.device
        ppf = self.geometry.pages_per_frame
        self._frames = []
        shape = (b, hkv, max_history_frames, ppf)
        old = self._frame_pages
        if old is None or tuple(old.shape) != shape or old.device != device:
            self._frame_pages = torch.empty(shape, dtype=torch.int64, device=device)
            self._frame_index_buffer = torch.empty(
                max_history_frames, dtype=torch.int64, device=device
            )
            self._persistent = torch.empty(
                (b, hkv, self.pattern.cache_policy.persistent_capacity),
                dtype=torch.int64,
                device=device,
            )
        self._frame_pages.zero_()
        self._frame_index_buffer.zero_()
        self._persistent.fill_(-1)
        self._num_persistent = 0
        self._committed = 0
        self._layout = None

    @property
    def _frame_index(self) -> Tensor:
        """int64 ``[len(frames)]``: the history's absolute frames, on the device."""
        return self._frame_index_buffer[: len(self._frames)]

    def signature(self) -> tuple:
        """What the device work of a pass depends on besides buffer contents: the history
        relative to the current chunk and the counts (equal signatures: a CUDA graph of one
        pass replays the other)."""
        start = self._cursor.chunk_start
        return (
            tuple(f - start for f in self._frames),
            self._num_persistent,
            self._committed - start,
        )

    def buffers(self) -> list[Tensor]:
        """The device buffers of this layer's state (updated in place only)."""
        return [self._frame_pages, self._frame_index_buffer, self._persistent]

    def invalidate_layout(self) -> None:
        """Drop this chunk's layout: the next pass rebuilds it (inside a graph capture,
        so that the graph recomputes it on every replay)."""
        self._layout = None

    def _require_pool(self) -> PagePool:
        pool = self._cursor.pool
        if pool is None or self._frame_pages is None:
            raise RuntimeError("the attention runtime must be reset(...) before use")
        return pool

    # -- forward ----------------------------------------------------------------------------

    def _check_inputs(self, q: Tensor, k: Tensor, v: Tensor, pool: PagePool) -> None:
        cursor = self._cursor
        if cursor.phase not in PHASES:
            raise ValueError(
                "phase: attention called outside a pass; run it inside "
                "AttentionRuntime.chunk_pass(start_frame, commit)"
            )
        if cursor.phase == "commit" and self._committed > cursor.chunk_start:
            raise ValueError("phase: this layer already committed the current chunk")
        g = self.geometry
        rows = g.chunk_tokens
        expected = {
            "q": (pool.batch_size, rows, self.num_heads, self.head_dim),
            "k": (pool.batch_size, rows, self.num_kv_heads, self.head_dim),
            "v": (pool.batch_size, rows, self.num_kv_heads, self.head_dim),
        }
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, Tensor):
                raise ValueError(f"{name} must be a Tensor, got {type(x).__name__}")
            if tuple(x.shape) != expected[name]:
                raise ValueError(
                    f"{name} must be BLHD {list(expected[name])} (one chunk of "
                    f"{g.frames_per_chunk}x{g.tokens_per_frame} tokens), got {list(x.shape)}"
                )
            if x.dtype != pool.dtype:
                raise ValueError(f"{name} must be {pool.dtype} (the cache's dtype), got {x.dtype}")
            if x.device != pool.device:
                raise ValueError(f"{name} must be on {pool.device} (the cache's), got {x.device}")

    def view(self, queries: Tensor) -> CacheView:
        """The cache as the pattern sees it for the current chunk's ``queries`` (BLHD, this
        pass's). The layout part is built once per chunk; every pass's view shares its memo
        (see ``CacheView.layout``)."""
        pool = self._require_pool()
        if self._layout is None or self._layout.chunk_start != self._cursor.chunk_start:
            g = self.geometry
            self._layout = CacheView(
                geometry=g,
                num_heads=self.num_heads,
                chunk_start=self._cursor.chunk_start,
                history_frames=tuple(self._frames),
                frame_index=self._frame_index,
                frame_pages=self._frame_pages[:, :, : len(self._frames)],
                chunk_pages=pool.scratch_ids.view(
                    pool.batch_size, pool.num_kv_heads, g.frames_per_chunk, g.pages_per_frame
                ),
                # only the filled slots: empty ones would widen every table for nothing
                persistent_pages=self._persistent[..., : self._num_persistent],
                page_lens=pool.page_lens,
                key_reps=pool.key_reps,
                scorer=self.scorer,
                start=self._cursor.start,
            )
        # a shallow copy shares the layout and skips __post_init__'s checks, which the layout
        # passed once this chunk (dataclasses.replace would re-run them on every pass)
        view = copy.copy(self._layout)
        object.__setattr__(view, "queries", queries)
        return view

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the current chunk: q ``[B, Lc, H, D]``, k, v ``[B, Lc, Hkv, D]`` (BLHD,
        post-RoPE, ``Lc = F·T``) → ``[B, Lc, H, D]``. A rejected call changes nothing."""
        pool = self._require_pool()
        self._check_inputs(q, k, v, pool)
        pool.write_scratch(k, v)
        view = self.view(q)
        table = self.pattern.select(view)
        if self._cursor.debug:
            table.validate(pool.num_pages)
        out, _ = codegen.pbsa_attention(
            q,
            pool.k,
            pool.v,
            table.kv_num_blocks,
            table.kv_indices,
            pool.page_lens,
            layout="BLHD",
            q_block=self.geometry.q_block,
            return_lse=False,
            backend=self._cursor.backend,
        )
        if self._cursor.phase == "commit":
            self._commit(pool, view)
        return out

    # -- commit -----------------------------------------------------------------------------

    def _commit_plan(self, pool: PagePool) -> CommitPlan:
        g = self.geometry
        f, ppf = g.frames_per_chunk, g.pages_per_frame
        start = self._cursor.chunk_start
        chunk = list(range(start, start + f))
        policy = self.pattern.cache_policy
        retained = set(policy.retained_frames(start + f, f))
        keep_old = [i for i, fr in enumerate(self._frames) if fr in retained]
        evict_old = [i for i, fr in enumerate(self._frames) if fr not in retained]
        keep_new = [j for j, fr in enumerate(chunk) if fr in retained]
        evict_new = [j for j, fr in enumerate(chunk) if fr not in retained]
        # chunk frames leaving the window at once need real pages to compete for P
        transient = len(evict_new) * ppf if policy.persistent_capacity else 0
        evicted = len(evict_old) * ppf + transient
        kept = self._num_persistent
        freed = 0
        if evicted:
            kept = policy.persistent_after(self._num_persistent, evicted)
            freed = self._num_persistent + evicted - kept
        return CommitPlan(
            keep_old,
            evict_old,
            keep_new,
            evict_new,
            frames=[self._frames[i] for i in keep_old] + [chunk[j] for j in keep_new],
            transient=transient,
            evicted=evicted,
            kept=kept,
            freed=freed,
            new=len(keep_new) * ppf,
        )

    def _commit(self, pool: PagePool, view: CacheView) -> None:
        """Move the chunk from scratch into the cache; evict; update the persistent set
        (scored with this pass's clean queries, pooled from ``view``)."""
        plan = self._commit_plan(pool)
        g = self.geometry
        f, ppf = g.frames_per_chunk, g.pages_per_frame
        b, hkv = pool.batch_size, pool.num_kv_heads
        scratch = pool.scratch_ids.view(b, hkv, f, ppf)
        history = self._frame_pages[:, :, : len(self._frames)]

        evicted = [_take(history, 2, plan.evict_old).reshape(b, hkv, -1)]
        if plan.transient:
            ids = pool.allocate(plan.transient)
            pool.copy(_take(scratch, 2, plan.evict_new).reshape(b, hkv, -1), ids)
            evicted.append(ids)
        evicted_ids = torch.cat(evicted, dim=-1)
        if plan.evicted:
            persistent, kept, freed = self.pattern.cache_policy.update_persistent(
                self._persistent,
                self._num_persistent,
                evicted_ids,
                pool.key_reps,
                view.pooled_queries() if self.pattern.needs_scores else None,
                self.scorer,
            )
            if (kept, freed.shape[-1]) != (plan.kept, plan.freed):
                raise RuntimeError(
                    f"{type(self.pattern).__name__}'s update_persistent kept {kept} and freed "
                    f"{freed.shape[-1]} pages; persistent_after planned {plan.kept} and "
                    f"{plan.freed}"
                )
            if plan.freed:
                pool.free(freed)
            if persistent is not self._persistent:
                self._persistent.copy_(persistent)

        new_pages = pool.allocate(plan.new)
        if plan.keep_new:
            pool.copy(_take(scratch, 2, plan.keep_new).reshape(b, hkv, -1), new_pages)
        kept_history = _take(history, 2, plan.keep_old)
        n = len(plan.frames)
        self._frame_pages[:, :, :n] = torch.cat(
            [kept_history, new_pages.view(b, hkv, len(plan.keep_new), ppf)], dim=2
        )
        self._frame_index_buffer[:n] = torch.cat(
            [
                _take(self._frame_index, 0, plan.keep_old),
                _take(view.chunk_frames(), 0, plan.keep_new),
            ]
        )
        self._finish_commit(plan)

    def _finish_commit(self, plan: CommitPlan) -> None:
        self._frames = plan.frames
        self._num_persistent = plan.kept
        self._committed = self._cursor.chunk_start + self.geometry.frames_per_chunk
        self._layout = None

    def replay_commit(self) -> None:
        """The host side of ``_commit`` alone, for a commit pass whose device work a CUDA
        graph replayed: the pool's counts (in the order the device work allocates and frees)
        and this layer's frames and counts."""
        pool = self._require_pool()
        plan = self._commit_plan(pool)
        pool.reserve(plan.transient)
        pool.release(plan.freed)
        pool.reserve(plan.new)
        self._finish_commit(plan)
