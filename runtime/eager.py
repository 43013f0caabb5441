"""Self-Forcing's dense cached attention on the reference model: the eager baseline runner.

`EagerRunner(model, cache)` implements the `ChunkRunner` protocol of `runtime.rollout`. Each
self-attention layer gets a slot of the cache; in a denoising pass a chunk attends to the
cached history and to itself without writing anything, in the commit pass (t = 0, clean
latents) each layer appends the chunk's K/V, attends the same way, then drops the frames the
cache policy no longer needs. K is cached after RoPE, i.e. at absolute frame positions.

Which frames stay is a `patterns.CachePolicy`, the same object the paged runtime applies for
a pattern: `GlobalCache()` keeps every committed frame; `RollingCache(window_frames,
sink_frames)` keeps the first `sink_frames` frames plus the most recent ones, so that with the
current chunk at most `window_frames` frames are attended; `FrameCache(policy)` takes any
policy without persistent memory (a dense cache keeps whole frames only).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from patterns import CachePolicy
from runtime.checks import check_reset_args
from runtime.model import CausalWanModel


class _LayerSlot:
    """One layer's cache: K/V buffers [B, capacity·T, Hkv, D] filled in frame order.

    As in Self-Forcing, a pass writes the chunk's K/V in place right after the held history
    and attends to the prefix view, so no pass concatenates or copies the history. Only the
    commit moves data, once per chunk, when frames leave the policy (`compact`).
    """

    def __init__(self, cache: FrameCache):
        self._cache = cache
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.tokens = 0  # committed history tokens at the front of the buffers
        self.committed = 0  # tokens of the chunk being committed, written after the history

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held: history plus a chunk being committed (the buffers' unused
        tail, and a denoising pass's chunk, which the next pass overwrites, are not cache)."""
        if self.k is None:
            return 0
        per_token = self.k[0, 0].numel() * self.k.shape[0] * self.k.element_size()
        return 2 * (self.tokens + self.committed) * per_token

    def keys_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """History ∪ chunk for the chunk's k, v [B, Lc, Hkv, D] (views of the buffers)."""
        held, chunk = self.tokens, k.shape[1]
        if (
            self.k is None
            or self.k.shape[0] != k.shape[0]
            or self.k.shape[2:] != k.shape[2:]
            or self.k.dtype != k.dtype
            or self.k.device != k.device
        ):
            shape = (k.shape[0], self._cache.capacity_tokens, *k.shape[2:])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[:, held : held + chunk] = k
        self.v[:, held : held + chunk] = v
        if self._cache.committing:
            self.committed = chunk
            self._cache._note_commit()
        return self.k[:, : held + chunk], self.v[:, : held + chunk]

    def compact(self, runs: list[tuple[int, int]], per_frame: int) -> None:
        """After a commit: keep the written frames of `runs` ((first position, count),
        ascending), packed to the front of the buffers."""
        held = 0
        for first, count in runs:
            if first != held:
                src = slice(first * per_frame, (first + count) * per_frame)
                dst = slice(held * per_frame, (held + count) * per_frame)
                # clone: source and destination may overlap
                self.k[:, dst] = self.k[:, src].clone()
                self.v[:, dst] = self.v[:, src].clone()
            held += count
        self.tokens = held * per_frame
        self.committed = 0


