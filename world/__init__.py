"""Knowing whether sparse attention works: a procedural world whose continuation is known.

``world.scenes`` renders seeded clips (backdrop, bouncing objects, an occluding bar) with
their ground truth; ``world.latent`` is the fixed invertible frame <-> latent mapping.
"""

from world.latent import LATENT_CHANNELS, frames_to_latents, latents_to_frames
from world.scenes import (
    DEFAULT_WORLD,
    TRAIN_FRAMES,
    TRAIN_SEEDS,
    SceneBatch,
    WorldConfig,
    heldout_seeds,
    render,
)

__all__ = [
    "DEFAULT_WORLD",
    "LATENT_CHANNELS",
    "TRAIN_FRAMES",
    "TRAIN_SEEDS",
    "SceneBatch",
    "WorldConfig",
    "frames_to_latents",
    "heldout_seeds",
    "latents_to_frames",
    "render",
]
