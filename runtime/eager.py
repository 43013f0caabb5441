"""Self-Forcing's dense cached attention on the reference model: the eager baseline runner.

`EagerRunner(model, cache)` implements the `ChunkRunner` protocol of `runtime.rollout`. Each
self-attention layer gets a slot of the cache; in a denoising pass a chunk attends to the
cached history and to itself without writing anything, in the commit pass (t = 0, clean
latents) each layer appends the chunk's K/V, attends the same way, then drops the frames the
cache policy no longer needs. K is cached after RoPE, i.e. at absolute frame positions.

Cache policies: `GlobalCache()` keeps every committed frame; `RollingCache(window_frames,
sink_frames)` keeps the first `sink_frames` frames plus the most recent ones, so that with the
current chunk at most `window_frames` frames are attended.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from runtime.model import CausalWanModel


class _LayerSlot:
    """One layer's cached K/V, [B, frames·T, Hkv, D] each (None while empty)."""

    def __init__(self, cache: FrameCache):
        self._cache = cache
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes

    def keys_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """History ∪ chunk for the chunk's k, v [B, Lc, Hkv, D]; stores it when committing."""
        if self.k is not None:
            k_all, v_all = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        else:
            k_all, v_all = k, v
        if self._cache.committing:
            self._cache._store(self, k_all, v_all, chunk_bytes=k.nbytes + v.nbytes)
        return k_all, v_all


