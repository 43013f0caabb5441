"""CUDA-graph replay of passes (`runtime.graphs`): what makes a replay valid (host-side, on
every machine) and that graphed rollouts equal eager ones (on a GPU)."""

import copy

import pytest
import torch

from patterns import Dense, PersistentLocal, TopK
from runtime import generate, reference_runner

CHUNKS = 7


PATTERNS = {
    "persistent_local": PersistentLocal(persistent_blocks=3, window_frames=4, local_topk=2),
    "dense_window": Dense(window_frames=5, sink_frames=1),
    "topk": TopK(density=0.5, nearest_frames=1, window_frames=6),
}


def _runner(model, pattern, device="cpu", **kw):
    runner = reference_runner(model, pattern, page_size=16, q_block=32, **kw)
    return runner.to(device)


def _host_state(runner):
    runtime = runner.runtime
    pool = runtime.pool
    return (
        runtime.committed_frames,
        pool.num_used,
        pool.peak_used,
        [(s.frames, s.num_persistent, s.committed_frames) for s in runtime.states],
    )


def _chunk_inputs(model, context, chunk):
    cfg = model.config
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(1, cfg.in_channels, cfg.frames_per_chunk, cfg.latent_height,
                    cfg.latent_width, generator=g)  # fmt: skip
    return x, torch.zeros(1, cfg.frames_per_chunk), context


@pytest.mark.parametrize("name", list(PATTERNS))
def test_replay_commit_redoes_exactly_the_host_side_of_a_commit(tiny, name):
    """A replayed commit pass runs no Python in the layers: ``replay_commit`` must leave the
    frames, counts and pool accounting exactly as the real commit does, chunk after chunk."""
    model, context = tiny
    runner = _runner(model, PATTERNS[name], backend="torch", cuda_graphs=False)
    frames = model.config.frames_per_chunk
    runner.reset(1, "cpu", torch.float32, CHUNKS * frames)
    with torch.no_grad():
        for chunk in range(CHUNKS):
            x, t, ctx = _chunk_inputs(model, context, chunk)
            start = chunk * frames
            runner(x, t, ctx, start, commit=False)
            replayed = copy.deepcopy(runner)
            runner(x, t, ctx, start, commit=True)
            with replayed.runtime.chunk_pass(start, commit=True):
                replayed.runtime.replay_commit()
            assert _host_state(replayed) == _host_state(runner)


@pytest.mark.parametrize("pattern", [PATTERNS["persistent_local"], Dense(window_frames=5)], ids=str)
def test_steady_state_chunks_share_one_signature(tiny, pattern):
    """Once the window is full, every chunk's device work is the same up to buffer contents:
    the signature (the key of a graph) stops changing, so one graph serves the rest. (Sink
    frames sit ever further back from the chunk: with sinks only a chunk's own passes share
    a graph.)"""
    model, context = tiny
    runner = _runner(model, pattern, backend="torch", cuda_graphs=False)
    frames = model.config.frames_per_chunk
    runner.reset(1, "cpu", torch.float32, CHUNKS * frames)
    signatures = []
    with torch.no_grad():
        for chunk in range(CHUNKS):
            x, t, ctx = _chunk_inputs(model, context, chunk)
            runner.runtime.begin_chunk(chunk * frames)
            signatures.append(runner.runtime.signature())
            runner(x, t, ctx, chunk * frames, commit=True)
    assert signatures[0] != signatures[-1]  # the first chunk has no history
    assert len(set(signatures[-3:])) == 1


def test_reset_keeps_buffers_of_the_same_layout_and_clears_them(tiny):
    """Graphs outlive a reset only when the buffers they read keep their addresses."""
    model, context = tiny
    runner = _runner(model, PATTERNS["persistent_local"], backend="torch")
    frames = model.config.frames_per_chunk
    runtime = runner.runtime
    runner.reset(1, "cpu", torch.float32, CHUNKS * frames)
    with torch.no_grad():
        for chunk in range(3):
            x, t, ctx = _chunk_inputs(model, context, chunk)
            runner(x, t, ctx, chunk * frames, commit=True)
    addresses = runtime.buffer_addresses()
    runner.reset(1, "cpu", torch.float32, CHUNKS * frames)
    assert runtime.buffer_addresses() == addresses
    pool = runtime.pool
    assert pool.num_used == pool.peak_used == pool.scratch_pages
    assert not pool.k.any() and int(pool.used.sum()) == pool.scratch_pages * pool.num_kv_heads
    state = runtime.states[0]
    assert state.frames == () and bool((state._persistent == -1).all())
    runner.reset(2, "cpu", torch.float32, CHUNKS * frames)
    assert runtime.buffer_addresses() != addresses


