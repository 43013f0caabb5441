"""The default Sparse Forcing configuration, one place for the demo, the CLI and the benchmarks.

At Wan 480x832 (1560 tokens per latent frame) the defaults are the paper's budget or larger:

* pages and query blocks of 128 tokens (the kernel's best tile on an H100, BENCHMARKS.md); a
  frame is 12 full pages and one of 24 tokens;
* a persistent memory of 4096 tokens (32 pages) per kv head and layer;
* a window of 9 frames: two chunks of history plus the current chunk;
* local density 12.5 %: each query block's top ceil(0.125 x 117) = 15 window pages, plus the
  13 pages of each frame it touches (forced).

Small test models (under 512 tokens per frame) keep the proportions with 16-token pages, the
smallest tile the kernels take, and a persistent memory of two frames.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patterns import PersistentLocal, VideoGeometry
from patterns.geometry import FRAMES_PER_CHUNK

WAN_PAGE = 128
SMALL_PAGE = 16
PERSISTENT_TOKENS = 4096
HISTORY_CHUNKS = 2
LOCAL_DENSITY = 0.125


def default_geometry(
    tokens_per_frame: int, frames_per_chunk: int = FRAMES_PER_CHUNK
) -> VideoGeometry:
    page = WAN_PAGE if tokens_per_frame >= 4 * WAN_PAGE else SMALL_PAGE
    return VideoGeometry(
        tokens_per_frame=tokens_per_frame,
        frames_per_chunk=frames_per_chunk,
        page_size=page,
        q_block=page,
    )


def default_pattern(geometry: VideoGeometry) -> PersistentLocal:
    if geometry.page_size == WAN_PAGE:
        persistent = PERSISTENT_TOKENS // WAN_PAGE
    else:
        persistent = 2 * geometry.pages_per_frame
    return PersistentLocal(
        persistent_blocks=persistent,
        window_frames=(HISTORY_CHUNKS + 1) * geometry.frames_per_chunk,
        local_density=LOCAL_DENSITY,
    )


def example_chunk(config, context: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Example inputs `(x, timestep, context, start_frame)` of one chunk of a reference-model
    config (a `runtime.WanConfig`), on the context's device, for `sparsify` to trace with."""
    device, dtype = context.device, context.dtype
    x = torch.randn(
        context.shape[0],
        config.in_channels,
        config.frames_per_chunk,
        config.latent_height,
        config.latent_width,
        device=device,
        dtype=dtype,
    )
    timestep = torch.full((context.shape[0], config.frames_per_chunk), 1000.0, device=device)
    return x, timestep, context, torch.tensor(0, device=device)