class DenseFrameCacheBase:
    """The policy side of a frame-granular dense KV cache, shared by `FrameCache` and
    `runtime.ring_cache.RingFrameCache`: the policy (whole frames only), the rollout's frame
    and chunk sizes, the buffer capacity it implies, the commit flag and the KV peak."""

    def __init__(self, policy: CachePolicy) -> None:
        if not isinstance(policy, CachePolicy):
            raise TypeError(f"policy must be a patterns.CachePolicy, got {type(policy).__name__}")
        if policy.persistent_capacity:
            raise ValueError(
                f"policy has persistent_capacity={policy.persistent_capacity}: a dense frame "
                "cache keeps whole frames only (use the paged runtime for persistent memory)"
            )
        self.policy = policy
        self._tokens_per_frame = 0
        self._frames_per_chunk = 0
        self._peak = 0
        self.committing = False

    @property
    def peak_kv_bytes(self) -> int:
        """Largest `kv_bytes` since `reset`: at the end of a commit pass every layer holds
        its history and the new chunk, before the frames that left the policy are dropped."""
        return self._peak

    def _capacity_frames(self, frames_per_chunk: int, num_frames: int) -> int:
        """The most frames the buffers hold in a rollout of ``num_frames`` frames; a
        ValueError, before anything changes, when the policy's window cannot hold a chunk."""
        self.policy.check_fits(frames_per_chunk)
        return self.policy.attended_frames(num_frames)

    def _retained_runs(self, start_frame: int) -> tuple[range, ...]:
        """The frames the policy keeps once the chunk at ``start_frame`` is committed."""
        f = self._frames_per_chunk
        return self.policy.retained_runs(start_frame + f, f)

    def _start_rollout(self, tokens_per_frame: int, frames_per_chunk: int) -> None:
        self._tokens_per_frame, self._frames_per_chunk = tokens_per_frame, frames_per_chunk
        self._peak = 0
        self.committing = False


class FrameCache(DenseFrameCacheBase):
    """Frame-granular dense KV cache shared by the layers of one model.

    All layers hold the same frames, so the frame bookkeeping (plain Python ints) lives here
    and the tensors live in the per-layer slots. The `policy` says which frames stay after
    each commit and how many frames the buffers must hold at most.
    """

    def __init__(self, policy: CachePolicy) -> None:
        super().__init__(policy)
        self._slots: list[_LayerSlot] = []
        self._frames: list[int] = []
        self._capacity = 0
        self._keep: list[tuple[int, int]] = []
        self._pending: list[int] = []

    @property
    def frames(self) -> tuple[int, ...]:
        """Absolute indices of the frames held, ascending."""
        return tuple(self._frames)

    @property
    def capacity_tokens(self) -> int:
        return self._capacity * self._tokens_per_frame

    @property
    def kv_bytes(self) -> int:
        """Bytes of committed K and V currently held, summed over layers."""
        return sum(slot.nbytes for slot in self._slots)

    def reset(
        self, num_layers: int, tokens_per_frame: int, frames_per_chunk: int, num_frames: int
    ) -> None:
        """Empty the cache and size it for `num_layers` layers and a rollout of `num_frames`."""
        self._capacity = self._capacity_frames(frames_per_chunk, num_frames)
        self._start_rollout(tokens_per_frame, frames_per_chunk)
        self._slots = [_LayerSlot(self) for _ in range(num_layers)]
        self._frames = []

    def begin_chunk(self, start_frame: int, commit: bool) -> list[_LayerSlot]:
        """Enter a pass over the chunk starting at `start_frame`; returns the layer slots."""
        if commit:
            pending = self._frames + list(range(start_frame, start_frame + self._frames_per_chunk))
            self._keep = self._kept_runs(pending, start_frame)
            self._pending = pending
        self.committing = commit
        return self._slots

    def _kept_runs(self, pending: list[int], start_frame: int) -> list[tuple[int, int]]:
        """(first position in `pending`, count) of each run of frames the policy retains."""
        runs = []
        for run in self._retained_runs(start_frame):
            first = pending.index(run.start) if run.start in pending else None
            if first is None or pending[first : first + len(run)] != list(run):
                raise RuntimeError(f"the policy retains frames {list(run)} that are not held")
            runs.append((first, len(run)))
        return runs

    def end_chunk(self, ok: bool) -> None:
        """Leave the pass. A commit that failed part-way changes nothing: slots only write
        past their held history, and the history advances here, for all layers at once."""
        if self.committing and ok:
            for slot in self._slots:
                slot.compact(self._keep, self._tokens_per_frame)
            self._frames = [f for first, n in self._keep for f in self._pending[first : first + n]]
        elif self.committing:
            for slot in self._slots:
                slot.committed = 0
        self.committing = False

    def _note_commit(self) -> None:
        """Layers hold history ∪ chunk until the commit pass ends: track the peak."""
        self._peak = max(self._peak, self.kv_bytes)

    def __repr__(self) -> str:
        return f"FrameCache({self.policy!r})"


