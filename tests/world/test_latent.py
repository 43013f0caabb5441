"""The space-to-depth latent mapping."""

import pytest
import torch

from world.latent import LATENT_CHANNELS, frames_to_latents, latents_to_frames
from world.scenes import render


def test_shape_and_exact_inverse():
    frames = render([0, 1], 6).frames
    lat = frames_to_latents(frames)
    assert lat.shape == (2, LATENT_CHANNELS, 6, 32, 32)
    assert torch.equal(latents_to_frames(lat), frames)
    z = torch.randn(1, LATENT_CHANNELS, 3, 8, 4)
    assert torch.equal(frames_to_latents(latents_to_frames(z)), z)


def test_channel_order():
    # Latent channel c*4 + dy*2 + dx holds pixel (2i + dy, 2j + dx) of colour c.
    frames = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(1, 2, 3, 4, 6)
    lat = frames_to_latents(frames)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(lat[0, c * 4 + dy * 2 + dx], frames[0, :, c, dy::2, dx::2])


def test_bad_shapes():
    with pytest.raises(ValueError, match="frames must be"):
        frames_to_latents(torch.zeros(1, 2, 4, 8, 8))
    with pytest.raises(ValueError, match="even"):
        frames_to_latents(torch.zeros(1, 2, 3, 7, 8))
    with pytest.raises(ValueError, match="latents must be"):
        latents_to_frames(torch.zeros(1, 3, 2, 8, 8))
