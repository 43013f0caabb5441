"""Continuation metrics on hand-built cases with known answers."""

import math

import pytest
import torch

from world.metrics import (
    PSNR_CAP_DB,
    by_horizon,
    copy_last,
    masked_mse,
    mse,
    psnr,
    reappear_mask,
    reappear_mse,
    stat_drift,
)
from world.scenes import SceneBatch, render


def _frames(B=2, F=4, H=8, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, F, 3, H, W, generator=g) * 2 - 1


def test_identical_prediction():
    truth = _frames()
    assert torch.equal(mse(truth, truth), torch.zeros(2, 4))
    assert torch.equal(psnr(truth, truth), torch.full((2, 4), PSNR_CAP_DB))
    assert torch.allclose(stat_drift(truth, truth), torch.zeros(2, 4), atol=1e-6)


def test_constant_offset():
    truth = _frames() * 0.5
    c = 0.25
    pred = truth + c
    torch.testing.assert_close(mse(pred, truth), torch.full((2, 4), c * c))
    # 10 log10(2**2 / c**2) = 20 log10(2 / c)
    torch.testing.assert_close(psnr(pred, truth), torch.full((2, 4), 20 * math.log10(2 / c)))
    # The mean moves by c, the std not at all: drift = (c + 0) / 2.
    torch.testing.assert_close(stat_drift(pred, truth), torch.full((2, 4), c / 2))


def test_scaled_prediction_drifts_in_std():
    truth = torch.zeros(1, 1, 3, 2, 2)
    truth[..., 0, :] = 1.0
    truth[..., 1, :] = -1.0  # mean 0, std 1 per channel
    pred = truth * 0.5  # mean 0, std 0.5
    torch.testing.assert_close(stat_drift(pred, truth), torch.full((1, 1), 0.25))


def test_by_horizon():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, math.nan]])
    out = by_horizon(values, [1, 2, 4])
    assert out == {1: 2.0, 2: 2.5, 4: pytest.approx(22 / 7)}
    with pytest.raises(ValueError, match="horizons"):
        by_horizon(values, [5])
    with pytest.raises(ValueError, match="values must be"):
        by_horizon(values[0], [1])


def test_copy_last():
    prefix = _frames(F=3)
    out = copy_last(prefix, 5)
    assert out.shape == (2, 5, 3, 8, 8)
    assert all(torch.equal(out[:, f], prefix[:, -1]) for f in range(5))
    with pytest.raises(ValueError, match="num_frames"):
        copy_last(prefix, 0)


def _hand_scene(visible_rows):
    """One scene, one pixel per object (object n at pixel (0, n)), given visibility per frame."""
    vis = torch.tensor(visible_rows, dtype=torch.bool).T[None]  # [1, F, N]
    _, F, N = vis.shape
    masks = torch.zeros(1, F, N, 1, N, dtype=torch.bool)
    for n in range(N):
        masks[0, :, n, 0, n] = vis[0, :, n]
    return SceneBatch(
        frames=torch.zeros(1, F, 3, 1, N),
        object_masks=masks,
        visible=vis,
        centers=torch.zeros(1, F, N, 2),
        present=torch.ones(1, N, dtype=torch.bool),
        occluder=torch.zeros(1, 1, N, dtype=torch.bool),
    )


def test_reappear_mask_hand_made():
    scene = _hand_scene(
        [
            # hidden at 2-4 (3 frames), back at 5; hidden at 9 (1 frame), back at 10
            [1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 1],
            # first seen at frame 4: nothing to remember, never reappears
            [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
            # hidden at 1-2 (2 frames), back at 3
            [1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    got = reappear_mask(scene, gap=3, within=2)[0, :, 0]  # [F, N]
    expected = torch.zeros(11, 3, dtype=torch.bool)
    expected[5:7, 0] = True
    assert torch.equal(got, expected)
    got = reappear_mask(scene, gap=2, within=1)[0, :, 0]
    expected = torch.zeros(11, 3, dtype=torch.bool)
    expected[5, 0] = expected[3, 2] = True
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="gap"):
        reappear_mask(scene, gap=0)


def test_masked_mse_counts_pixels_and_is_nan_safe():
    truth = torch.zeros(1, 3, 3, 2, 2)
    pred = truth.clone()
    pred[0, 1, :, 0, 0] = 1.0  # error 1 at one pixel of frame 1
    pred[0, 2, :, 1, 1] = 2.0  # error 4 at one pixel of frame 2
    mask = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, :] = True  # two pixels of frame 1, one with error 1
    mask[0, 2, 1, 1] = True
    err = masked_mse(pred, truth, mask)
    assert err.pixels.tolist() == [[0, 2, 1]]
    assert math.isnan(err.per_frame[0, 0]) and err.per_frame[0, 1:].tolist() == [0.5, 4.0]
    assert err.value == pytest.approx(5 / 3)
    assert err.by_horizon([1, 2, 3]) == {1: None, 2: 0.5, 3: pytest.approx(5 / 3)}
    empty = masked_mse(pred, truth, torch.zeros_like(mask))
    assert empty.value is None and int(empty.pixels.sum()) == 0
    with pytest.raises(ValueError, match="mask must be"):
        masked_mse(pred, truth, mask.float())


def test_reappear_mse_on_a_rendered_scene():
    scene = render(list(range(8)), 60)
    truth = scene.frames[:, 6:]
    exact = reappear_mse(truth, truth, scene, gap=3, start_frame=6)
    assert exact.value == 0.0 and int(exact.pixels.sum()) > 0
    # Copying the last prefix frame cannot know where the returning objects are.
    floor = reappear_mse(copy_last(scene.frames[:, :6], 54), truth, scene, gap=3, start_frame=6)
    assert floor.value > 0.05
    assert torch.equal(floor.pixels, exact.pixels)
    with pytest.raises(ValueError, match="exceed"):
        reappear_mse(truth, truth, scene, gap=3, start_frame=7)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="pred must have"):
        mse(_frames(F=3), _frames(F=4))
    with pytest.raises(ValueError, match="truth must be"):
        mse(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
