"""The Self-Forcing rollout: schedule, pass structure, flow arithmetic, determinism."""

import pytest
import torch

from runtime.eager import EagerRunner, GlobalCache, RollingCache
from runtime.model import CausalWanModel
from runtime.model_config import WanConfig
from runtime.rollout import ChunkRunner, SelfForcingSchedule, generate


def test_schedule_values():
    schedule = SelfForcingSchedule()
    # σ = 5s / (1 + 4s) at s = 1, 0.75, 0.5, 0.25
    expected = (1.0, 3.75 / 4.0, 2.5 / 3.0, 1.25 / 2.0)
    assert schedule.sigmas == pytest.approx(expected, abs=1e-12)
    assert schedule.timesteps == pytest.approx([1000 * s for s in expected], abs=1e-9)
    assert SelfForcingSchedule(shift=1.0).timesteps == pytest.approx((1000, 750, 500, 250))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"denoising_steps": ()}, "non-empty"),
        ({"denoising_steps": (1000, 0)}, r"in \(0, 1000\]"),
        ({"denoising_steps": (500, 750)}, "strictly decreasing"),
        ({"shift": 0.0}, "shift"),
        ({"frames_per_chunk": 0}, "frames_per_chunk"),
    ],
)
def test_bad_schedule(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelfForcingSchedule(**kwargs)


class _Recorder:
    """A runner predicting v = x − c (so x0 = (1−σ)·x + σ·c), recording every call."""

    def __init__(self, target: torch.Tensor):
        self.target = target
        self.calls = []
        self.resets = []

    def reset(self, batch_size, device, dtype, num_frames):
        self.resets.append((batch_size, torch.device(device), dtype, num_frames))

    def __call__(self, x, timestep, context, start_frame, commit):
        self.calls.append((x.clone(), timestep.clone(), start_frame, commit))
        return x - self.target


def test_pass_structure_and_flow_arithmetic():
    schedule = SelfForcingSchedule()
    target = torch.full((2, 4, 3, 6, 6), 0.5)
    runner = _Recorder(target)
    assert isinstance(runner, ChunkRunner)
    ctx = torch.randn(1, 8, 32)
    out = generate(runner, ctx, 3, latent_shape=(4, 6, 6), batch_size=2, progress=False)
    assert runner.resets == [(2, torch.device("cpu"), torch.float32, 9)]
    assert out.shape == (2, 4, 9, 6, 6)
    assert len(runner.calls) == 3 * 5
    sigmas = schedule.sigmas
    for chunk in range(3):
        calls = runner.calls[5 * chunk : 5 * chunk + 5]
        assert [c[2] for c in calls] == [3 * chunk] * 5
        assert [c[3] for c in calls] == [False] * 4 + [True]
        for (_, t, _, _), want in zip(calls, [*schedule.timesteps, 0.0], strict=True):
            assert t.shape == (2, 3) and torch.all(t == torch.tensor(want, dtype=torch.float32))
        x0s = [(1 - s) * x + s * target for (x, *_), s in zip(calls[:4], sigmas, strict=True)]
        for x0, (x_next, *_), s_next in zip(x0s[:3], calls[1:4], sigmas[1:], strict=True):
            fresh = (x_next - (1 - s_next) * x0) / s_next
            # the re-noising term is fresh standard noise, not the previous pass's noise
            assert abs(fresh.mean()) < 0.2 and 0.8 < fresh.std() < 1.2
        torch.testing.assert_close(calls[4][0], x0s[-1])
        torch.testing.assert_close(out[:, :, 3 * chunk : 3 * chunk + 3], x0s[-1])
    first_noise = runner.calls[0][0]
    assert not torch.equal(first_noise[0], first_noise[1])
    assert not torch.equal(runner.calls[0][0], runner.calls[5][0])


@pytest.fixture(scope="module")
def tiny():
    return CausalWanModel(WanConfig.preset("tiny"))


def test_deterministic_under_seed(tiny):
    ctx = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))

    def run(seed, cache):
        return generate(
            EagerRunner(tiny, cache), ctx, 2, latent_shape=(4, 16, 16), seed=seed, progress=False
        )

    a, b, c = run(0, GlobalCache()), run(0, GlobalCache()), run(1, GlobalCache())
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (1, 4, 6, 16, 16) and torch.isfinite(a).all()
    # with two chunks a window of 6 frames still sees everything
    torch.testing.assert_close(run(0, RollingCache(6)), a)


