"""Head-parallel sparse rollouts on torch.distributed: each rank owns whole heads.

Every rank runs the whole model on the whole chunk (the non-attention work is replicated),
and each self-attention layer computes only this rank's heads: it slices its heads of q, k, v,
runs the ordinary `AttentionState` on them (its own `PagePool` of its kv heads, its persistent
set, its block tables, its heads' slice of the learned scorer) and all-gathers the outputs
along the head axis, so every rank continues with the same full attention output. Nothing of
the sparse state crosses ranks: selection, scoring and the persistent update are per kv head
already (``BlockScorer.importance`` sums a kv head's own GQA group), so a rank's pages, tables
and ids equal the rows of its heads in one process, and the KV bytes per rank are the
single-process bytes / N.

Why not Ulysses (sequence-sharded activations, all-to-all to head sharding around
attention): it would divide the non-attention work too, but only for a model whose every
other op is token-wise and after re-tracing it at 1/N of the sequence. `sparsify` rewrites
arbitrary captured graphs (Wan's per-frame adaLN unflattens frames, the head unpatchifies
them), so splitting the sequence would mean rewriting every op of the graph, while this
rewrite touches only the attention op. The all-gather moves ``L·dim·(N−1)/N`` values per
layer and rank, Ulysses' four all-to-alls ``4·L·dim·(N−1)/N²``: more at N = 2, equal at 4,
less at 6. The price is Amdahl's: the speed-up is at most ``1 / ((1 − a) + a/N)`` for an
attention share ``a`` of the time, while the KV cache (what outgrows one GPU) is divided by N
exactly. See docs/SCALE_OUT.md.

A rejected call is rejected on every rank: `HeadParallelRuntime.reset` and
`HeadParallelRunner` run their checks and then agree over a host-side gloo group (one small
exchange per pass, no device sync) before any rank touches its cache or enters a collective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from patterns import Pattern, VideoGeometry
from runtime.attention_runtime import AttentionRuntime, StatefulRunner
from runtime.attention_state import AttentionState, PassContext
from runtime.checks import check_layout, check_reset_args
from runtime.distributed import REJECTIONS, HeadGroup, RankDisagreement, describe_inputs
from runtime.model import CausalWanModel
from runtime.reference_runner import bind_runner

__all__ = [
    "HeadParallelRunner",
    "HeadParallelRuntime",
    "HeadParallelState",
    "head_parallel_reference_runner",
    "stateful_runner",
]


def _check_heads(name: str, x: object, heads: int) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[2] != heads:
        got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be BLHD [B, L, {heads}, D] (every head), got {got}")


class HeadParallelState(AttentionState):
    """An `AttentionState` of this rank's heads, called with every head.

    forward(q [B, Lc, H, D], k, v [B, Lc, Hkv, D]) → [B, Lc, H, D], the same on every rank:
    this rank's heads through the paged cache, then an all-gather over the heads.
    """

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        heads: HeadGroup,
        head_dim: int,
        pass_context: PassContext,
    ):
        super().__init__(
            pattern, geometry, heads.local_heads, heads.local_kv_heads, head_dim, pass_context
        )
        self.heads = heads

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        heads = self.heads
        _check_heads("q", q, heads.num_heads)
        _check_heads("k", k, heads.num_kv_heads)
        _check_heads("v", v, heads.num_kv_heads)
        # every check of the local call runs before the gather: a rejected call is rejected
        # on every rank (they all see the same activations), and no rank waits in a gather
        out = super().forward(heads.local_q(q), heads.local_kv(k), heads.local_kv(v))
        return heads.gather_heads(out)


class HeadParallelRuntime(AttentionRuntime):
    """An `AttentionRuntime` of this rank's heads: ``num_heads`` / ``num_kv_heads`` are the
    model's (all ranks), its pool and states hold ``num_heads / N`` and ``num_kv_heads / N``
    (``self.num_heads``, ``self.num_kv_heads``; ``self.heads`` says which).

    group: the process group (None: the default one). N must divide ``num_kv_heads``.
    ``current_kv_bytes`` / ``peak_kv_bytes`` are this rank's.
    """

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: str = "auto",
        debug: bool = False,
        max_frames: int | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        check_layout(pattern, geometry, num_heads, num_kv_heads, head_dim)
        # set before the base class makes the states (``_new_state`` reads it)
        self.heads = HeadGroup(num_heads, num_kv_heads, group)
        super().__init__(
            pattern,
            geometry,
            num_layers,
            self.heads.local_heads,
            self.heads.local_kv_heads,
            head_dim,
            backend,
            debug,
            max_frames,
        )

    def _new_state(self) -> HeadParallelState:
        return HeadParallelState(
            self.pattern, self.geometry, self.heads, self.head_dim, self._context
        )

    @torch.no_grad()
    def load_scorers_from(self, runtime: AttentionRuntime) -> None:
        """Copy this rank's heads of every layer's learned scorer from a single-process
        ``runtime`` of the same model (e.g. one with trained scorers loaded)."""
        if not isinstance(runtime, AttentionRuntime) or isinstance(runtime, HeadParallelRuntime):
            raise TypeError(
                f"runtime must be a single-process AttentionRuntime, got {type(runtime).__name__}"
            )
        theirs = (len(runtime.states), runtime.num_heads, runtime.num_kv_heads, runtime.head_dim)
        ours = (len(self.states), self.heads.num_heads, self.heads.num_kv_heads, self.head_dim)
        if theirs != ours:
            raise ValueError(
                f"runtime has (layers, H, Hkv, D) = {theirs}, this runtime's model {ours}"
            )
        q, kv = self.heads.head_range, self.heads.kv_head_range
        for local, full in zip(self.states, runtime.states, strict=True):
            local.scorer.wq.copy_(full.scorer.wq[q.start : q.stop])
            local.scorer.wk.copy_(full.scorer.wk[kv.start : kv.stop])

    def reset(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, num_frames: int
    ) -> None:
        """`AttentionRuntime.reset`, agreed by every rank first: a call rejected on one rank
        is rejected on all, and no rank's cache changes."""
        error, facts = None, ()
        try:
            check_reset_args(
                batch_size, dtype, num_frames, self.geometry.frames_per_chunk, self.max_frames
            )
            facts = ("reset", *describe_inputs(batch_size, torch.device(device), dtype, num_frames))
        except REJECTIONS as exc:
            error = exc
        self.heads.agree(error, facts)
        super().reset(batch_size, device, dtype, num_frames)

    def agree_on_pass(self, start_frame: int, commit: bool, inputs: tuple) -> None:
        """Check a pass over the chunk at ``start_frame`` (what ``chunk_pass`` checks) and
        agree on it and on ``inputs``' shapes with every rank; a rejection anywhere raises on
        every rank and leaves the cache as it was."""
        context = self._context
        saved, error = context.chunk_start, None
        try:
            if not isinstance(commit, bool):
                raise TypeError(f"commit must be a bool, got {type(commit).__name__}")
            self.begin_chunk(start_frame)
        except REJECTIONS as exc:
            error = exc
        try:
            self.heads.agree(error, ("pass", commit, *describe_inputs(start_frame, *inputs)))
        except RankDisagreement:
            if error is None:  # begin_chunk moved to the chunk: move back
                context.chunk_start = saved
                context.start.fill_(saved)
            raise