class GlobalCache(FrameCache):
    """Keeps every committed frame (Self-Forcing's global KV cache)."""

    def __init__(self) -> None:
        super().__init__(CachePolicy())

    def __repr__(self) -> str:
        return "GlobalCache()"


class RollingCache(FrameCache):
    """Keeps the first `sink_frames` frames and the most recent ones, so that a chunk attends
    to at most `window_frames` frames including itself."""

    def __init__(self, window_frames: int, sink_frames: int = 0):
        for name, value in (("window_frames", window_frames), ("sink_frames", sink_frames)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        super().__init__(CachePolicy(window_frames, sink_frames))
        self.window_frames = window_frames
        self.sink_frames = sink_frames

    def __repr__(self) -> str:
        return f"RollingCache(window_frames={self.window_frames}, sink_frames={self.sink_frames})"


SELF_FORCING_WINDOW_FRAMES = 21  # Self-Forcing's cache: 21 latent frames (a 5 s video)


def self_forcing_cache(num_frames: int) -> FrameCache:
    """Self-Forcing's dense cache for a rollout of `num_frames` latent frames: global while
    the video fits its 21 frames, beyond that a rolling 21-frame window without sink."""
    if num_frames <= SELF_FORCING_WINDOW_FRAMES:
        return GlobalCache()
    return RollingCache(SELF_FORCING_WINDOW_FRAMES)


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a and b name the same device (an index-less "cuda" matches any index)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_chunk_call(
    x: object,
    start_frame: object,
    commit: object,
    *,
    next_frame: int,
    num_frames: int,
    frames_per_chunk: int,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """The checks of a dense runner's pass (``ChunkRunner.__call__``) before it touches its
    cache: ``start_frame`` an int equal to ``next_frame`` with the chunk inside
    ``num_frames``, ``commit`` a bool, ``x`` a tensor of ``batch_size`` videos in ``dtype`` on
    ``device`` (the reset's). Returns ``start_frame`` as an int."""
    try:
        start = operator.index(start_frame)
    except TypeError:
        raise TypeError(f"start_frame must be an int, got {type(start_frame).__name__}") from None
    if not isinstance(commit, bool):
        raise TypeError(f"commit must be a bool, got {type(commit).__name__}")
    if start != next_frame:
        raise ValueError(f"start_frame={start} but the next chunk starts at frame {next_frame}")
    if start + frames_per_chunk > num_frames:
        raise ValueError(f"start_frame={start} runs past num_frames={num_frames} given to reset")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.ndim >= 1 and x.shape[0] != batch_size:
        raise ValueError(f"x has batch {x.shape[0]}, reset was for {batch_size}")
    if x.dtype != dtype or not same_device(x.device, device):
        raise ValueError(f"x is {x.dtype} on {x.device}, reset was for {dtype} on {device}")
    return start


class DenseRunnerBase:
    """The rollout state and checks of a dense ``ChunkRunner`` of ``model``: the reset's
    batch, device, dtype and frames, the next chunk's frame, and a pass bracketed by the
    cache's ``begin_chunk``/``end_chunk``, shared by `EagerRunner` and
    `runtime.compiled_dense.CompiledDenseRunner`. A subclass sets ``self.cache`` (with
    ``begin_chunk``, ``end_chunk``, ``kv_bytes`` and ``peak_kv_bytes``) and gives
    ``_reset_cache`` and ``_pass``.
    """

    _name = "DenseRunnerBase"  # the class a call before reset names in its error

    def __init__(self, model: CausalWanModel):
        if not isinstance(model, CausalWanModel):
            raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
        self.model = model
        self._batch_size: int | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._num_frames = 0
        self._next_frame = 0

    @property
    def frames_per_chunk(self) -> int:
        return self.model.config.frames_per_chunk

    @property
    def max_frames(self) -> int:
        """The most frames a rollout may span: the model's (its RoPE table)."""
        return self.model.config.max_frames

    @property
    def next_frame(self) -> int:
        """Absolute index of the first frame of the next chunk (= frames committed)."""
        return self._next_frame

    @property
    def current_kv_bytes(self) -> int:
        return self.cache.kv_bytes

    @property
    def peak_kv_bytes(self) -> int:
        return self.cache.peak_kv_bytes

    def reset(self, batch_size: int, device, dtype: torch.dtype, num_frames: int) -> None:
        """Empty the cache for a rollout of `num_frames` frames of `batch_size` videos (at
        most `max_frames`). A rejected call changes nothing."""
        cfg = self.model.config
        check_reset_args(batch_size, dtype, num_frames, cfg.frames_per_chunk, self.max_frames)
        device = self._reset_cache(batch_size, torch.device(device), dtype, num_frames)
        self._batch_size, self._device, self._dtype = batch_size, device, dtype
        self._num_frames, self._next_frame = num_frames, 0

    def _reset_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype, num_frames: int
    ) -> torch.device:
        """Empty and size the cache for checked reset arguments; returns the device that
        the calls' inputs must be on."""
        raise NotImplementedError

    def __call__(
        self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int, commit: bool
    ) -> Tensor:
        """Flow prediction for the chunk x [B, C, frames_per_chunk, H, W] at `start_frame`.

        timestep: [B, F] or [B]; context: [B, L_text, text_dim]. With `commit` the chunk's
        clean K/V are written to the cache (the context pass at t = 0).
        """
        start = self._check_call(x, start_frame, commit)
        slots = self.cache.begin_chunk(start, commit)
        try:
            out = self._pass(x, timestep, context, start, slots)
        except BaseException:
            self.cache.end_chunk(ok=False)
            raise
        self.cache.end_chunk(ok=True)
        if commit:
            self._next_frame += self.frames_per_chunk
        return out

    def _pass(self, x: Tensor, timestep: Tensor, context: Tensor, start: int, slots) -> Tensor:
        """The model's pass over the chunk; ``slots`` is what ``cache.begin_chunk`` returned."""
        raise NotImplementedError

    def _check_call(self, x: Tensor, start_frame: int, commit: bool) -> int:
        """The checks of a call before it touches the cache; returns the start frame."""
        if self._batch_size is None:
            raise RuntimeError(f"{self._name}.reset(...) must be called before running chunks")
        return check_chunk_call(
            x,
            start_frame,
            commit,
            next_frame=self._next_frame,
            num_frames=self._num_frames,
            frames_per_chunk=self.frames_per_chunk,
            batch_size=self._batch_size,
            dtype=self._dtype,
            device=self._device,
        )


class EagerRunner(DenseRunnerBase):
    """Runs `CausalWanModel` chunk by chunk with a dense KV cache (a `ChunkRunner`).

    Chunks must come in order: every call is for the chunk starting at `next_frame`, and a
    commit advances it by `frames_per_chunk`. A rejected call raises before touching the cache.
    """

    _name = "EagerRunner"

    def __init__(self, model: CausalWanModel, cache: FrameCache | None = None):
        super().__init__(model)
        if cache is not None and not isinstance(cache, FrameCache):
            raise TypeError(
                f"cache must be a FrameCache (e.g. GlobalCache, RollingCache), "
                f"got {type(cache).__name__}"
            )
        self.cache = GlobalCache() if cache is None else cache

    def _reset_cache(
        self, batch_size: int, device: torch.device, dtype: torch.dtype, num_frames: int
    ) -> torch.device:
        cfg = self.model.config
        self.cache.reset(cfg.num_layers, cfg.tokens_per_frame, cfg.frames_per_chunk, num_frames)
        return device

    def _pass(
        self, x: Tensor, timestep: Tensor, context: Tensor, start: int, slots: list[_LayerSlot]
    ) -> Tensor:
        return self.model.forward_cached(x, timestep, context, start, slots)
