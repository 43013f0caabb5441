"""`AttentionState`: one self-attention layer bound to the shared page pool.

Called with the current chunk's q, k, v (BLHD, post-RoPE) it writes k, v to the scratch
pages, asks the pattern for a block table over (persistent ∪ history ∪ chunk) pages and runs
the PBSA kernel. In the commit pass it then moves the chunk into the cache
(``runtime.commit``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

import codegen
from patterns import CacheView, Pattern, VideoGeometry
from runtime.commit import CommitPlan, execute_commit, plan_commit, reserve_commit
from runtime.layer import PatternLayer
from runtime.pool import PagePool

__all__ = ["AttentionState", "PassContext"]

PHASES = ("denoise", "commit")


@dataclass
class PassContext:
    """Where the rollout is, shared (by reference) between a runtime and its states.

    pool: the page pool (None before ``reset``); phase: None outside a pass, else one of
    ``PHASES``; chunk_start: first frame of the current chunk; start: the same as an int64
    0-dim tensor on the pool's device (device work reads it, so a CUDA graph of a pass
    replays at any chunk); backend: the kernel backend; debug: validate every block table
    and every freed page (syncs with the device); autotune: tune the kernel on the first
    eager call of each shape bucket without a stored winner.
    """

    pool: PagePool | None = None
    phase: str | None = None
    chunk_start: int = 0
    start: Tensor | None = None
    backend: str = "auto"
    debug: bool = False
    autotune: bool = True


class AttentionState(PatternLayer):
    """Self-attention of one layer over the paged cache (a `PatternLayer`: pattern,
    geometry, heads and the layer's ``BlockScorer``).

    Holds the layer's history frames (absolute indices, temporal order, with their page ids
    ``[B, Hkv, frames, ppf]``) and its persistent page ids ``[B, Hkv, C]``; ``pass_context``
    is the runtime's, shared by every layer.
    """

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        pass_context: PassContext,
    ):
        super().__init__(pattern, geometry, num_heads, num_kv_heads, head_dim)
        self._context = pass_context
        # Device state lives in buffers allocated by ``reset`` and only ever updated in place:
        # a CUDA graph captured over one chunk reads them at fixed addresses.
        self._frames: list[int] = []
        self._frame_pages: Tensor | None = None  # int64 [B, Hkv, capacity, ppf]
        self._frame_index_buffer: Tensor | None = None  # int64 [capacity]
        self._persistent: Tensor | None = None  # int64 [B, Hkv, C], valid first, -1 after
        self._num_persistent = 0
        self._committed = 0  # frames this layer has committed
        self._layout: CacheView | None = None  # this chunk's view without query reps

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
        start = self._context.chunk_start
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
        pool = self._context.pool
        if pool is None or self._frame_pages is None:
            raise RuntimeError("the attention runtime must be reset(...) before use")
        return pool

    # -- forward ----------------------------------------------------------------------------

    def _check_inputs(self, q: Tensor, k: Tensor, v: Tensor, pool: PagePool) -> None:
        context = self._context
        if context.phase not in PHASES:
            raise ValueError(
                "phase: attention called outside a pass; run it inside "
                "AttentionRuntime.chunk_pass(start_frame, commit)"
            )
        if context.phase == "commit" and self._committed > context.chunk_start:
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
        if self._layout is None or self._layout.chunk_start != self._context.chunk_start:
            g = self.geometry
            self._layout = CacheView(
                geometry=g,
                num_heads=self.num_heads,
                chunk_start=self._context.chunk_start,
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
                start=self._context.start,
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
        # key reps feed block scores and the persistent set only: Dense and SinkWindow skip
        # pooling them (a reduction over the chunk's keys per layer and pass)
        policy = self.pattern.cache_policy
        pool.write_scratch(k, v, reps=self.pattern.needs_scores or policy.persistent_capacity > 0)
        view = self.view(q)
        table = self.pattern.select(view)
        if self._context.debug:
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
            backend=self._context.backend,
            autotune=self._context.autotune,
        )
        if self._context.phase == "commit":
            self._commit(pool, view)
        return out

    def site_backward(self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor):
        """Not supported: a cached rollout step reads and writes the KV cache (state), so its
        gradient would have to reach past chunks through entries that no longer hold their
        graph. Train a rewritten model in full-sequence mode instead."""
        raise RuntimeError(
            "backward through a cached rollout step (AttentionState) is not supported: the "
            "KV cache is state and carries no gradient; run rollouts under torch.no_grad(), "
            "and train with sparsify(..., mode='full_sequence')"
        )

    # -- commit (see ``runtime.commit``) ----------------------------------------------------

    def _commit_plan(self) -> CommitPlan:
        return plan_commit(
            self.pattern,
            self.geometry,
            self._frames,
            self._num_persistent,
            self._context.chunk_start,
        )

    def _commit(self, pool: PagePool, view: CacheView) -> None:
        """Move the chunk from scratch into the cache; evict; update the persistent set
        (scored with this pass's clean queries, pooled from ``view``)."""
        plan = self._commit_plan()
        execute_commit(
            plan,
            pool,
            view,
            self.pattern,
            self._frame_pages,
            self._frame_index_buffer,
            self._persistent,
            self._num_persistent,
        )
        self._finish_commit(plan)

    def _finish_commit(self, plan: CommitPlan) -> None:
        self._frames = plan.frames
        self._num_persistent = plan.kept
        self._committed = self._context.chunk_start + self.geometry.frames_per_chunk
        self._layout = None

    def replay_commit(self) -> None:
        """The host side of ``_commit`` alone, for a commit pass whose device work a CUDA
        graph replayed: the pool's counts and this layer's frames and counts."""
        plan = self._commit_plan()
        reserve_commit(plan, self._require_pool())
        self._finish_commit(plan)
