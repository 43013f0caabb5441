"""`AttentionRuntime` (the page pool and every layer's `AttentionState`) and `StatefulRunner`
(any chunk-form model driven through the runtime, as a ``ChunkRunner``; the reference model's
is built by `runtime.reference_runner`)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from patterns import Footprint, Pattern, VideoGeometry
from patterns.checks import check_int
from patterns.footprint import evaluate
from runtime.attention_state import PHASES, AttentionState, PassContext
from runtime.checks import check_backend, check_layout, check_max_frames, check_reset_args
from runtime.graphs import PassGraphs
from runtime.pool import PagePool

__all__ = ["AttentionRuntime", "StatefulRunner"]


class AttentionRuntime(nn.Module):
    """The paged KV cache of one model: a `PagePool` shared by ``num_layers`` states.

    Protocol per pass: ``with runtime.chunk_pass(start_frame, commit): model(...)`` — every
    state (``runtime.states[i]``) is called once inside. Chunks come in order: a chunk starts
    right after the last committed frame, and its commit pass advances that by F frames.

    The pool holds ``pattern.footprint().peak_pages()`` pages for the run's chunk count: the
    exact peak of the rollout (bounded patterns reach their ``peak_bound_pages`` and stay).
    debug: validate every block table and every freed page (syncs with the device).
    max_frames: the most frames a rollout may span (the model's positions; None: no limit):
    ``reset`` rejects a longer one before touching the cache.
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
    ):
        super().__init__()
        check_layout(pattern, geometry, num_heads, num_kv_heads, head_dim)
        check_int(num_layers, "num_layers")
        check_backend(backend)
        self._max_frames = check_max_frames(max_frames)
        pattern.check_geometry(geometry)
        self.pattern, self.geometry = pattern, geometry
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self._context = PassContext(backend=backend, debug=debug)
        self.states = nn.ModuleList(self._new_state() for _ in range(num_layers))
        self._num_frames = 0
        self._committed = 0
        self._broken = False
        self._pool_layout: tuple | None = None

    def _new_state(self) -> AttentionState:
        """One layer's state (``runtime.parallel`` makes states of this rank's heads)."""
        return AttentionState(
            self.pattern,
            self.geometry,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self._context,
        )

    @property
    def max_frames(self) -> int | None:
        """The most frames a rollout may span (None: no limit)."""
        return self._max_frames

    @property
    def footprint(self) -> Footprint:
        return self.pattern.footprint()

    @property
    def pool(self) -> PagePool | None:
        return self._context.pool

    @property
    def backend(self) -> str:
        return self._context.backend

    @property
    def committed_frames(self) -> int:
        """Frames committed since ``reset`` (= the start of the next chunk)."""
        return self._committed

    @property
    def current_kv_bytes(self) -> int:
        pool = self._context.pool
        return 0 if pool is None else pool.current_bytes

    @property
    def peak_kv_bytes(self) -> int:
        pool = self._context.pool
        return 0 if pool is None else pool.peak_bytes

    def pool_pages(self, num_frames: int) -> int:
        """Pages the pool needs for a rollout of ``num_frames`` frames (scratch included)."""
        chunks = num_frames // self.geometry.frames_per_chunk
        return evaluate(
            self.footprint.peak_pages(), self.geometry, num_layers=len(self.states), chunks=chunks
        )

    def reset(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, num_frames: int
    ) -> None:
        """Empty the cache and size the pool for ``num_frames`` frames of ``batch_size``
        videos (moves the scorers to ``device``). A rejected call changes nothing."""
        f = self.geometry.frames_per_chunk
        check_reset_args(batch_size, dtype, num_frames, f, self.max_frames)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        chunks = num_frames // f
        history = evaluate(
            self.footprint.history_frames, self.geometry, num_layers=len(self.states), chunks=chunks
        )
        pool, num_pages = self._context.pool, self.pool_pages(num_frames)
        layout = (batch_size, device, dtype, num_pages, self._context.debug)
        if pool is not None and layout == self._pool_layout:
            pool.clear()  # the same layout again: keep the buffers (and CUDA graphs over them)
        else:
            # drop both references to the old pool, so its buffers are freed before the new
            # ones are allocated
            self._context.pool = None
            del pool
            pool = PagePool(
                self.geometry,
                batch_size,
                self.num_kv_heads,
                self.head_dim,
                num_pages,
                self.geometry.pages_per_chunk,
                device=device,
                dtype=dtype,
                check=self._context.debug,
            )
            self._pool_layout = layout
            self._context.start = torch.zeros((), dtype=torch.int64, device=device)
        self.to(device)
        self._context.pool, self._context.phase = pool, None
        for state in self.states:
            state.reset(pool, history)
        self._num_frames, self._committed, self._broken = num_frames, 0, False

    def begin_chunk(self, start_frame: int) -> None:
        """Enter the chunk starting at ``start_frame`` (= the committed frame count)."""
        if self._context.pool is None:
            raise RuntimeError("AttentionRuntime.reset(...) must be called before running chunks")
        if self._broken:
            raise RuntimeError("a failed commit left the layers inconsistent; call reset(...)")
        if self._context.phase is not None:
            raise RuntimeError(f"a {self._context.phase} pass is still open")
        start = operator.index(start_frame)
        if start != self._committed:
            raise ValueError(
                f"start_frame={start}: the next chunk starts right after the last committed "
                f"frame, at {self._committed}"
            )
        if start + self.geometry.frames_per_chunk > self._num_frames:
            raise ValueError(f"start_frame={start} runs past num_frames={self._num_frames}")
        self._context.chunk_start = start
        self._context.start.fill_(start)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """One pass over the chunk entered by ``begin_chunk``: "denoise" or "commit"."""
        if name not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {name!r}")
        if self._context.pool is None or self._broken:
            raise RuntimeError("reset(...) the runtime before running a pass")
        if self._context.phase is not None:
            raise RuntimeError(f"a {self._context.phase} pass is still open")
        start = self._context.chunk_start
        if start != self._committed:
            raise RuntimeError(f"begin_chunk({self._committed}) first")
        self._context.phase = name
        try:
            yield
        except BaseException:
            if name == "commit" and any(s.committed_frames > start for s in self.states):
                self._broken = True
            raise
        else:
            if name == "commit":
                missing = [i for i, s in enumerate(self.states) if s.committed_frames <= start]
                if missing:
                    self._broken = any(s.committed_frames > start for s in self.states)
                    raise RuntimeError(f"commit pass ended without calling layers {missing}")
                self._committed = start + self.geometry.frames_per_chunk
        finally:
            self._context.phase = None

    @contextmanager
    def chunk_pass(self, start_frame: int, commit: bool) -> Iterator[None]:
        """``begin_chunk(start_frame)`` then one ``phase`` ("commit" if commit)."""
        if not isinstance(commit, bool):
            raise TypeError(f"commit must be a bool, got {type(commit).__name__}")
        self.begin_chunk(start_frame)
        with self.phase("commit" if commit else "denoise"):
            yield

    @property
    def start(self) -> Tensor:
        """int64 0-dim device tensor: the current chunk's first frame (see ``PassContext``)."""
        if self._context.start is None:
            raise RuntimeError("AttentionRuntime.reset(...) must be called first")
        return self._context.start

    @property
    def debug(self) -> bool:
        return self._context.debug

    @property
    def autotune(self) -> bool:
        """Tune the PBSA kernel on the first eager call of each shape bucket that has no
        stored winner (`codegen.pbsa_attention`'s ``autotune``; default True). CUDA graphs
        of passes then replay the tuned kernels: denoising passes run eagerly once per
        graph key before their capture."""
        return self._context.autotune

    @autotune.setter
    def autotune(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"autotune must be a bool, got {type(value).__name__}")
        self._context.autotune = value

    def signature(self) -> tuple:
        """Every layer's ``AttentionState.signature()`` (see ``runtime.graphs``)."""
        return tuple(state.signature() for state in self.states)

    def buffer_addresses(self) -> tuple:
        """Where the device state lives (what a CUDA graph of a pass reads and writes)."""
        pool, start = self._context.pool, self._context.start
        if pool is None or start is None:
            return ()
        tensors = [pool.k, pool.v, pool.page_lens, pool.key_reps, pool.used, start]
        for state in self.states:
            tensors += state.buffers()
        return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)

    def invalidate_layouts(self) -> None:
        for state in self.states:
            state.invalidate_layout()

    def replay_commit(self) -> None:
        """The host side of every layer's commit (after a CUDA graph replayed the pass)."""
        for state in self.states:
            state.replay_commit()

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, geometry={self.geometry}, backend={self.backend!r}"


