"""EagerRunner: the cached chunk rollout equals teacher forcing with a block-causal mask."""

import dataclasses

import pytest
import torch
from torch import nn

from runtime.eager import EagerRunner, GlobalCache, RollingCache
from runtime.model import ATTENTION_MODULES, CausalWanModel
from runtime.model_config import WanConfig

# Eager flex_attention on CPU is the intended "flex" spelling here, not a missed compile.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PASSES = (900.0, 400.0, 0.0)  # two denoising passes, then the commit pass at t = 0


def _teacher_mask(num_frames, fpc, tokens, window=None, sink=0):
    """Token mask of the full sequence: chunk-causal; with a window, history frames are the
    first `sink` frames plus the newest ones, at most `window` frames with the own chunk."""
    frame = torch.arange(num_frames)
    qf, kf = frame[:, None], frame[None, :]
    q_chunk, k_chunk = qf // fpc, kf // fpc
    own = k_chunk == q_chunk
    history = k_chunk < q_chunk
    if window is not None:
        chunk_start = q_chunk * fpc
        newest = window - fpc - chunk_start.clamp(max=sink)
        history &= (kf < sink) | (kf >= chunk_start - newest)
    frames_mask = own | history
    return frames_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def _check_against_teacher_forcing(model, cache, window=None, sink=0, chunks=4, batch=2):
    cfg = model.config
    fpc, tokens = cfg.frames_per_chunk, cfg.tokens_per_frame
    runner = EagerRunner(model, cache)
    runner.reset(batch, "cpu", torch.float32, chunks * fpc)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    clean = []
    shape = (batch, cfg.in_channels, fpc, cfg.latent_height, cfg.latent_width)
    for c in range(chunks):
        for t in PASSES:
            x = torch.randn(shape, generator=g)
            timestep = torch.full((batch, fpc), t)
            got = runner(x, timestep, ctx, c * fpc, commit=t == 0.0)
            full = torch.cat([*clean, x], dim=2)
            full_t = torch.cat([torch.zeros(batch, c * fpc), timestep], dim=1)
            mask = _teacher_mask((c + 1) * fpc, fpc, tokens, window, sink)
            want = model(full, full_t, ctx, 0, attn_mask=mask)[:, :, -fpc:]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            if t == 0.0:
                clean.append(x)
    return runner


def _frame_bytes(cfg, batch=2, itemsize=4):
    """K and V bytes of one frame in one layer."""
    return 2 * batch * cfg.tokens_per_frame * cfg.num_kv_heads * cfg.head_dim * itemsize


# After 4 chunks of 3 frames with 2 layers: frames held, and the peak in frame-layer units.
# Every layer holds its history plus the chunk being committed until the commit pass ends
# (Self-Forcing's in-place buffers), so the peak is layers x (history + chunk).
CACHES = [
    pytest.param(lambda: GlobalCache(), None, 0, tuple(range(12)), 2 * 12, id="global"),
    pytest.param(lambda: RollingCache(6), 6, 0, (9, 10, 11), 2 * (3 + 3), id="window6"),
    pytest.param(
        lambda: RollingCache(5, sink_frames=1), 5, 1, (0, 11), 2 * (2 + 3), id="window5-sink1"
    ),
    pytest.param(lambda: RollingCache(3), 3, 0, (), 2 * 3, id="window3-no-history"),
]


@torch.no_grad()
@pytest.mark.parametrize(("make_cache", "window", "sink", "held", "peak_units"), CACHES)
def test_cached_rollout_equals_teacher_forcing(make_cache, window, sink, held, peak_units):
    model = CausalWanModel(WanConfig.preset("tiny"))
    runner = _check_against_teacher_forcing(model, make_cache(), window, sink)
    unit = _frame_bytes(model.config)
    assert runner.cache.frames == held
    assert runner.current_kv_bytes == model.config.num_layers * len(held) * unit
    assert runner.peak_kv_bytes == peak_units * unit


