"""The procedural world: determinism, the first chunk, disappearances, bounce physics."""

import math

import pytest
import torch

from world.scenes import (
    DEFAULT_WORLD,
    TRAIN_FRAMES,
    TRAIN_SEEDS,
    WorldConfig,
    draw_params,
    heldout_seeds,
    object_centers,
    render,
    render_params,
)

SEEDS = list(range(24))


@pytest.fixture(scope="module")
def long_clip():
    return render(SEEDS, 120)


def test_shapes_and_ranges():
    sb = render([3, 4], TRAIN_FRAMES)
    B, F, N, H, W = 2, TRAIN_FRAMES, DEFAULT_WORLD.max_objects, 64, 64
    assert sb.frames.shape == (B, F, 3, H, W) and sb.frames.dtype == torch.float32
    assert sb.frames.min() >= -1 and sb.frames.max() <= 1
    assert sb.object_masks.shape == (B, F, N, H, W) and sb.object_masks.dtype == torch.bool
    assert sb.visible.shape == (B, F, N) and sb.visible.dtype == torch.bool
    assert sb.centers.shape == (B, F, N, 2)
    assert TRAIN_FRAMES % 3 == 0


def test_deterministic_per_seed():
    a, b = render([5, 6], 9), render([5, 6], 9)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.object_masks, b.object_masks)
    # A seed's clip does not depend on its batch neighbours.
    alone = render([6], 9)
    assert torch.equal(alone.frames[0], a.frames[1])
    assert not torch.allclose(a.frames[0], a.frames[1], atol=0.05)


def test_float32_matches_float64_rendering():
    params = draw_params([11, 12, 13])
    f32 = render_params(params, 30, dtype=torch.float32)
    f64 = render_params(params, 30, dtype=torch.float64)
    torch.testing.assert_close(f32.frames.double(), f64.frames, atol=1e-4, rtol=0)
    # Masks may differ only where a coverage sits at the 0.5 threshold.
    assert (f32.object_masks != f64.object_masks).float().mean() < 1e-4


def test_object_counts_and_distinct_colours():
    params = draw_params(list(range(200)))
    counts = params.present.sum(1)
    assert counts.min() >= DEFAULT_WORLD.min_objects and counts.max() <= DEFAULT_WORLD.max_objects
    assert len(set(counts.tolist())) == 3  # 2, 3 and 4 objects all occur
    assert params.is_disc[params.present].any() and (~params.is_disc[params.present]).any()
    for b in range(len(counts)):
        c = params.color[b, params.present[b]]
        dist = torch.cdist(c, c) + 10 * torch.eye(len(c), dtype=c.dtype)
        assert dist.min() > 0.3


def test_every_object_fully_visible_in_first_chunk(long_clip):
    sb = long_clip
    for b in range(len(SEEDS)):
        for n in torch.nonzero(sb.present[b]).flatten().tolist():
            for f in range(3):
                m = sb.object_masks[b, f, n]
                assert sb.visible[b, f, n]
                # Not clipped by the view: no mask pixel on the border.
                assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
                # Not behind the bar and not under another object: the whole area shows.
                x, y = sb.centers[b, f, n].tolist()
                size = draw_params([SEEDS[b]]).size[0, n].item()
                disc = draw_params([SEEDS[b]]).is_disc[0, n].item()
                area = math.pi * size**2 if disc else (2 * size) ** 2
                assert abs(m.sum().item() - area) < 0.15 * area + 4, (b, f, n)
                assert not (m & sb.occluder[b]).any()