class StatefulRunner(nn.Module):
    """A ``ChunkRunner`` for any chunk-form callable whose self-attentions are the runtime's
    states: ``chunk_fn(x, timestep, context, start_frame) -> flow`` runs inside
    ``attention_runtime.chunk_pass(start_frame, commit)``.

    cuda_graphs: on a CUDA device (and not in debug mode), replay passes as CUDA graphs
        (``runtime.graphs.PassGraphs``); ``chunk_fn`` then gets ``start_frame`` as the
        runtime's 0-dim device tensor, and must accept it. A replay runs no Python inside the
        model: checks there (e.g. of the RoPE range) run only in eager passes.
    """

    def __init__(
        self,
        chunk_fn: Callable[..., Tensor],
        attention_runtime: AttentionRuntime,
        cuda_graphs: bool = True,
    ):
        super().__init__()
        if not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(cuda_graphs).__name__}")
        if not callable(chunk_fn):
            raise TypeError(f"chunk_fn must be callable, got {type(chunk_fn).__name__}")
        if not isinstance(attention_runtime, AttentionRuntime):
            raise TypeError(
                f"attention_runtime must be an AttentionRuntime, got "
                f"{type(attention_runtime).__name__}"
            )
        self.chunk_fn = chunk_fn
        self.runtime = attention_runtime
        self.cuda_graphs = cuda_graphs
        self.graphs = PassGraphs()

    @property
    def max_frames(self) -> int | None:
        """The most frames a rollout may span: the runtime's limit (see `ChunkRunner`)."""
        return self.runtime.max_frames

    @property
    def current_kv_bytes(self) -> int:
        return self.runtime.current_kv_bytes

    @property
    def peak_kv_bytes(self) -> int:
        return self.runtime.peak_kv_bytes

    def reset(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, num_frames: int
    ) -> None:
        buffers = self.runtime.buffer_addresses()
        self.runtime.reset(batch_size, device, dtype, num_frames)
        if self.runtime.buffer_addresses() != buffers:
            self.graphs.clear()  # captured over buffers that are gone

    def forward(
        self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int, commit: bool
    ) -> Tensor:
        runtime = self.runtime
        with runtime.chunk_pass(start_frame, commit):
            graphed = (
                self.cuda_graphs
                and all(isinstance(t, Tensor) for t in (x, timestep, context))
                and x.is_cuda
                and not runtime.debug
            )
            if not graphed:
                return self.chunk_fn(x, timestep, context, start_frame)
            return self.graphs.run(
                "commit" if commit else "denoise",
                runtime.signature(),
                lambda *inputs: self.chunk_fn(*inputs, runtime.start),
                (x, timestep, context),
                before_capture=runtime.invalidate_layouts,
                after_replay=runtime.replay_commit if commit else lambda: None,
                # a denoising pass rewrites the scratch pages with the same values
                idempotent=not commit,
            )
