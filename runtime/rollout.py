"""The Self-Forcing autoregressive rollout: chunk by chunk, few-step denoising, then commit.

Per chunk of `frames_per_chunk` latent frames: start from seeded noise, run the denoising
passes (the model predicts the flow v = ε − x0, so x0 = x_t − σ·v, re-noised to the next σ
with fresh noise), then one clean pass at t = 0 on the final x0 that commits the chunk's K/V
to the runner's cache. The runner (dense `EagerRunner` or a sparsified model) owns the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from patterns.checks import check_int
from patterns.geometry import FRAMES_PER_CHUNK
from runtime.eager import same_device


@runtime_checkable
class ChunkRunner(Protocol):
    """What `generate` drives: a model bound to a KV cache, called once per pass.

    A runner may also state ``max_frames``, the most frames a rollout may span (its model's
    positions; None or absent: no limit): `generate` rejects a longer rollout before the
    first pass, and ``reset`` before touching the cache.
    """

    def reset(self, batch_size: int, device, dtype: torch.dtype, num_frames: int) -> None:
        """Empty the cache for a rollout of `num_frames` frames."""
        ...

    def __call__(
        self, x: Tensor, timestep: Tensor, context: Tensor, start_frame: int, commit: bool
    ) -> Tensor:
        """Flow prediction [B, C, F, H, W] for the chunk x [B, C, F, H, W] at `start_frame`;
        timestep [B, F]; `commit` writes the chunk to the cache (the clean t = 0 pass)."""
        ...


@dataclass(frozen=True)
class SelfForcingSchedule:
    """Few-step flow-matching schedule of Self-Forcing.

    `denoising_steps` (on the 0…num_train_timesteps scale) are warped with `shift`:
    s = t/N, σ = shift·s / (1 + (shift − 1)·s), timestep = N·σ. The commit pass runs at
    timestep 0 (σ = 0, the clean latents).
    """

    denoising_steps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    frames_per_chunk: int = FRAMES_PER_CHUNK
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        steps = tuple(float(t) for t in self.denoising_steps)
        object.__setattr__(self, "denoising_steps", steps)
        n = self.num_train_timesteps
        if not steps or any(not 0 < t <= n for t in steps):
            raise ValueError(
                f"denoising_steps must be a non-empty sequence in (0, {n}], got {steps}"
            )
        if any(a <= b for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"denoising_steps must be strictly decreasing, got {steps}")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        check_int(self.frames_per_chunk, "frames_per_chunk")

    @property
    def sigmas(self) -> tuple[float, ...]:
        """Noise level σ of each denoising pass."""
        out = []
        for t in self.denoising_steps:
            s = t / self.num_train_timesteps
            out.append(self.shift * s / (1.0 + (self.shift - 1.0) * s))
        return tuple(out)

    @property
    def timesteps(self) -> tuple[float, ...]:
        """Timestep fed to the model in each denoising pass (N·σ)."""
        return tuple(self.num_train_timesteps * sigma for sigma in self.sigmas)


def _check_length(
    runner: ChunkRunner, num_chunks: int, frames_per_chunk: int, prefix_frames: int
) -> None:
    limit = getattr(runner, "max_frames", None)
    total = prefix_frames + num_chunks * frames_per_chunk
    if limit is not None and total > limit:
        after = f" after a prefix of {prefix_frames}" if prefix_frames else ""
        raise ValueError(
            f"num_chunks={num_chunks}: {num_chunks} chunks of {frames_per_chunk} frames"
            f"{after} span {total} frames, past the runner's limit of {limit} (max_frames, the "
            f"positions its model can encode): at most "
            f"{(limit - prefix_frames) // frames_per_chunk} chunks"
        )


@torch.no_grad()
def generate(
    runner: ChunkRunner,
    context: Tensor,
    num_chunks: int,
    *,
    latent_shape: tuple[int, int, int],
    batch_size: int = 1,
    seed: int = 0,
    schedule: SelfForcingSchedule | None = None,
    progress: bool = True,
    device=None,
    dtype: torch.dtype | None = None,
    prefix: Tensor | None = None,
) -> Tensor:
    """Roll out `num_chunks` chunks; returns the clean latents [B, C, P + num_chunks·F, H, W].

    context: [1 or B, L_text, text_dim] text embeddings (a batch of 1 is shared). Noise is
    drawn on the CPU from a generator seeded with `seed`, so the result depends only on the
    seed and the runner, not on the device. `device`/`dtype` default to the context's.

    prefix (video continuation): clean latents [1 or B, C, P, H, W] on `device` in `dtype`,
    P a positive multiple of frames_per_chunk. Its chunks are committed first (one commit
    pass per chunk at t = 0, no denoising), then `num_chunks` chunks are sampled after them;
    the runner is reset for P + num_chunks·F frames. The result starts with the prefix
    itself (frames 0…P−1, broadcast to B), so frame indices are absolute; without a prefix,
    P = 0. The noise drawn does not depend on the prefix.
    A rollout longer than the runner's ``max_frames`` (prefix included) is a ValueError
    before any work.
    """
    schedule = SelfForcingSchedule() if schedule is None else schedule
    if not isinstance(schedule, SelfForcingSchedule):
        raise TypeError(f"schedule must be a SelfForcingSchedule, got {type(schedule).__name__}")
    check_int(num_chunks, "num_chunks")
    check_int(batch_size, "batch_size")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if len(tuple(latent_shape)) != 3:
        raise ValueError(f"latent_shape must be (C, H, W), got {latent_shape!r}")
    channels, height, width = (check_int(d, "latent_shape") for d in latent_shape)
    if not isinstance(context, Tensor) or context.ndim != 3:
        raise ValueError("context must be a 3-D tensor [B, L_text, text_dim]")
    if context.shape[0] not in (1, batch_size):
        raise ValueError(f"context batch {context.shape[0]} must be 1 or batch_size={batch_size}")
    device = context.device if device is None else torch.device(device)
    dtype = context.dtype if dtype is None else dtype
    context = context.to(device, dtype).expand(batch_size, -1, -1)

    frames = schedule.frames_per_chunk
    shape = (batch_size, channels, frames, height, width)
    if prefix is not None:
        prefix = _check_prefix(prefix, shape, device, dtype).expand(batch_size, -1, -1, -1, -1)
    prefix_frames = 0 if prefix is None else prefix.shape[2]
    _check_length(runner, num_chunks, frames, prefix_frames)
    generator = torch.Generator().manual_seed(seed)

    def noise() -> Tensor:
        return torch.randn(shape, generator=generator).to(device, dtype)

    def timestep(value: float) -> Tensor:
        return torch.full((batch_size, frames), value, device=device, dtype=torch.float32)

    sigmas, timesteps = schedule.sigmas, schedule.timesteps
    runner.reset(batch_size, device, dtype, prefix_frames + num_chunks * frames)
    chunks = []
    for start in range(0, prefix_frames, frames):
        clean = prefix[:, :, start : start + frames]
        runner(clean, timestep(0.0), context, start, commit=True)
        chunks.append(clean)
    for chunk in tqdm(range(num_chunks), desc="rollout", unit="chunk", disable=not progress):
        start = prefix_frames + chunk * frames
        x = noise()
        for i, (sigma, t) in enumerate(zip(sigmas, timesteps, strict=True)):
            flow = runner(x, timestep(t), context, start, commit=False)
            x0 = x - sigma * flow
            if i + 1 < len(sigmas):
                x = (1.0 - sigmas[i + 1]) * x0 + sigmas[i + 1] * noise()
        runner(x0, timestep(0.0), context, start, commit=True)
        chunks.append(x0)
    return torch.cat(chunks, dim=2)


def _check_prefix(
    prefix: Tensor, chunk_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """`prefix` [1 or B, C, P, H, W] checked against one chunk's shape [B, C, F, H, W], the
    rollout's device and dtype; a ValueError naming `prefix` says what was expected."""
    batch, channels, frames, height, width = chunk_shape
    if not isinstance(prefix, Tensor) or prefix.ndim != 5:
        got = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
        raise ValueError(f"prefix must be a 5-D latent tensor [B, C, P, H, W], got {got}")
    b, c, p, h, w = prefix.shape
    if b not in (1, batch) or (c, h, w) != (channels, height, width):
        raise ValueError(
            f"prefix shape {tuple(prefix.shape)} must be [1 or {batch}, {channels}, P, "
            f"{height}, {width}] (batch_size and latent_shape)"
        )
    if p == 0 or p % frames:
        raise ValueError(
            f"prefix must hold a positive multiple of frames_per_chunk={frames} frames, got {p}"
        )
    if prefix.dtype != dtype or not same_device(prefix.device, device):
        raise ValueError(
            f"prefix is {prefix.dtype} on {prefix.device}, the rollout runs in {dtype} on {device}"
        )
    return prefix