def test_objects_disappear_and_come_back(long_clip):
    vis = long_clip.visible  # [B, F, N]
    present = long_clip.present
    returns, lengths = 0, []
    for b in range(len(SEEDS)):
        scene_has_return = False
        for n in torch.nonzero(present[b]).flatten().tolist():
            v = vis[b, :, n].tolist()
            # Runs of invisibility that end with the object visible again.
            f = 0
            while f < len(v):
                if not v[f]:
                    start = f
                    while f < len(v) and not v[f]:
                        f += 1
                    if f < len(v):
                        scene_has_return = True
                        lengths.append(f - start)
                else:
                    f += 1
        returns += scene_has_return
    assert returns >= 0.75 * len(SEEDS)
    lengths = torch.tensor(lengths, dtype=torch.float64)
    # Disappearances last a few to a few tens of frames.
    assert 3 <= lengths.median() <= 20


def test_bounce_physics_matches_stepwise_simulation():
    cfg = DEFAULT_WORLD
    params = draw_params(list(range(16)), cfg)
    F = 200
    centers = object_centers(params, F, cfg)
    for b in range(16):
        for n in torch.nonzero(params.present[b]).flatten().tolist():
            size = params.size[b, n].item()
            pos = params.start[b, n].tolist()
            vel = params.velocity[b, n].tolist()
            speed = math.hypot(*vel)
            assert cfg.speed_range[0] <= speed <= cfg.speed_range[1]
            bounds = [
                (-cfg.world_margin + size, ext + cfg.world_margin - size)
                for ext in (cfg.width, cfg.height)
            ]
            for f in range(F):
                torch.testing.assert_close(
                    centers[b, f, n], torch.tensor(pos, dtype=torch.float64), atol=1e-9, rtol=0
                )
                for a, (lo, hi) in enumerate(bounds):
                    assert lo - 1e-9 <= pos[a] <= hi + 1e-9
                    nxt = pos[a] + vel[a]
                    # Reflect off a wall: the part beyond it comes back, velocity flips.
                    if nxt > hi:
                        nxt, vel[a] = 2 * hi - nxt, -vel[a]
                    elif nxt < lo:
                        nxt, vel[a] = 2 * lo - nxt, -vel[a]
                    pos[a] = nxt
                assert math.isclose(math.hypot(*vel), speed)


def test_objects_leave_the_view():
    params = draw_params(SEEDS)
    c = object_centers(params, 200)
    outside = (c[..., 0] < -params.size[:, None]) | (c[..., 0] > 64 + params.size[:, None])
    outside |= (c[..., 1] < -params.size[:, None]) | (c[..., 1] > 64 + params.size[:, None])
    left = (outside & params.present[:, None]).any(1)  # [B, N]
    assert left[params.present].float().mean() > 0.5


def test_seed_ranges():
    held = heldout_seeds(5)
    assert held == heldout_seeds(5) and len(set(held)) == 5
    assert all(s not in TRAIN_SEEDS for s in held)
    assert 0 in TRAIN_SEEDS and 2**31 - 1 in TRAIN_SEEDS
    render(held[:1], 3)  # large seeds render
    with pytest.raises(ValueError, match="n must be"):
        heldout_seeds(-1)


@pytest.mark.parametrize(
    "seeds, frames, match",
    [
        ([], 3, "non-empty"),
        ([-1], 3, "seeds must be ints"),
        ([1.5], 3, "seeds must be ints"),
        ([1], 0, "num_frames"),
        ([1], 2.0, "num_frames"),
    ],  # fmt: skip
)
def test_bad_arguments(seeds, frames, match):
    with pytest.raises(ValueError, match=match):
        render(seeds, frames)


def test_bad_config():
    with pytest.raises(ValueError, match="world_margin"):
        WorldConfig(world_margin=5.0)
    with pytest.raises(ValueError, match="min_objects"):
        WorldConfig(min_objects=5)
    with pytest.raises(ValueError, match="speed_range"):
        WorldConfig(speed_range=(2.0, 1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = render([1, 2, 3], 30)
    gpu = render([1, 2, 3], 30, device="cuda")
    torch.testing.assert_close(gpu.frames.cpu(), cpu.frames, atol=1e-4, rtol=0)
    assert (gpu.object_masks.cpu() != cpu.object_masks).float().mean() < 1e-4
