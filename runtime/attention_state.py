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
from patterns import BlockScorer, CacheView, Pattern, VideoGeometry, pool_query_blocks
from runtime.pool import PagePool

__all__ = ["AttentionState", "RuntimeCursor"]

PHASES = ("denoise", "commit")


@dataclass
class RuntimeCursor:
    """Where the rollout is, shared (by reference) between a runtime and its states.

    pool: the page pool (None before ``reset``); phase: None outside a pass, else one of
    ``PHASES``; chunk_start: first frame of the current chunk; backend: the kernel backend;
    debug: validate every block table and every freed page (syncs with the device).
    """

    pool: PagePool | None = None
    phase: str | None = None
    chunk_start: int = 0
    backend: str = "auto"
    debug: bool = False


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

    Holds the layer's ``BlockScorer`` (``self.scorer``, so gates are in the state_dict), its
    history frames (absolute indices, temporal order, with their page ids
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
        self._frames: list[int] = []
        self._frame_pages: Tensor | None = None  # int64 [B, Hkv, capacity, ppf]
        self._frame_index: Tensor | None = None  # int64 [len(_frames)]
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
        """Forget everything; bind to a freshly sized pool."""
        b, hkv, device = pool.batch_size, pool.num_kv_heads, pool.device
        ppf = self.geometry.pages_per_frame
        self._frames = []
        self._frame_pages = torch.zeros(
            b, hkv, max_history_frames, ppf, dtype=torch.int64, device=device
        )
        self._frame_index = torch.zeros(0, dtype=torch.int64, device=device)
        capacity = self.pattern.persistent_capacity
        self._persistent = torch.full((b, hkv, capacity), -1, dtype=torch.int64, device=device)
        self._num_persistent = 0
        self._committed = 0
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

    def view(self, query_reps: Tensor | None) -> CacheView:
        """The cache as the pattern sees it for the current chunk. The layout part is built
        once per chunk; every pass's view shares its memo (see ``CacheView.cached``)."""
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
            )
        # a shallow copy shares the memo and skips __post_init__'s checks, which the layout
        # passed once this chunk (dataclasses.replace would re-run them on every pass)
        view = copy.copy(self._layout)
        object.__setattr__(view, "query_reps", query_reps)
        return view

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of the current chunk: q ``[B, Lc, H, D]``, k, v ``[B, Lc, Hkv, D]`` (BLHD,
        post-RoPE, ``Lc = F·T``) → ``[B, Lc, H, D]``. A rejected call changes nothing."""
        pool = self._require_pool()
        self._check_inputs(q, k, v, pool)
        g = self.geometry
        pool.write_scratch(k, v)
        query_reps = pool_query_blocks(q, g.q_block) if self.pattern.needs_scores else None
        table = self.pattern.select(self.view(query_reps))
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
            q_block=g.q_block,
            return_lse=False,
            backend=self._cursor.backend,
        )
        if self._cursor.phase == "commit":
            self._commit(pool, query_reps)
        return out

    # -- commit -----------------------------------------------------------------------------

    def _commit(self, pool: PagePool, query_reps: Tensor | None) -> None:
        """Move the chunk from scratch into the cache; evict; update the persistent set."""
        g = self.geometry
        f, ppf = g.frames_per_chunk, g.pages_per_frame
        b, hkv = pool.batch_size, pool.num_kv_heads
        start = self._cursor.chunk_start
        chunk = list(range(start, start + f))
        retained = set(self.pattern.retained_frames(start + f, f))
        keep_old = [i for i, fr in enumerate(self._frames) if fr in retained]
        evict_old = [i for i, fr in enumerate(self._frames) if fr not in retained]
        keep_new = [j for j, fr in enumerate(chunk) if fr in retained]
        evict_new = [j for j, fr in enumerate(chunk) if fr not in retained]
        scratch = pool.scratch_ids.view(b, hkv, f, ppf)
        history = self._frame_pages[:, :, : len(self._frames)]

        evicted = [_take(history, 2, evict_old).reshape(b, hkv, -1)]
        if self.pattern.persistent_capacity and evict_new:
            # chunk frames leaving the window at once need real pages to compete for P
            ids = pool.allocate(len(evict_new) * ppf)
            pool.copy(_take(scratch, 2, evict_new).reshape(b, hkv, -1), ids)
            evicted.append(ids)
        evicted_ids = torch.cat(evicted, dim=-1)
        if evicted_ids.shape[-1]:
            persistent, kept, freed = self.pattern.update_persistent(
                self._persistent,
                self._num_persistent,
                evicted_ids,
                pool.key_reps,
                query_reps,
                self.scorer,
            )
            if freed.shape[-1]:
                pool.free(freed)
            self._persistent, self._num_persistent = persistent, kept

        new_pages = pool.allocate(len(keep_new) * ppf)
        if keep_new:
            pool.copy(_take(scratch, 2, keep_new).reshape(b, hkv, -1), new_pages)
        kept_history = _take(history, 2, keep_old)
        frames = [self._frames[i] for i in keep_old] + [chunk[j] for j in keep_new]
        self._frame_pages[:, :, : len(frames)] = torch.cat(
            [kept_history, new_pages.view(b, hkv, len(keep_new), ppf)], dim=2
        )
        self._frames = frames
        self._frame_index = torch.cat(
            [torch.arange(a, z, device=pool.device) for a, z in _runs(frames)]
            or [self._frame_index[:0]]
        )
        self._committed = start + f
        self._layout = None