def test_misaligned_rollout():
    cfg = WanConfig.preset("tiny_misaligned")
    runner = EagerRunner(CausalWanModel(cfg), RollingCache(6, sink_frames=1))
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim)
    out = generate(runner, ctx, 3, latent_shape=(4, 10, 14), batch_size=2, progress=False)
    assert out.shape == (2, 4, 9, 10, 14) and torch.isfinite(out).all()
    assert runner.next_frame == 9 and runner.cache.frames == (0, 7, 8)


def test_bad_generate_arguments(tiny):
    runner = EagerRunner(tiny)
    ctx = torch.randn(1, 8, 32)
    cases = [
        (dict(num_chunks=0), ValueError, "num_chunks"),
        (dict(latent_shape=(4, 16)), ValueError, "latent_shape"),
        (dict(latent_shape=(4, 0, 16)), ValueError, "latent_shape"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(context=torch.randn(3, 8, 32), batch_size=2), ValueError, "context batch"),
        (dict(context=torch.randn(8, 32)), ValueError, "context"),
        (dict(schedule="self-forcing"), TypeError, "schedule"),
        (dict(seed=0.5), TypeError, "seed"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(context=ctx, num_chunks=1, latent_shape=(4, 16, 16), progress=False)
        kwargs.update(overrides)
        with pytest.raises(error, match=message):
            generate(runner, **kwargs)


def test_prefix_is_committed_then_sampled_after():
    target = torch.full((2, 4, 3, 6, 6), 0.5)
    runner = _Recorder(target)
    prefix = torch.randn(1, 4, 6, 6, 6)
    ctx = torch.randn(1, 8, 32)
    out = generate(
        runner, ctx, 2, latent_shape=(4, 6, 6), batch_size=2, progress=False, prefix=prefix
    )
    assert runner.resets == [(2, torch.device("cpu"), torch.float32, 12)]
    assert out.shape == (2, 4, 12, 6, 6)
    assert torch.equal(out[:, :, :6], prefix.expand(2, -1, -1, -1, -1))
    commits, sampled = runner.calls[:2], runner.calls[2:]
    for chunk, (x, t, start, commit) in enumerate(commits):
        assert commit and start == 3 * chunk and torch.all(t == 0)
        assert torch.equal(x, prefix[:, :, start : start + 3].expand(2, -1, -1, -1, -1))
    assert [c[2] for c in sampled] == [6] * 5 + [9] * 5
    # the sampled chunks are what a rollout without prefix samples (same noise, same runner)
    plain = generate(
        _Recorder(target), ctx, 2, latent_shape=(4, 6, 6), batch_size=2, progress=False
    )
    torch.testing.assert_close(out[:, :, 6:], plain)


def test_bad_prefix(tiny):
    ctx = torch.randn(1, 8, 32)
    cases = [
        (torch.zeros(4, 3, 16, 16), "5-D"),
        (torch.zeros(3, 4, 3, 16, 16), "batch_size"),
        (torch.zeros(1, 3, 3, 16, 16), "latent_shape"),
        (torch.zeros(1, 4, 3, 16, 8), "latent_shape"),
        (torch.zeros(1, 4, 4, 16, 16), "multiple of frames_per_chunk"),
        (torch.zeros(1, 4, 0, 16, 16), "multiple of frames_per_chunk"),
        (torch.zeros(1, 4, 3, 16, 16, dtype=torch.float64), "float64 on cpu"),
        ([0.0], "5-D"),
    ]
    for prefix, message in cases:
        runner = EagerRunner(tiny)
        with pytest.raises(ValueError, match=message) as error:
            generate(
                runner,
                ctx,
                1,
                latent_shape=(4, 16, 16),
                batch_size=2,
                progress=False,
                prefix=prefix,
            )
        assert str(error.value).startswith("prefix")
        assert runner.next_frame == 0