class HeadParallelRunner(StatefulRunner):
    """A `StatefulRunner` over a `HeadParallelRuntime`: every rank calls it with the same
    arguments (``generate`` with the same seed and context does); each pass is agreed
    (``HeadParallelRuntime.agree_on_pass``) before it runs. The flow it returns is the
    same on every rank."""

    def __init__(
        self,
        chunk_fn: Callable[..., Tensor],
        attention_runtime: HeadParallelRuntime,
        cuda_graphs: bool = True,
    ):
        if not isinstance(attention_runtime, HeadParallelRuntime):
            raise TypeError(
                f"attention_runtime must be a HeadParallelRuntime, got "
                f"{type(attention_runtime).__name__}"
            )
        super().__init__(chunk_fn, attention_runtime, cuda_graphs)

    def forward(
        self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int, commit: bool
    ) -> Tensor:
        self.runtime.agree_on_pass(start_frame, commit, (x, timestep, context))
        return super().forward(x, timestep, context, start_frame, commit)


def stateful_runner(
    chunk_fn: Callable[..., Tensor], runtime: AttentionRuntime, cuda_graphs: bool = True
) -> StatefulRunner:
    """The runner of ``runtime``: a `HeadParallelRunner` for a `HeadParallelRuntime`."""
    if isinstance(runtime, HeadParallelRuntime):
        return HeadParallelRunner(chunk_fn, runtime, cuda_graphs)
    return StatefulRunner(chunk_fn, runtime, cuda_graphs)


def head_parallel_reference_runner(
    model: CausalWanModel,
    pattern: Pattern,
    *,
    group: dist.ProcessGroup | None = None,
    page_size: int = 128,
    q_block: int = 128,
    backend: str = "auto",
    debug: bool = False,
    cuda_graphs: bool = True,
) -> HeadParallelRunner:
    """`runtime.reference_runner` with this rank's heads (``group``: None for the default
    process group): a `HeadParallelRunner` of a copy of ``model``."""
    return bind_runner(
        model,
        pattern,
        HeadParallelRuntime,
        HeadParallelRunner,
        page_size=page_size,
        q_block=q_block,
        backend=backend,
        debug=debug,
        cuda_graphs=cuda_graphs,
        group=group,
    )
