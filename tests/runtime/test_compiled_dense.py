"""`CompiledDenseRunner` and its `RingFrameCache` against the eager dense runner."""

import pytest
import torch

from patterns import CachePolicy
from runtime import CausalWanModel, EagerRunner, WanConfig, generate
from runtime.compiled_dense import CompiledDenseRunner
from runtime.eager import FrameCache


@pytest.fixture(scope="module")
def small():
    config = WanConfig.preset("tiny_misaligned", num_kv_heads=2)
    model = CausalWanModel(config).eval()
    context = torch.randn(1, config.text_len, config.text_dim, generator=torch.Generator())
    return model, context


def _roll(runner, model, context, chunks):
    cfg = model.config
    shape = (cfg.in_channels, cfg.latent_height, cfg.latent_width)
    return generate(runner, context, chunks, latent_shape=shape, seed=3, progress=False)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "policy",
    [CachePolicy(), CachePolicy(9), CachePolicy(12, 3), CachePolicy(10, 1)],
    ids=["global", "window9", "window12-sink3", "window10-sink1"],
)
def test_ring_cache_runner_equals_eager_dense(small, policy):
    """Same outputs (keys in slot order: rounding only), frames held and KV peak as the
    eager runner with the same policy, over a rollout long enough to roll the window."""
    model, context = small
    eager = EagerRunner(model, FrameCache(policy))
    ring = CompiledDenseRunner(model, policy, compile=False)
    ref = _roll(eager, model, context, 6)
    out = _roll(ring, model, context, 6)
    assert _rel(out, ref) < 1e-5
    assert ring.cache.frames == eager.cache.frames
    assert ring.peak_kv_bytes == eager.peak_kv_bytes > 0
    assert ring.current_kv_bytes == eager.current_kv_bytes
    # a second rollout on the same runner reuses the buffers and gives the same video
    addresses = ring.cache.buffer_addresses()
    assert _rel(_roll(ring, model, context, 6), ref) < 1e-5
    assert ring.cache.buffer_addresses() == addresses


def test_ring_cache_rolls_without_moving_frames(small):
    """In the steady state a chunk takes the slots of the frames it replaces: the attended
    prefix is the whole buffer, and the held frames' K stay where they were written."""
    model, context = small
    cfg = model.config
    ring = CompiledDenseRunner(model, CachePolicy(9), compile=False)
    ring.reset(1, "cpu", torch.float32, 12)
    x = torch.randn(1, cfg.in_channels, 3, cfg.latent_height, cfg.latent_width)
    t = torch.zeros(1, 3)
    for start in (0, 3, 6):
        ring(x, t, context, start, commit=True)
    cache, tokens = ring.cache, cfg.tokens_per_frame
    assert cache.frames == (3, 4, 5, 6, 7, 8)
    held = cache.k[0][:, 3 * tokens :].clone()
    chunk = cache.k[0][:, : 3 * tokens].clone()
    ring(x + 1, t, context, 9, commit=True)
    assert cache.write_index.tolist() == list(range(3 * tokens))  # frames 0..2's old slots
    assert torch.equal(cache.k[0][:, 3 * tokens :], held)
    assert not torch.equal(cache.k[0][:, : 3 * tokens], chunk)
    assert cache.frames == (6, 7, 8, 9, 10, 11)


def test_compiled_blocks_share_one_set_of_graphs(small):
    """torch.compile of the blocks (the debug 'eager' backend: what dynamo captures, not
    inductor's code) gives the eager result and no recompilation across layers and the
    changing attended lengths."""
    from torch._dynamo.utils import counters

    model, context = small
    torch._dynamo.reset()
    counters.clear()
    policy = CachePolicy(9)
    runner = CompiledDenseRunner(model, policy, compile_options=dict(backend="eager"))
    out = _roll(runner, model, context, 4)
    ref = _roll(EagerRunner(model, FrameCache(policy)), model, context, 4)
    assert _rel(out, ref) < 1e-5
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 4  # block parts before and after the eager self-attention
    assert not counters["recompiles"]
    torch._dynamo.reset()


def test_rejects_bad_arguments(small):
    model, context = small
    with pytest.raises(ValueError, match="persistent_capacity"):
        CompiledDenseRunner(model, CachePolicy(9, 0, 4))
    with pytest.raises(ValueError, match="sdpa_backend"):
        CompiledDenseRunner(model, sdpa_backend="fast")
    with pytest.raises(TypeError, match="model"):
        CompiledDenseRunner(torch.nn.Linear(2, 2))
    runner = CompiledDenseRunner(model, compile=False)
    x = torch.randn(1, 4, 3, 10, 14)
    t = torch.zeros(1, 3)
    with pytest.raises(RuntimeError, match="reset"):
        runner(x, t, context, 0, commit=False)
    runner.reset(1, "cpu", torch.float32, 6)
    with pytest.raises(ValueError, match="start_frame=3"):
        runner(x, t, context, 3, commit=False)
    with pytest.raises(ValueError, match="num_frames"):
        runner.reset(1, "cpu", torch.float32, 7)
    assert runner.next_frame == 0


def test_fa4_without_its_package_fails_at_construction_naming_it(small):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    model, _ = small
    with pytest.raises(ImportError, match="sdpa_backend='fa4' needs flash-attn-4"):
        CompiledDenseRunner(model, sdpa_backend="fa4", compile=False)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "auto"])
def test_graphed_runner_equals_eager_dense_on_cuda(backend):
    """CUDA graphs (one per attended length), compiled blocks, cuDNN or PyTorch's SDPA: the
    bf16 result of eager dense, twice (the second rollout replays every pass)."""
    cfg = WanConfig.preset("tiny", num_kv_heads=2)  # 64 tokens per frame, D 16
    model = CausalWanModel(cfg).cuda().bfloat16().eval()
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    policy = CachePolicy(9)
    ref = _roll(EagerRunner(model, FrameCache(policy)), model, context, 6)
    runner = CompiledDenseRunner(model, policy, sdpa_backend=backend)
    for _ in range(2):
        assert _rel(_roll(runner, model, context, 6).float(), ref.float()) < 2e-2
    assert runner.graphs.replays > 0 and len(runner.graphs) == 3  # 3, 6, then 9 frames


@pytest.mark.gpu
def test_graphed_fa4_runner_equals_eager_dense_on_cuda():
    """FA4 replaces the model's attention spelling: the same video as eager dense's, within
    bf16 rounding, graphed (head_dim 64, a size FA4 supports)."""
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not installed")
    cfg = WanConfig.preset("tiny", dim=128, num_heads=2, num_kv_heads=1)
    model = CausalWanModel(cfg).cuda().bfloat16().eval()
    context = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    policy = CachePolicy(9)
    ref = _roll(EagerRunner(model, FrameCache(policy)), model, context, 6)
    runner = CompiledDenseRunner(model, policy, sdpa_backend="fa4")
    for _ in range(2):
        assert _rel(_roll(runner, model, context, 6).float(), ref.float()) < 2e-2
    assert runner.graphs.replays > 0