@torch.no_grad()
def test_teacher_forcing_misaligned_gqa_unfused():
    cfg = WanConfig.preset("tiny_misaligned", num_kv_heads=2, attn_impl="unfused")
    _check_against_teacher_forcing(CausalWanModel(cfg), RollingCache(7, 2), 7, 2, chunks=3, batch=1)


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa_kw", "unfused", "flex"])
def test_cached_path_uses_the_configured_spelling(impl):
    base = WanConfig.preset("tiny")
    outs = {}
    calls = []
    for name in ("sdpa", impl):
        model = CausalWanModel(dataclasses.replace(base, attn_impl=name))
        inner = model.blocks[1].self_attn.attn

        class Spy(nn.Module):
            def forward(self, q, k, v, _inner=inner):
                calls.append((type(_inner).__name__, k.shape[1]))
                return _inner(q, k, v)

        model.blocks[1].self_attn.attn = Spy()
        runner = EagerRunner(model)
        runner.reset(1, "cpu", torch.float32, 6)
        g = torch.Generator().manual_seed(0)
        ctx = torch.randn(1, base.text_len, base.text_dim, generator=g)
        results = []
        for start in (0, 3):
            for t in PASSES:
                x = torch.randn(1, 4, 3, 16, 16, generator=g)
                results.append(runner(x, torch.full((1, 3), t), ctx, start, commit=t == 0))
        outs[name] = torch.stack(results)
    torch.testing.assert_close(outs[impl], outs["sdpa"], atol=1e-5, rtol=1e-5)
    chunk = 3 * base.tokens_per_frame
    expected_lengths = [chunk] * 3 + [2 * chunk] * 3
    assert [length for _, length in calls] == expected_lengths * 2
    assert {name for name, _ in calls[6:]} == {ATTENTION_MODULES[impl].__name__}


@torch.no_grad()
def test_rejected_calls_change_nothing():
    model = CausalWanModel(WanConfig.preset("tiny"))
    runner = EagerRunner(model, RollingCache(6))
    x = torch.randn(1, 4, 3, 16, 16)
    t, ctx = torch.zeros(1, 3), torch.randn(1, 8, 32)
    with pytest.raises(RuntimeError, match="reset"):
        runner(x, t, ctx, 0, commit=True)
    runner.reset(1, "cpu", torch.float32, 6)
    reference = EagerRunner(model, RollingCache(6))
    reference.reset(1, "cpu", torch.float32, 6)
    for r in (runner, reference):
        r(x, t, ctx, 0, commit=True)
    state = (runner.cache.frames, runner.current_kv_bytes, runner.peak_kv_bytes, runner.next_frame)
    bad_calls = [
        ((x, t, ctx, 0, True), ValueError, "next chunk starts at frame 3"),
        ((x, t, ctx, 6, True), ValueError, "next chunk starts"),
        ((x.expand(2, -1, -1, -1, -1), t, ctx, 3, True), ValueError, "batch"),
        ((x.double(), t, ctx, 3, True), ValueError, "float64"),
        ((x[:, :, :2], t[:, :2], ctx, 3, True), ValueError, "exactly frames_per_chunk"),
        ((x, t, ctx[..., :4], 3, True), ValueError, "text_dim"),
        ((x, t, ctx, 3.0, True), TypeError, "start_frame"),
        ((x, t, ctx, 3, 1), TypeError, "commit"),
    ]
    for args, error, message in bad_calls:
        with pytest.raises(error, match=message):
            runner(*args)
        assert state == (
            runner.cache.frames,
            runner.current_kv_bytes,
            runner.peak_kv_bytes,
            runner.next_frame,
        )
    y = torch.randn(1, 4, 3, 16, 16)
    torch.testing.assert_close(runner(y, t, ctx, 3, True), reference(y, t, ctx, 3, True))
    with pytest.raises(ValueError, match="past num_frames"):
        runner(y, t, ctx, 6, commit=False)


def test_bad_construction():
    model = CausalWanModel(WanConfig.preset("tiny"))
    with pytest.raises(TypeError, match="model"):
        EagerRunner(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cache"):
        EagerRunner(model, cache="global")
    with pytest.raises(ValueError, match="window_frames"):
        RollingCache(0)
    with pytest.raises(ValueError, match="sink_frames"):
        RollingCache(6, sink_frames=-1)
    with pytest.raises(TypeError, match="window_frames"):
        RollingCache(6.0)
    runner = EagerRunner(model, RollingCache(4, sink_frames=2))
    with pytest.raises(ValueError, match="window_frames=4 must be at least"):
        runner.reset(1, "cpu", torch.float32, 6)
    runner = EagerRunner(model)
    with pytest.raises(ValueError, match="num_frames"):
        runner.reset(1, "cpu", torch.float32, 7)
    with pytest.raises(ValueError, match="batch_size"):
        runner.reset(0, "cpu", torch.float32, 6)