def test_signature_depends_on_history_relative_to_the_chunk(tiny):
    model, _ = tiny
    runner = _runner(model, PATTERNS["persistent_local"], backend="torch")
    runner.reset(1, "cpu", torch.float32, CHUNKS * model.config.frames_per_chunk)
    state = runner.runtime.states[0]
    state._frames, state._num_persistent, state._committed = [3, 4, 5], 2, 6
    runner.runtime._context.chunk_start = 6
    first = state.signature()
    state._frames, state._committed = [6, 7, 8], 9
    runner.runtime._context.chunk_start = 9
    assert state.signature() == first
    state._num_persistent = 3
    assert state.signature() != first


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PATTERNS))
def test_graphed_rollout_equals_the_eager_rollout(tiny, name):
    """Captures and replays (within a chunk and across the steady-state chunks, commit passes
    included) give the eager rollout's latents, cache accounting and final host state."""
    model, context = tiny
    cfg = model.config
    shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    context = context.cuda()
    results = {}
    for graphed in (False, True):
        runner = _runner(model, PATTERNS[name], device="cuda", cuda_graphs=graphed)
        with torch.no_grad():
            out = generate(runner, context, CHUNKS, latent_shape=shape, seed=3, progress=False)
        results[graphed] = (out, _host_state(runner), runner.peak_kv_bytes, runner.graphs)
    (eager, eager_host, eager_peak, _), (graph, graph_host, graph_peak, graphs) = (
        results[False],
        results[True],
    )
    assert graphs.captures >= 2 and graphs.replays >= 2 * CHUNKS
    torch.testing.assert_close(graph, eager, rtol=1e-4, atol=1e-4)
    assert graph_host == eager_host and graph_peak == eager_peak


@pytest.mark.gpu
def test_a_second_rollout_of_the_same_shape_replays_every_pass(tiny):
    model, context = tiny
    cfg = model.config
    shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    context = context.cuda()
    runner = _runner(model, PATTERNS["persistent_local"], device="cuda")
    outs = []
    with torch.no_grad():
        for seed in (3, 4, 3):
            outs.append(generate(runner, context, CHUNKS, latent_shape=shape, seed=seed))
            if len(outs) == 2:
                captures, replays = runner.graphs.captures, runner.graphs.replays
    # The first rollout runs each phase's first pass eagerly; the second captures the one
    # commit that was eager; the third captures nothing and replays every pass.
    counts = (runner.graphs.captures - captures, runner.graphs.replays - replays)
    assert counts == (0, 5 * CHUNKS)
    # the first rollout ran some passes eagerly: equal up to kernel choice, not bitwise
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-4, atol=1e-4)
    assert not torch.equal(outs[1], outs[0])


@pytest.mark.gpu
def test_graphed_runner_rejects_bad_input_without_touching_the_cache(tiny):
    model, context = tiny
    cfg = model.config
    runner = _runner(model, PATTERNS["persistent_local"], device="cuda")
    runner.reset(1, "cuda", torch.float32, CHUNKS * cfg.frames_per_chunk)
    x, t, ctx = (v.cuda() for v in _chunk_inputs(model, context, 0))
    with torch.no_grad():
        for _ in range(3):
            runner(x, t, ctx, 0, commit=False)  # eager, captured, replayed
        before = _host_state(runner)
        with pytest.raises(ValueError):
            runner(x[:, :, :1], t, ctx, 0, commit=False)
        with pytest.raises(ValueError):
            runner(x, t, ctx, 3, commit=False)
        assert _host_state(runner) == before
