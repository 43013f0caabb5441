"""Quality of a continuation against the world's ground truth.

Every metric compares a predicted continuation with the true one, both frames
[B, F, 3, H, W] in [-1, 1] (frame 0 = the first frame after the clean prefix), and is
vectorised over the batch and frames. Per-frame values [B, F] are aggregated over the first
``h`` frames by ``by_horizon``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from world.scenes import SceneBatch

# Frames span [-1, 1], so the peak-to-peak signal is 2.
PEAK = 2.0
# PSNR of a frame that matches exactly (mse 0) would be infinite; it is reported as this cap.
PSNR_CAP_DB = 100.0


def _check_pair(pred: Tensor, truth: Tensor) -> None:
    if truth.dim() != 5 or truth.shape[2] != 3:
        raise ValueError(f"truth must be frames [B, F, 3, H, W], got {tuple(truth.shape)}")
    if pred.shape != truth.shape:
        raise ValueError(
            f"pred must have the truth's shape {tuple(truth.shape)}, got {tuple(pred.shape)}"
        )


def mse(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-frame mean squared error [B, F] (float32 or wider) over channels and pixels."""
    _check_pair(pred, truth)
    diff = pred.float() - truth.float()
    return (diff * diff).mean(dim=(2, 3, 4))


def psnr(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-frame PSNR [B, F] in dB, 10 log10(PEAK**2 / mse), capped at ``PSNR_CAP_DB``."""
    err = mse(pred, truth)
    return (10 * torch.log10(PEAK**2 / err)).clamp(max=PSNR_CAP_DB)


def stat_drift(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-frame drift [B, F] of the frame statistics.

    For each colour channel, the mean and the standard deviation over the pixels of the
    predicted frame and of the true one; the drift is the absolute difference of the means
    and of the stds, averaged over the two statistics and the three channels (a constant
    offset ``c`` gives ``|c| / 2``).
    """
    _check_pair(pred, truth)
    p, t = pred.float().flatten(3), truth.float().flatten(3)  # [B, F, 3, H*W]
    d_mean = (p.mean(-1) - t.mean(-1)).abs()
    d_std = (p.std(-1, correction=0) - t.std(-1, correction=0)).abs()
    return 0.5 * (d_mean + d_std).mean(-1)


def copy_last(prefix_frames: Tensor, num_frames: int) -> Tensor:
    """The copy-the-last-frame floor: prefix [B, P, ...] -> [B, num_frames, ...]."""
    if prefix_frames.dim() < 2 or prefix_frames.shape[1] < 1:
        raise ValueError(
            "copy_last: prefix_frames must be [B, P, ...] with P >= 1, "
            f"got {tuple(prefix_frames.shape)}"
        )
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"copy_last: num_frames must be a positive int, got {num_frames!r}")
    last = prefix_frames[:, -1:]
    return last.expand(last.shape[0], num_frames, *last.shape[2:]).clone()


def _check_horizons(horizons: Sequence[int], num_frames: int) -> list[int]:
    horizons = list(horizons)
    for h in horizons:
        if isinstance(h, bool) or not isinstance(h, int) or not (1 <= h <= num_frames):
            raise ValueError(
                f"horizons must be ints in [1, {num_frames}] (frames given), got {h!r}"
            )
    return horizons


def by_horizon(values: Tensor, horizons: Sequence[int]) -> dict[int, float]:
    """Mean of per-frame ``values`` [B, F] over the batch and the first ``h`` frames, per h.

    NaN entries (frames where a masked metric has no pixel) are left out; a horizon with
    only NaN gives NaN.
    """
    if values.dim() != 2:
        raise ValueError(f"by_horizon: values must be [B, F], got {tuple(values.shape)}")
    out = {}
    for h in _check_horizons(horizons, values.shape[1]):
        out[h] = torch.nanmean(values[:, :h].double()).item()
    return out


