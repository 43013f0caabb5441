"""The world's fixed frame <-> latent mapping: space-to-depth by 2 (no VAE, exactly invertible).

A pixel block (2x2) of the three colour channels becomes 12 latent channels, ordered
``c * 4 + dy * 2 + dx`` (``torch.nn.functional.pixel_unshuffle``'s order). A 64x64 frame is a
12x32x32 latent: 16x16 = 256 tokens after the model's 2x2 patch, 8 pages of 32 tokens.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

LATENT_CHANNELS = 12
_FACTOR = 2


def frames_to_latents(frames: Tensor) -> Tensor:
    """frames [B, F, 3, H, W] -> latents [B, 12, F, H/2, W/2] (the model's [B, C, F, h, w])."""
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(
            f"frames_to_latents: frames must be [B, F, 3, H, W], got {tuple(frames.shape)}"
        )
    H, W = frames.shape[-2:]
    if H % _FACTOR or W % _FACTOR:
        raise ValueError(f"frames_to_latents: frame height and width must be even, got {H}x{W}")
    return F.pixel_unshuffle(frames, _FACTOR).transpose(1, 2).contiguous()


def latents_to_frames(latents: Tensor) -> Tensor:
    """latents [B, 12, F, h, w] -> frames [B, F, 3, 2h, 2w]: exact inverse of frames_to_latents."""
    if latents.dim() != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise ValueError(
            f"latents_to_frames: latents must be [B, {LATENT_CHANNELS}, F, h, w], "
            f"got {tuple(latents.shape)}"
        )
    return F.pixel_shuffle(latents.transpose(1, 2), _FACTOR).contiguous()
