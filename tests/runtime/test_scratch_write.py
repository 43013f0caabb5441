"""The fused scratch write (one Triton kernel; interpreted on CPU, compiled on a GPU) against
the pool's torch copies: the same pages, bit for bit, the same key reps, nothing else touched."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patterns import PersistentLocal, VideoGeometry
from runtime import scratch_write
from runtime.pool import PagePool
from runtime.scratch_write import write_scratch_supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pools(geometry, batch, kv_heads, head_dim, dtype, extra_frames=1):
    """(torch-path pool, fused pool), both poisoned with NaN so that a stray write shows."""
    ppf = geometry.pages_per_frame
    scratch = geometry.frames_per_chunk * ppf
    made = []
    for fused in (False, True):
        pool = PagePool(
            geometry, batch, kv_heads, head_dim, scratch + extra_frames * ppf, scratch,
            device=DEVICE, dtype=dtype, fused_writes=fused,
        )  # fmt: skip
        for t in (pool.k, pool.v, pool.key_reps):
            t.fill_(float("nan"))
        made.append(pool)
    return made


def chunk(geometry, batch, kv_heads, head_dim, dtype, seed, strided):
    """k, v BLHD of one chunk; `strided`: every other head of a wider tensor."""
    g = torch.Generator().manual_seed(seed)
    heads = 2 * kv_heads if strided else kv_heads
    shape = (batch, geometry.chunk_tokens, heads, head_dim)
    k, v = (torch.randn(shape, generator=g).mul(3).to(dtype).to(DEVICE) for _ in range(2))
    if strided:
        k, v = k[:, :, ::2], v[:, :, ::2]
    return k, v


def assert_same(ref: PagePool, got: PagePool, reps: bool):
    for name in ("k", "v"):
        assert torch.equal(getattr(got, name).isnan(), getattr(ref, name).isnan()), (
            f"{name}: written slots differ"
        )
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0,
                                   equal_nan=True)  # fmt: skip
    assert torch.equal(got.key_reps.isnan(), ref.key_reps.isnan()), "key reps written differ"
    if reps:
        torch.testing.assert_close(got.key_reps, ref.key_reps, rtol=1e-5, atol=1e-5,
                                   equal_nan=True)  # fmt: skip


@settings(max_examples=25, deadline=None)
@given(
    tokens_per_frame=st.sampled_from([16, 24, 40, 64]),
    frames_per_chunk=st.integers(1, 3),
    page_size=st.sampled_from([16, 32]),
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32, 64]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    reps=st.booleans(),
    strided=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_write_equals_the_torch_copies(
    tokens_per_frame, frames_per_chunk, page_size, batch, kv_heads, head_dim, dtype, reps,
    strided, seed,
):  # fmt: skip
    geometry = VideoGeometry(
        tokens_per_frame, frames_per_chunk=frames_per_chunk, page_size=page_size, q_block=16
    )
    ref, got = pools(geometry, batch, kv_heads, head_dim, dtype)
    k, v = chunk(geometry, batch, kv_heads, head_dim, dtype, seed, strided)
    assert write_scratch_supported(got.k, got.v, got.key_reps)
    for pool in (ref, got):
        pool.write_scratch(k, v, reps=reps)
    assert_same(ref, got, reps)
    # a second chunk over the first: every valid slot rewritten, the padding still untouched
    k2, v2 = chunk(geometry, batch, kv_heads, head_dim, dtype, seed + 1, strided)
    for pool in (ref, got):
        pool.write_scratch(k2, v2, reps=reps)
    assert_same(ref, got, reps)


def test_float64_pools_take_the_torch_path():
    geometry = VideoGeometry(24, frames_per_chunk=2, page_size=16, q_block=16)
    ref, got = pools(geometry, 1, 2, 16, torch.float64)
    k, v = chunk(geometry, 1, 2, 16, torch.float64, 0, strided=False)
    assert not write_scratch_supported(got.k, got.v, got.key_reps)
    for pool in (ref, got):
        pool.write_scratch(k, v)
    assert_same(ref, got, reps=True)


@pytest.mark.gpu
@pytest.mark.parametrize("reps", [True, False])
def test_gpu_fused_write_at_the_reference_models_shape(reps):
    """1560-token frames in 13 pages of 128 (the last with 24 tokens), 12 kv heads of 128."""
    geometry = VideoGeometry(1560, frames_per_chunk=3, page_size=128, q_block=128)
    ref, got = pools(geometry, 1, 12, 128, torch.bfloat16)
    k, v = chunk(geometry, 1, 12, 128, torch.bfloat16, 7, strided=False)
    for pool in (ref, got):
        pool.write_scratch(k, v, reps=reps)
    assert_same(ref, got, reps)


def test_a_rollout_with_fused_writes_equals_the_torch_copies(tiny, monkeypatch):
    """The whole runtime (scores from the fused key reps, persistent set, commits) over the
    misaligned tiny model: the same video either way."""
    from runtime import generate, reference_runner

    model, context = tiny
    assert model.config.head_dim >= 16
    cfg = model.config
    pattern = PersistentLocal(persistent_blocks=2, window_frames=4, local_topk=2)
    videos, calls = [], []
    kernel = scratch_write.write_scratch_pages

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(scratch_write, "write_scratch_pages", counted)
    monkeypatch.setattr("runtime.pool.write_scratch_pages", counted)
    init = PagePool.__init__
    for fused in (False, True):
        monkeypatch.setattr(
            PagePool,
            "__init__",
            lambda self, *a, fused=fused, **kw: init(self, *a, **kw, fused_writes=fused),
        )
        runner = reference_runner(model, pattern, page_size=16, q_block=32, backend="torch")
        videos.append(
            generate(
                runner,
                context,
                4,
                latent_shape=(cfg.in_channels, cfg.latent_height, cfg.latent_width),
                seed=3,
                progress=False,
            )  # fmt: skip
        )
    assert calls, "the fused path never ran"
    torch.testing.assert_close(videos[1], videos[0], atol=1e-5, rtol=1e-5)