def reappear_mask(scene: SceneBatch, gap: int, *, within: int = 3) -> Tensor:
    """Pixels [B, F, H, W] of content that left the recent frames and has come back.

    Object n *reappears* at frame r when it is visible at r (``scene.visible``), was
    invisible in each of the ``gap`` frames r-gap .. r-1, and was visible at some frame
    before those (content never seen cannot be remembered). A pixel of frame t is in the
    mask when it shows an object (``scene.object_masks``) that reappeared at some r with
    t - within < r <= t. Slice the result to the continuation's frames.
    """
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"reappear_mask: gap must be a positive int, got {gap!r}")
    if isinstance(within, bool) or not isinstance(within, int) or within < 1:
        raise ValueError(f"reappear_mask: within must be a positive int, got {within!r}")
    vis = scene.visible  # [B, F, N]
    B, F, N = vis.shape
    frame = torch.arange(F, device=vis.device)[None, :, None].expand(B, F, N)
    # Index of the latest visible frame at or before t (-1: none yet).
    last_seen = torch.where(vis, frame, torch.full_like(frame, -1)).cummax(dim=1).values
    before = torch.cat([torch.full_like(last_seen[:, :1], -1), last_seen[:, :-1]], dim=1)
    # At a visible frame r, the hidden run just before it is r - 1 - before[r] frames long.
    reappears = vis & (before >= 0) & (frame - 1 - before >= gap)
    # Any reappearance in the last `within` frames (inclusive), via a running count.
    count = reappears.long().cumsum(dim=1)
    lagged = torch.cat([torch.zeros_like(count[:, :within]), count], dim=1)[:, :F]
    recent = count - lagged > 0
    return (scene.object_masks & recent[..., None, None]).any(dim=2)


@dataclass(frozen=True)
class MaskedError:
    """Mean squared error over masked pixels.

    ``per_frame`` [B, F] is NaN where a frame has no masked pixel; ``pixels`` [B, F] counts
    them; ``value`` is the pixel-weighted mean over everything, None without any pixel.
    """

    per_frame: Tensor
    pixels: Tensor
    sum_sq: Tensor  # [B, F] summed squared error (channel-averaged per pixel)

    @property
    def value(self) -> float | None:
        return _weighted(self.sum_sq, self.pixels)

    def by_horizon(self, horizons: Sequence[int]) -> dict[int, float | None]:
        """Pixel-weighted mean over the first ``h`` frames, per h (None without pixels)."""
        return {
            h: _weighted(self.sum_sq[:, :h], self.pixels[:, :h])
            for h in _check_horizons(horizons, self.pixels.shape[1])
        }


def _weighted(sum_sq: Tensor, pixels: Tensor) -> float | None:
    n = int(pixels.sum())
    return None if n == 0 else sum_sq.double().sum().item() / n


def masked_mse(pred: Tensor, truth: Tensor, mask: Tensor) -> MaskedError:
    """MSE of frames [B, F, 3, H, W] restricted to ``mask`` bool [B, F, H, W]."""
    _check_pair(pred, truth)
    B, F, _, H, W = truth.shape
    if mask.shape != (B, F, H, W) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool [B, F, H, W] = {(B, F, H, W)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    diff = pred.float() - truth.float()
    per_pixel = (diff * diff).mean(dim=2)  # [B, F, H, W]
    sum_sq = (per_pixel * mask).sum(dim=(2, 3))
    pixels = mask.sum(dim=(2, 3))
    per_frame = torch.where(pixels > 0, sum_sq / pixels.clamp(min=1), math.nan)
    return MaskedError(per_frame=per_frame, pixels=pixels, sum_sq=sum_sq)


def reappear_mse(
    pred: Tensor,
    truth: Tensor,
    scene: SceneBatch,
    gap: int,
    *,
    within: int = 3,
    start_frame: int = 0,
) -> MaskedError:
    """MSE on reappearing content (``reappear_mask``) of a continuation.

    ``pred``/``truth`` [B, F, 3, H, W] are frames ``start_frame .. start_frame + F`` of
    ``scene`` (the prefix is usually ``scene``'s first frames); the mask is computed on the
    whole scene, so a disappearance that began in the prefix counts.
    """
    _check_pair(pred, truth)
    F = truth.shape[1]
    total = scene.visible.shape[1]
    if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
        raise ValueError(
            f"reappear_mse: start_frame must be a non-negative int, got {start_frame!r}"
        )
    if start_frame + F > total:
        raise ValueError(
            f"reappear_mse: frames {start_frame}..{start_frame + F} exceed "
            f"the scene's {total} frames"
        )
    mask = reappear_mask(scene, gap, within=within)[:, start_frame : start_frame + F]
    return masked_mse(pred, truth, mask.to(truth.device))
