"""Video geometry: how frames, chunks, KV pages and query blocks tile the token sequence.

A latent frame of ``tokens_per_frame`` (T) tokens is tiled into pages **on its own**:
``pages_per_frame = ceil(T / page_size)`` pages, all full except the frame's last one, so no
page ever holds tokens of two frames and evicting a frame frees whole pages (Wan 480p:
1560 = 12·128 + 24). Query blocks are contiguous over a chunk's ``frames_per_chunk · T``
rows; a query block may straddle two frames, and its *own frames* are every frame it touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from patterns.checks import check_int

__all__ = ["FRAMES_PER_CHUNK", "VideoGeometry", "token_block_frames"]

# Latent frames per autoregressive chunk unless told otherwise: Self-Forcing's 3. The one
# default of the geometry, the reference model's config and the rollout schedule.
FRAMES_PER_CHUNK = 3


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def token_block_frames(
    num_tokens: int,
    block: int,
    tokens_per_frame: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """First and last frame touched by each block of a flat token sequence.

    Block j covers tokens ``[j·block, (j+1)·block) ∩ [0, num_tokens)`` of a sequence whose
    frame f is tokens ``[f·T, (f+1)·T)``. Returns int64 ``[ceil(num_tokens / block), 2]``
    (frame indices relative to the sequence start).
    """
    if num_tokens <= 0 or block <= 0 or tokens_per_frame <= 0:
        raise ValueError(
            "num_tokens, block and tokens_per_frame must be positive, got "
            f"{num_tokens}, {block}, {tokens_per_frame}"
        )
    starts = torch.arange(0, num_tokens, block, device=device)
    stops = (starts + block).clamp(max=num_tokens)
    return torch.stack([starts // tokens_per_frame, (stops - 1) // tokens_per_frame], dim=1)


@dataclass(frozen=True)
class VideoGeometry:
    """Token layout of an autoregressive video rollout.

    tokens_per_frame: tokens of one latent frame after patching (T; 1560 for Wan 480x832).
    frames_per_chunk: latent frames generated per AR step (F).
    page_size: tokens per KV page == the kernel's BLOCK_N (a power of two).
    q_block: query rows per block-table row == the kernel's BLOCK_M (a power of two).
    """

    tokens_per_frame: int
    frames_per_chunk: int = FRAMES_PER_CHUNK
    page_size: int = 128
    q_block: int = 128

    def __post_init__(self) -> None:
        for name in ("tokens_per_frame", "frames_per_chunk", "page_size", "q_block"):
            check_int(getattr(self, name), f"VideoGeometry.{name}")
        for name in ("page_size", "q_block"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(
                    f"VideoGeometry.{name} must be a power of two (a kernel tile), "
                    f"got {getattr(self, name)}"
                )

    @classmethod
    def for_latent(
        cls,
        height: int,
        width: int,
        patch: tuple[int, int] = (2, 2),
        frames_per_chunk: int = FRAMES_PER_CHUNK,
        page_size: int = 128,
        q_block: int = 128,
    ) -> VideoGeometry:
        """Geometry of a ``height x width`` latent frame cut into ``patch`` (h, w) patches."""
        ph, pw = patch
        if height <= 0 or width <= 0 or ph <= 0 or pw <= 0 or height % ph or width % pw:
            raise ValueError(
                f"latent {height}x{width} must be positive multiples of the patch {patch}"
            )
        return cls((height // ph) * (width // pw), frames_per_chunk, page_size, q_block)

    @classmethod
    def wan_480p(cls) -> VideoGeometry:
        """Wan2.1 at 480x832: latent 60x104, 2x2 patches → 1560 tokens per frame."""
        return cls.for_latent(60, 104)

    @property
    def pages_per_frame(self) -> int:
        return math.ceil(self.tokens_per_frame / self.page_size)

    @property
    def pages_per_chunk(self) -> int:
        return self.frames_per_chunk * self.pages_per_frame

    @property
    def chunk_tokens(self) -> int:
        """Query rows of one chunk (F · T)."""
        return self.frames_per_chunk * self.tokens_per_frame

    @property
    def q_blocks_per_chunk(self) -> int:
        return math.ceil(self.chunk_tokens / self.q_block)

    def frame_page_lens(self, device: torch.device | str | None = None) -> Tensor:
        """int32 ``[pages_per_frame]``: valid tokens of each page of a frame (last partial)."""
        starts = torch.arange(self.pages_per_frame, device=device) * self.page_size
        return (self.tokens_per_frame - starts).clamp(max=self.page_size).to(torch.int32)

    def q_block_frames(
        self, num_frames: int | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """int64 ``[Mq, 2]``: first and last frame (relative) touched by each query block of
        ``num_frames`` consecutive frames (default: one chunk)."""
        frames = self.frames_per_chunk if num_frames is None else num_frames
        return token_block_frames(
            frames * self.tokens_per_frame, self.q_block, self.tokens_per_frame, device
        )

    def to_pages(self, x: Tensor) -> Tensor:
        """Tile whole frames into pages.

        x: BLHD ``[B, n·T, Hkv, D]`` (n whole frames). Returns ``[B, Hkv, n·pages_per_frame,
        page_size, D]``; frame f's pages are ``f·ppf … (f+1)·ppf − 1`` and the tail of each
        frame's last page is zero.
        """
        if x.dim() != 4 or x.shape[1] % self.tokens_per_frame:
            raise ValueError(
                f"x must be [B, n·{self.tokens_per_frame}, Hkv, D] (whole frames), "
                f"got {tuple(x.shape)}"
            )
        b, length, hkv, d = x.shape
        frames = length // self.tokens_per_frame
        pad = self.pages_per_frame * self.page_size - self.tokens_per_frame
        x = x.reshape(b, frames, self.tokens_per_frame, hkv, d)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        x = x.reshape(b, frames * self.pages_per_frame, self.page_size, hkv, d)
        return x.permute(0, 3, 1, 2, 4)

    def __str__(self) -> str:
        return (
            f"VideoGeometry(T={self.tokens_per_frame}, F={self.frames_per_chunk}, "
            f"page={self.page_size} ({self.pages_per_frame}/frame), q_block={self.q_block})"
        )
