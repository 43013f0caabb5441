"""Knowing whether sparse attention works: a procedural world whose continuation is known.

``world.scenes`` renders seeded clips (backdrop, bouncing objects, an occluding bar) with
their ground truth; ``world.latent`` is the fixed invertible frame <-> latent mapping;
``world.metrics`` scores a continuation against the truth (error by horizon, error on
reappearing content, drift of frame statistics, the copy-last floor); ``world.video``
writes labelled side-by-side GIFs and error-vs-horizon plots.
"""

from world.latent import LATENT_CHANNELS, frames_to_latents, latents_to_frames
from world.metrics import (
    PSNR_CAP_DB,
    MaskedError,
    by_horizon,
    copy_last,
    masked_mse,
    mse,
    psnr,
    reappear_mask,
    reappear_mse,
    stat_drift,
)
from world.scenes import (
    DEFAULT_WORLD,
    TRAIN_FRAMES,
    TRAIN_SEEDS,
    SceneBatch,
    WorldConfig,
    heldout_seeds,
    render,
)
from world.video import plot_error_vs_horizon, write_panels_gif

__all__ = [
    "DEFAULT_WORLD",
    "LATENT_CHANNELS",
    "MaskedError",
    "PSNR_CAP_DB",
    "TRAIN_FRAMES",
    "TRAIN_SEEDS",
    "SceneBatch",
    "WorldConfig",
    "by_horizon",
    "copy_last",
    "frames_to_latents",
    "heldout_seeds",
    "latents_to_frames",
    "masked_mse",
    "mse",
    "plot_error_vs_horizon",
    "psnr",
    "reappear_mask",
    "reappear_mse",
    "render",
    "stat_drift",
    "write_panels_gif",
]
