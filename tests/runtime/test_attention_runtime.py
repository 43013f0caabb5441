import pytest
import torch

from patterns import BlockScorer, Dense, PersistentLocal, SinkWindow, VideoGeometry
from patterns.footprint import evaluate
from runtime import (
    AttentionRuntime,
    ChunkRunner,
    EagerRunner,
    GlobalCache,
    RollingCache,
    bind_reference_model,
    generate,
    reference_runner,
)

CHUNKS = 4


def _rollout(runner, model, context):
    cfg = model.config
    shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    return generate(runner, context, CHUNKS, latent_shape=shape, seed=7, progress=False)


@pytest.fixture(scope="module")
def eager_global(tiny):
    model, context = tiny
    return _rollout(EagerRunner(model, GlobalCache()), model, context)


@pytest.fixture(scope="module")
def eager_rolling(tiny):
    model, context = tiny
    return _rollout(EagerRunner(model, RollingCache(5, 1)), model, context)


@pytest.fixture(scope="module")
def eager_window(tiny):
    model, context = tiny
    return _rollout(EagerRunner(model, RollingCache(6)), model, context)


def _sparse(model, context, pattern):
    runner = reference_runner(model, pattern, page_size=16, q_block=32, backend="torch", debug=True)
    return _rollout(runner, model, context), runner


def test_dense_rollout_equals_the_eager_global_cache(tiny, eager_global):
    model, context = tiny
    out, runner = _sparse(model, context, Dense())
    torch.testing.assert_close(out, eager_global, atol=2e-5, rtol=1e-5)
    assert not torch.equal(out[:, :, :3], out[:, :, -3:])  # the chunks differ: not vacuous
    assert all(s.frames == tuple(range(3 * CHUNKS)) for s in runner.runtime.states)


def test_dense_window_with_sink_equals_the_eager_rolling_cache(tiny, eager_rolling):
    model, context = tiny
    out, runner = _sparse(model, context, Dense(window_frames=5, sink_frames=1))
    torch.testing.assert_close(out, eager_rolling, atol=2e-5, rtol=1e-5)
    out2, _ = _sparse(model, context, SinkWindow(1, 5))
    torch.testing.assert_close(out2, eager_rolling, atol=2e-5, rtol=1e-5)


def test_persistent_local_with_everything_visible_equals_dense(tiny, eager_global, eager_window):
    model, context = tiny
    no_memory, _ = _sparse(model, context, PersistentLocal(0, 6))
    torch.testing.assert_close(no_memory, eager_window, atol=2e-5, rtol=1e-5)
    # C large enough that every evicted page stays: the global cache again
    all_memory, runner = _sparse(model, context, PersistentLocal(10**4, 6))
    torch.testing.assert_close(all_memory, eager_global, atol=2e-5, rtol=1e-5)
    assert runner.runtime.states[0].num_persistent > 0
    # and a real sparse pattern differs (the comparison above can fail)
    sparse, _ = _sparse(model, context, PersistentLocal(2, 6, local_topk=2))
    assert (sparse - eager_global).abs().max() > 1e-3


def test_peak_bytes_reach_the_footprint_bound_and_never_exceed_it(tiny):
    model, context = tiny
    pattern = PersistentLocal(5, 6, local_topk=3)
    runner = reference_runner(model, pattern, page_size=16, q_block=32)
    rt = runner.runtime
    cfg = model.config
    shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    chunks = 6
    generate(runner, context, chunks, latent_shape=shape, progress=False)
    fp = pattern.footprint()
    sizes = dict(
        num_layers=cfg.num_layers,
        batch_size=1,
        kv_heads=cfg.num_kv_heads,
        dim=cfg.head_dim,
        element_bytes=4,
    )
    bound = evaluate(fp.peak_bound_bytes(), rt.geometry, **sizes)
    assert rt.peak_kv_bytes == bound
    assert rt.peak_kv_bytes == evaluate(fp.peak_bytes(), rt.geometry, chunks=chunks, **sizes)
    assert rt.current_kv_bytes == evaluate(fp.held_bytes(), rt.geometry, chunks=chunks, **sizes)
    assert rt.pool.num_pages == rt.pool.peak_used  # the pool was sized exactly


