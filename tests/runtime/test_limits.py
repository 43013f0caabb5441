"""Frame limits are checked before any work: a rollout longer than the model's RoPE table is
rejected by `generate` before its first pass and by every runner's `reset`, cache unchanged."""

import pytest
import torch

from patterns import Dense, PersistentLocal, VideoGeometry
from runtime import AttentionRuntime, CausalWanModel, EagerRunner, WanConfig, generate
from runtime import reference_runner as make_reference_runner
from sparsify import sparsify

pytestmark = [
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]

ROPE = 8  # positions: two chunks of 3 frames fit, a third does not


class _Counting:
    """Forwards to a runner, counting its resets and passes."""

    def __init__(self, runner):
        self.runner, self.resets, self.passes = runner, 0, 0

    @property
    def max_frames(self):
        return self.runner.max_frames

    def reset(self, *args):
        self.resets += 1
        self.runner.reset(*args)

    def __call__(self, *args, **kwargs):
        self.passes += 1
        return self.runner(*args, **kwargs)


@pytest.fixture(scope="module")
def small_rope():
    config = WanConfig.preset("tiny", num_kv_heads=2, rope_positions=ROPE)
    model = CausalWanModel(config).eval()
    context = torch.randn(1, config.text_len, config.text_dim, generator=torch.Generator())
    return model, context


def _eager(model, context):
    return EagerRunner(model)


def _reference(model, context):
    return make_reference_runner(model, PersistentLocal(4, 6), page_size=16, q_block=32)


def _sparsified(model, context):
    x = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return sparsify(model, (x, torch.full((1, 3), 500.0), context, 0), Dense())


def _held(runner) -> tuple:
    """What the runner's cache holds (frames committed, bytes)."""
    inner = getattr(runner, "runtime", None)
    committed = runner.next_frame if inner is None else inner.committed_frames
    return committed, runner.current_kv_bytes, runner.peak_kv_bytes


@pytest.mark.parametrize("make", [_eager, _reference, _sparsified])
def test_a_rollout_past_the_rope_table_is_rejected_before_any_work(small_rope, make):
    model, context = small_rope
    shape = (4, 16, 16)
    runner = _Counting(make(model, context))
    assert runner.max_frames == EagerRunner(model).max_frames == ROPE
    generate(runner, context, 2, latent_shape=shape, progress=False)  # fits: 6 of 8 frames
    resets, passes, held = runner.resets, runner.passes, _held(runner.runner)
    assert passes == 2 * 5 and held[0] == 6
    with pytest.raises(ValueError, match=r"num_chunks=3.*limit of 8.*at most 2 chunks"):
        generate(runner, context, 3, latent_shape=shape, progress=False)
    assert (runner.resets, runner.passes, _held(runner.runner)) == (resets, passes, held)
    prefix = torch.zeros(1, *shape[:1], 3, *shape[1:])
    with pytest.raises(ValueError, match=r"num_chunks=2.*prefix of 3.*limit of 8.*at most 1 "):
        generate(runner, context, 2, latent_shape=shape, progress=False, prefix=prefix)
    assert (runner.resets, runner.passes, _held(runner.runner)) == (resets, passes, held)
    with pytest.raises(ValueError, match=r"num_frames=9 exceeds.*max_frames=8"):
        runner.runner.reset(1, "cpu", torch.float32, 9)
    assert _held(runner.runner) == held


def test_the_runtime_states_and_checks_its_limit():
    geometry = VideoGeometry(6, frames_per_chunk=2, page_size=4, q_block=8)
    with pytest.raises(ValueError, match="max_frames"):
        AttentionRuntime(Dense(), geometry, 1, 2, 1, 4, max_frames=0)
    assert AttentionRuntime(Dense(), geometry, 1, 2, 1, 4).max_frames is None
    rt = AttentionRuntime(Dense(), geometry, 1, 2, 1, 4, backend="torch", max_frames=4)
    rt.reset(1, "cpu", torch.float32, 4)
    q, kv = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 1, 4)
    with rt.chunk_pass(0, True):
        rt.states[0](q, kv, kv)
    held = (rt.committed_frames, rt.states[0].frames, rt.current_kv_bytes, rt.pool)
    with pytest.raises(ValueError, match="num_frames=6 exceeds"):
        rt.reset(1, "cpu", torch.float32, 6)
    assert (rt.committed_frames, rt.states[0].frames, rt.current_kv_bytes, rt.pool) == held