class FrameCache:
    """Frame-granular dense KV cache shared by the layers of one model.

    All layers hold the same frames, so the frame bookkeeping (plain Python ints) lives here
    and the tensors live in the per-layer slots. A policy says, after each commit, how many
    of the oldest frames (the sink) and of the newest frames to keep.
    """

    def __init__(self) -> None:
        self._slots: list[_LayerSlot] = []
        self._frames: list[int] = []
        self._tokens_per_frame = 0
        self._frames_per_chunk = 0
        self._bytes = 0
        self._peak = 0
        self.committing = False
        self._keep: tuple[int, int] = (0, 0)
        self._pending: list[int] = []
        self._written = 0

    # -- policy -------------------------------------------------------------------------------

    def _check_fits(self, frames_per_chunk: int) -> None:
        """Raise ValueError when the policy cannot hold one chunk of `frames_per_chunk`."""

    def _retain(self, frames: list[int]) -> tuple[int, int]:
        """(oldest, newest) counts of `frames` (ascending) to keep for the next chunk."""
        raise NotImplementedError

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def frames(self) -> tuple[int, ...]:
        """Absolute indices of the frames held, ascending."""
        return tuple(self._frames)

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V currently held, summed over layers."""
        return self._bytes

    @property
    def peak_kv_bytes(self) -> int:
        """Largest `kv_bytes` since `reset`, counting a chunk being committed before the
        layer drops the frames that left the policy (so Σ layers history + one chunk)."""
        return self._peak

    def reset(self, num_layers: int, tokens_per_frame: int, frames_per_chunk: int) -> None:
        """Empty the cache and size it for a model of `num_layers` self-attention layers."""
        self._check_fits(frames_per_chunk)
        self._slots = [_LayerSlot(self) for _ in range(num_layers)]
        self._frames = []
        self._tokens_per_frame = tokens_per_frame
        self._frames_per_chunk = frames_per_chunk
        self._bytes = self._peak = 0
        self.committing = False

    def begin_chunk(self, start_frame: int, commit: bool) -> list[_LayerSlot]:
        """Enter a pass over the chunk starting at `start_frame`; returns the layer slots."""
        self.committing = commit
        self._written = 0
        if commit:
            self._pending = self._frames + list(
                range(start_frame, start_frame + self._frames_per_chunk)
            )
            self._keep = self._retain(self._pending)
        return self._slots

    def end_chunk(self, ok: bool) -> bool:
        """Leave the pass; False when a failed commit left the layers inconsistent."""
        consistent = True
        if self.committing:
            if ok:
                oldest, newest = self._keep
                tail = self._pending[len(self._pending) - newest :] if newest else []
                self._frames = self._pending[:oldest] + tail
            else:
                consistent = self._written == 0
        self.committing = False
        return consistent

    def _store(self, slot: _LayerSlot, k_all: Tensor, v_all: Tensor, chunk_bytes: int) -> None:
        """Commit: the layer now holds history ∪ chunk, then only the retained frames."""
        self._peak = max(self._peak, self._bytes + chunk_bytes)
        oldest, newest = self._keep
        per_frame = self._tokens_per_frame
        if oldest + newest < len(self._pending):
            # Copies rather than views, so that evicted frames are really freed.
            head = slice(0, oldest * per_frame)
            tail = slice(k_all.shape[1] - newest * per_frame, k_all.shape[1])
            k_all = torch.cat([k_all[:, head], k_all[:, tail]], dim=1)
            v_all = torch.cat([v_all[:, head], v_all[:, tail]], dim=1)
        self._bytes -= slot.nbytes
        slot.k, slot.v = k_all, v_all
        self._bytes += slot.nbytes
        self._written += 1


class GlobalCache(FrameCache):
    """Keeps every committed frame (Self-Forcing's global KV cache)."""

    def _retain(self, frames: list[int]) -> tuple[int, int]:
        return len(frames), 0

    def __repr__(self) -> str:
        return "GlobalCache()"


class RollingCache(FrameCache):
    """Keeps the first `sink_frames` frames and the most recent ones, so that a chunk attends
    to at most `window_frames` frames including itself."""

    def __init__(self, window_frames: int, sink_frames: int = 0):
        super().__init__()
        if not isinstance(window_frames, int) or isinstance(window_frames, bool):
            raise TypeError(f"window_frames must be an int, got {type(window_frames).__name__}")
        if not isinstance(sink_frames, int) or isinstance(sink_frames, bool):
            raise TypeError(f"sink_frames must be an int, got {type(sink_frames).__name__}")
        if window_frames <= 0:
            raise ValueError(f"window_frames must be positive, got {window_frames}")
        if sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {sink_frames}")
        self.window_frames = window_frames
        self.sink_frames = sink_frames

    def _check_fits(self, frames_per_chunk: int) -> None:
        if self.window_frames < self.sink_frames + frames_per_chunk:
            raise ValueError(
                f"window_frames={self.window_frames} must be at least sink_frames="
                f"{self.sink_frames} + frames_per_chunk={frames_per_chunk}"
            )

    def _retain(self, frames: list[int]) -> tuple[int, int]:
        sink = sum(1 for f in frames if f < self.sink_frames)
        recent = self.window_frames - self._frames_per_chunk - sink
        return sink, min(recent, len(frames) - sink)

    def __repr__(self) -> str:
        return f"RollingCache(window_frames={self.window_frames}, sink_frames={self.sink_frames})"


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class EagerRunner:
    """Runs `CausalWanModel` chunk by chunk with a dense KV cache (a `ChunkRunner`).

    Chunks must come in order: every call is for the chunk starting at `next_frame`, and a
    commit advances it by `frames_per_chunk`. A rejected call raises before touching the cache.
    """

    def __init__(self, model: CausalWanModel, cache: FrameCache | None = None):
        if not isinstance(model, CausalWanModel):
            raise TypeError(f"model must be a CausalWanModel, got {type(model).__name__}")
        if cache is not None and not isinstance(cache, FrameCache):
            raise TypeError(
                f"cache must be a GlobalCache or RollingCache, got {type(cache).__name__}"
            )
        self.model = model
        self.cache = GlobalCache() if cache is None else cache
        self._batch_size: int | None = None
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._num_frames = 0
        self._next_frame = 0
        self._broken = False

    @property
    def frames_per_chunk(self) -> int:
        return self.model.config.frames_per_chunk

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
        """Empty the cache for a rollout of `num_frames` frames of `batch_size` videos."""
        cfg = self.model.config
        for name, value in (("batch_size", batch_size), ("num_frames", num_frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_frames % cfg.frames_per_chunk or num_frames > cfg.rope_positions:
            raise ValueError(
                f"num_frames must be a multiple of frames_per_chunk={cfg.frames_per_chunk} "
                f"and at most {cfg.rope_positions}, got {num_frames}"
            )
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        device = torch.device(device)
        self.cache.reset(cfg.num_layers, cfg.tokens_per_frame, cfg.frames_per_chunk)
        self._batch_size, self._device, self._dtype = batch_size, device, dtype
        self._num_frames = num_frames
        self._next_frame = 0
        self._broken = False

    def __call__(
        self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int, commit: bool
    ) -> Tensor:
        """Flow prediction for the chunk x [B, C, frames_per_chunk, H, W] at `start_frame`.

        timestep: [B, F] or [B]; context: [B, L_text, text_dim]. With `commit` the chunk's
        clean K/V are written to the cache (the context pass at t = 0).
        """
        if self._batch_size is None:
            raise RuntimeError("EagerRunner.reset(...) must be called before running chunks")
        if self._broken:
            raise RuntimeError("a failed commit left the cache inconsistent; call reset(...)")
        try:
            start = operator.index(start_frame)
        except TypeError:
            raise TypeError(
                f"start_frame must be an int, got {type(start_frame).__name__}"
            ) from None
        if not isinstance(commit, bool):
            raise TypeError(f"commit must be a bool, got {type(commit).__name__}")
        if start != self._next_frame:
            raise ValueError(
                f"start_frame={start} but the next chunk starts at frame {self._next_frame}"
            )
        if start + self.frames_per_chunk > self._num_frames:
            raise ValueError(
                f"start_frame={start} runs past num_frames={self._num_frames} given to reset"
            )
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.ndim >= 1 and x.shape[0] != self._batch_size:
            raise ValueError(f"x has batch {x.shape[0]}, reset was for {self._batch_size}")
        if x.dtype != self._dtype or not _same_device(x.device, self._device):
            raise ValueError(
                f"x is {x.dtype} on {x.device}, reset was for {self._dtype} on {self._device}"
            )
        slots = self.cache.begin_chunk(start, commit)
        try:
            out = self.model.forward_cached(x, timestep, context, start, slots)
        except BaseException:
            self._broken = not self.cache.end_chunk(ok=False)
            raise
        self.cache.end_chunk(ok=True)
        if commit:
            self._next_frame += self.frames_per_chunk
        return out
