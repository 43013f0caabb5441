"""`RingFrameCache`: Self-Forcing's dense KV cache in fixed buffers that never move.

The eager `runtime.eager.FrameCache` packs the held frames to the front of its buffers after
every commit that drops frames (a rolling window shifts 18 of 21 frames per chunk). Attention
without a mask does not depend on the order of its keys (K is cached after RoPE, at absolute
positions), so this cache instead writes each chunk into the frame slots that the dropped
frames left: nothing is ever moved, every buffer keeps its address (a CUDA graph of a pass
replays over it), and where a chunk goes is one int64 device tensor of token indices
(`write_index`), so one graph serves every chunk of the steady state.

Host bookkeeping only, plus the in-place writes: which frame each slot holds, the slots of
the chunk being run, the attended prefix, the KV peak. A pass attends to the prefix of
`attended_tokens` tokens of the buffers, which holds exactly history ∪ chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patterns import CachePolicy
from runtime.eager import DenseFrameCacheBase

__all__ = ["RingFrameCache"]


class RingFrameCache(DenseFrameCacheBase):
    """Per-layer K/V buffers ``[B, capacity·T, Hkv, D]`` filled frame slot by frame slot.

    policy: which frames stay after each commit (a `patterns.CachePolicy` without persistent
    memory: `CachePolicy()` is Self-Forcing's global cache, `CachePolicy(21)` its rolling
    21-frame window, which is the global cache while a video fits 21 frames).
    """

    def __init__(self, policy: CachePolicy) -> None:
        super().__init__(policy)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.write_index: Tensor | None = None  # int64 [F·T]: the chunk's token slots
        self._offsets: Tensor | None = None  # int64 [F·T]: 0 … F·T − 1
        self._slots: list[int | None] = []  # absolute frame held by each frame slot
        self._held = 0  # frames held (the slots that are not None)
        self._chunk_start: int | None = None
        self._chunk_slots: list[int] = []  # the frame slots of the chunk being run
        self._frame_bytes = 0  # K and V of one frame, all layers

    # -- sizes ------------------------------------------------------------------------------

    @property
    def capacity_frames(self) -> int:
        return len(self._slots)

    @property
    def frames(self) -> tuple[int, ...]:
        """Absolute indices of the committed frames held, ascending."""
        return tuple(sorted(f for f in self._slots if f is not None))

    @property
    def kv_bytes(self) -> int:
        """Bytes of committed K and V held over all layers (plus the chunk while a commit
        pass runs), as `FrameCache.kv_bytes` counts them."""
        held = self._held + (self._frames_per_chunk if self.committing else 0)
        return held * self._frame_bytes

    @property
    def attended_tokens(self) -> int:
        """Tokens of the prefix the current pass attends to (history ∪ chunk)."""
        return (self._held + self._frames_per_chunk) * self._tokens_per_frame

    def buffer_addresses(self) -> tuple[int, ...]:
        """Where the buffers live (what a CUDA graph of a pass reads and writes)."""
        tensors = [*self.k, *self.v, *([self.write_index] if self.write_index is not None else [])]
        return tuple(t.data_ptr() for t in tensors)

    # -- rollout ----------------------------------------------------------------------------

    def reset(
        self,
        num_layers: int,
        tokens_per_frame: int,
        frames_per_chunk: int,
        num_frames: int,
        like: Tensor,
    ) -> None:
        """Empty the cache for a rollout of ``num_frames`` frames; K/V of one token per layer
        are shaped, typed and placed like ``like`` ``[B, Hkv, D]``. Buffers of the same
        layout are kept (CUDA graphs over them stay valid), others reallocated."""
        capacity = self._capacity_frames(frames_per_chunk, num_frames)
        shape = (like.shape[0], capacity * tokens_per_frame, *like.shape[1:])
        kept = (
            len(self.k) == num_layers
            and tuple(self.k[0].shape) == shape
            and self.k[0].dtype == like.dtype
            and self.k[0].device == like.device
        )
        if not kept:
            self.k, self.v = [], []  # free the old buffers before allocating the new ones
            self.k = [like.new_empty(shape) for _ in range(num_layers)]
            self.v = [like.new_empty(shape) for _ in range(num_layers)]
        chunk_tokens = frames_per_chunk * tokens_per_frame
        index = self.write_index
        if index is None or index.device != like.device or index.numel() != chunk_tokens:
            self._offsets = torch.arange(chunk_tokens, device=like.device)
            self.write_index = self._offsets.clone()
        self._slots = [None] * capacity
        self._held = 0
        self._chunk_start = None
        self._start_rollout(tokens_per_frame, frames_per_chunk)
        self._frame_bytes = 2 * num_layers * tokens_per_frame * like.numel() * like.element_size()

    def begin_chunk(self, start_frame: int, commit: bool) -> None:
        """Enter a pass over the chunk at ``start_frame``. Its frames go to the lowest free
        frame slots (chosen once per chunk: its passes all write there), which with the held
        frames always fill a prefix of the buffers for a `CachePolicy` (frames leave in
        temporal order, and the buffers hold the most frames a chunk attends to)."""
        if start_frame != self._chunk_start:
            f, t = self._frames_per_chunk, self._tokens_per_frame
            chunk = [s for s, frame in enumerate(self._slots) if frame is None][:f]
            used = {s for s, frame in enumerate(self._slots) if frame is not None}
            if len(chunk) < f or used.union(chunk) != set(range(self._held + f)):
                raise RuntimeError(
                    f"the cache policy {self.policy} leaves no prefix of the buffers for the "
                    f"chunk at frame {start_frame} (free slots: {chunk}, held: {sorted(used)})"
                )
            self._chunk_start, self._chunk_slots = start_frame, chunk
            # frame j of the chunk goes to slot chunk[j]: kernels with the offset as their
            # scalar argument, no host-device sync
            for j, slot in enumerate(chunk):
                torch.add(self._offsets[:t], slot * t, out=self.write_index[j * t : (j + 1) * t])
        self.committing = commit

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the chunk's k, v ``[B, F·T, Hkv, D]`` into layer ``layer``'s chunk slots
        (in place, at the device-side ``write_index``); returns the attended prefix of the
        buffers (views)."""
        kb, vb = self.k[layer], self.v[layer]
        kb.index_copy_(1, self.write_index, k)
        vb.index_copy_(1, self.write_index, v)
        n = self.attended_tokens
        return kb[:, :n], vb[:, :n]

    def end_chunk(self, ok: bool) -> None:
        """Leave the pass. A successful commit records the chunk's frames in its slots and
        frees the slots of the frames the policy drops; a failed pass changes nothing."""
        if self.committing and ok:
            self._peak = max(self._peak, self.kv_bytes)
            start = self._chunk_start
            slots = list(self._slots)
            for j, slot in enumerate(self._chunk_slots):
                slots[slot] = start + j
            retained = {frame for run in self._retained_runs(start) for frame in run}
            missing = retained.difference(slots)
            if missing:
                self.committing = False
                raise RuntimeError(f"the policy retains frames {sorted(missing)} that are not held")
            self._slots = [frame if frame in retained else None for frame in slots]
            self._held = len(retained)
            self._chunk_start = None
        self.committing = False

    def __repr__(self) -> str:
        return f"RingFrameCache({self.policy!r})"