def test_chunks_must_come_in_order():
    geometry = VideoGeometry(6, frames_per_chunk=2, page_size=4, q_block=8)
    rt = AttentionRuntime(Dense(), geometry, 1, 2, 1, 4, backend="torch")
    with pytest.raises(RuntimeError, match="reset"):
        rt.begin_chunk(0)
    rt.reset(1, "cpu", torch.float32, 4)
    with pytest.raises(ValueError, match="start_frame=2"):
        rt.begin_chunk(2)
    q, kv = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 1, 4)
    with rt.chunk_pass(0, False):
        rt.states[0](q, kv, kv)
    with rt.chunk_pass(0, True):
        rt.states[0](q, kv, kv)
    assert rt.committed_frames == 2
    with pytest.raises(ValueError, match="start_frame=0"):
        rt.begin_chunk(0)
    with rt.chunk_pass(2, True):
        rt.states[0](q, kv, kv)
    with pytest.raises(ValueError, match="num_frames"):
        rt.begin_chunk(4)
    with pytest.raises(ValueError, match="phase"), rt.phase("sample"):
        pass


def test_a_commit_that_skips_a_layer_breaks_the_runtime_until_reset():
    geometry = VideoGeometry(6, frames_per_chunk=2, page_size=4, q_block=8)
    rt = AttentionRuntime(Dense(), geometry, 2, 2, 1, 4, backend="torch")
    rt.reset(1, "cpu", torch.float32, 4)
    q, kv = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 1, 4)
    with pytest.raises(RuntimeError, match="layers \\[1\\]"), rt.chunk_pass(0, True):
        rt.states[0](q, kv, kv)
    with pytest.raises(RuntimeError, match="inconsistent"):
        rt.begin_chunk(0)
    rt.reset(1, "cpu", torch.float32, 4)
    with rt.chunk_pass(0, True):
        for state in rt.states:
            state(q, kv, kv)
    assert rt.committed_frames == 2


def test_constructor_validation():
    geometry = VideoGeometry(6, frames_per_chunk=2, page_size=4, q_block=8)
    with pytest.raises(ValueError, match="window_frames"):
        AttentionRuntime(Dense(window_frames=3, sink_frames=2), geometry, 1, 2, 1, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionRuntime(Dense(), geometry, 1, 3, 2, 4)
    with pytest.raises(ValueError, match="backend"):
        AttentionRuntime(Dense(), geometry, 1, 2, 1, 4, backend="cuda")
    with pytest.raises(TypeError, match="pattern"):
        AttentionRuntime("dense", geometry, 1, 2, 1, 4)
    rt = AttentionRuntime(Dense(), geometry, 1, 2, 1, 4)
    with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
        rt.reset(1, "cpu", torch.float32, 5)


def test_runner_protocol_and_gate_parameters_in_the_state_dict(tiny):
    model, _ = tiny
    runner = reference_runner(model, PersistentLocal(4, 6))
    assert isinstance(runner, ChunkRunner)
    keys = runner.runtime.state_dict().keys()
    assert {f"states.{i}.scorer.wq" for i in range(model.config.num_layers)} <= set(keys)
    assert isinstance(runner.runtime.states[0].scorer, BlockScorer)
    # the runner's model calls the states; the original model is untouched
    bound = runner.chunk_fn
    assert bound.blocks[0].self_attn.attn is runner.runtime.states[0]
    assert model.blocks[0].self_attn.attn is not runner.runtime.states[0]
    with pytest.raises(ValueError, match="layers"):
        bind_reference_model(model, AttentionRuntime(Dense(), runner.runtime.geometry, 1, 4, 2, 16))
