"""The training table of a teacher-forced clip equals, chunk by chunk, the tables the paged
runtime builds during a cached rollout of the same clip (same q/k, same scorer)."""

import pytest
import torch

from patterns import (
    BlockScorer,
    Dense,
    PersistentLocal,
    SinkWindow,
    TopK,
    VideoGeometry,
)
from patterns.training_table import clip_key_reps, clip_table
from runtime import AttentionRuntime
from runtime.pool import PagePool
from world.teacher_forcing import block_causal_mask

GEOMETRY = VideoGeometry(tokens_per_frame=32, frames_per_chunk=3, page_size=16, q_block=16)
B, H, HKV, D = 2, 4, 2, 16
CLIP = 15  # five chunks: frames leave every window below

PATTERNS = {
    "persistent_local": PersistentLocal(persistent_blocks=3, window_frames=6, local_topk=3),
    # window < 2 chunks: the chunk's own first frames leave at their commit (transient pages)
    "persistent_local_transient": PersistentLocal(
        persistent_blocks=4, window_frames=5, local_density=0.4
    ),
    "persistent_local_no_own": PersistentLocal(
        persistent_blocks=2, window_frames=9, local_topk=4, force_own_frame=False
    ),
    "topk": TopK(density=0.3, sink_frames=1, nearest_frames=1, window_frames=12),
    "sink_window": SinkWindow(sink_frames=3, window_frames=6),
    "dense_window": Dense(window_frames=9, sink_frames=3),
}


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    length = 2 * CLIP * GEOMETRY.tokens_per_frame
    q = torch.randn(B, length, H, D, generator=gen)
    k = torch.randn(B, length, HKV, D, generator=gen)
    v = torch.randn(B, length, HKV, D, generator=gen)
    scorer = BlockScorer(H, HKV, D)
    with torch.no_grad():
        scorer.wq.add_(0.5 * torch.randn(scorer.wq.shape, generator=gen))
        scorer.wk.add_(0.5 * torch.randn(scorer.wk.shape, generator=gen))
    return q, k, v, scorer


def _rollout_tables(pattern, q, k, v, scorer, monkeypatch):
    """(clean, noisy) per chunk: the tables the runtime's state made in the commit pass and
    in a denoising pass, each with the pool's key reps at that moment."""
    runtime = AttentionRuntime(pattern, GEOMETRY, 1, H, HKV, D, backend="torch", debug=True)
    state = runtime.states[0]
    state.scorer.load_state_dict(scorer.state_dict())
    made = []
    select = type(pattern).select

    def capture(self, view):
        table = select(self, view)
        made.append((table, view.key_reps.clone()))
        return table

    monkeypatch.setattr(type(pattern), "select", capture)
    # Pages are matched to clip pages by their key reps, which patterns that never read reps
    # leave stale in the scratch pages: pool them on every pass (the tables do not change).
    write = PagePool.write_scratch
    monkeypatch.setattr(
        PagePool, "write_scratch", lambda self, k, v, reps=True: write(self, k, v, reps=True)
    )
    runtime.reset(B, "cpu", torch.float32, CLIP)
    t, fpc = GEOMETRY.tokens_per_frame, GEOMETRY.frames_per_chunk
    chunks = []
    for start in range(0, CLIP, fpc):
        clean = slice(start * t, (start + fpc) * t)
        noisy = slice((CLIP + start) * t, (CLIP + start + fpc) * t)
        with runtime.chunk_pass(start, commit=False):
            state(q[:, noisy], k[:, noisy], v[:, noisy])
        with runtime.chunk_pass(start, commit=True):
            state(q[:, clean], k[:, clean], v[:, clean])
        (noisy_table, noisy_reps), (clean_table, clean_reps) = made[-2:]
        chunks.append(((clean_table, clean_reps), (noisy_table, noisy_reps)))
    monkeypatch.undo()
    return chunks


def _as_clip_pages(table, pool_reps, clip_reps):
    """bool [B, H, Mq, clip pages]: the table's pool pages named by the clip page holding the
    same keys (matched by their mean key: random keys make every page's distinct)."""
    num_pages = pool_reps.shape[2]
    visible = table.visible_pages(num_pages)  # [B, H, Mq, NP]
    dist = torch.cdist(pool_reps, clip_reps, compute_mode="donot_use_mm_for_euclid_dist")
    nearest = dist.argmin(-1)
    match = torch.nn.functional.one_hot(nearest, clip_reps.shape[2]).bool()
    group = H // HKV
    listed_kv = visible.unflatten(1, (HKV, group)).any(2).any(2)  # [B, Hkv, NP]
    assert bool((dist.min(-1).values[listed_kv] < 1e-5).all()), "a listed page holds no clip keys"
    match_h = match.repeat_interleave(group, dim=1).float()  # [B, H, NP, NPc]
    return torch.einsum("bhmp,bhpc->bhmc", visible.float(), match_h) > 0


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_clip_table_equals_rollout_tables(name, monkeypatch):
    pattern = PATTERNS[name]
    q, k, v, scorer = _inputs(seed=len(name))
    expected = _rollout_tables(pattern, q, k, v, scorer, monkeypatch)
    got = clip_table(pattern, GEOMETRY, CLIP, q, k, scorer, per_chunk=True)
    clip_reps = clip_key_reps(k, GEOMETRY)
    num_clip_pages = clip_reps.shape[2]
    chosen_by_score = 0
    for c, (pair_got, pair_expected) in enumerate(zip(got, expected, strict=True)):
        for half, table, (ref, reps) in zip(
            ("clean", "noisy"), pair_got, pair_expected, strict=True
        ):
            table.validate(num_clip_pages)
            mine = table.visible_pages(num_clip_pages)
            theirs = _as_clip_pages(ref, reps, clip_reps)
            assert torch.equal(mine, theirs), f"{name}: chunk {c} ({half}) differs"
            # scores decide: query heads of one kv head choose different pages
            chosen_by_score += bool((mine != mine[:, :1]).any())
    if name.startswith(("persistent", "topk")):
        assert chosen_by_score, "no table depends on the scores: the test would be vacuous"


def test_whole_clip_table_stacks_the_chunks():
    pattern = PATTERNS["persistent_local"]
    q, k, _, scorer = _inputs(seed=3)
    whole = clip_table(pattern, GEOMETRY, CLIP, q, k, scorer)
    whole.validate(clip_key_reps(k, GEOMETRY).shape[2])
    chunks = clip_table(pattern, GEOMETRY, CLIP, q, k, scorer, per_chunk=True)
    rows = [c for c, _ in chunks] + [n for _, n in chunks]
    pages = whole.visible_pages(2 * CLIP * GEOMETRY.pages_per_frame)
    per_chunk = GEOMETRY.q_blocks_per_chunk
    for i, table in enumerate(rows):
        part = pages[:, :, i * per_chunk : (i + 1) * per_chunk]
        assert torch.equal(part, table.visible_pages(pages.shape[-1]))


def test_dense_pattern_is_the_dense_teacher_forcing_visibility():
    q, k, _, _ = _inputs(seed=1)
    table = clip_table(Dense(), GEOMETRY, CLIP, q, k)
    lens = torch.full((B, HKV, 2 * CLIP * GEOMETRY.pages_per_frame), GEOMETRY.page_size)
    mask = table.to_dense_mask(lens)
    expected = block_causal_mask(CLIP, GEOMETRY.frames_per_chunk, GEOMETRY.tokens_per_frame)
    assert torch.equal(mask, expected.expand_as(mask))


def test_bad_geometry_and_inputs():
    q, k, _, _ = _inputs(seed=2)
    pattern = PATTERNS["persistent_local"]
    misaligned = VideoGeometry(tokens_per_frame=24, frames_per_chunk=3, page_size=16, q_block=16)
    with pytest.raises(ValueError, match="page_size"):
        clip_table(pattern, misaligned, CLIP, q, k)
    with pytest.raises(ValueError, match="clip_frames"):
        clip_table(pattern, GEOMETRY, 14, q, k)
    with pytest.raises(ValueError, match="k must be BLHD"):
        clip_table(pattern, GEOMETRY, CLIP, q, k[:, :-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused CUDA selection")
@pytest.mark.parametrize("name", ["persistent_local", "persistent_local_transient", "topk"])
def test_cuda_clip_table_equals_the_cpu_one(name):
    """On CUDA `PersistentLocal.select` runs the fused Triton kernels over the clip's view."""
    pattern = PATTERNS[name]
    q, k, _, scorer = _inputs(seed=7)
    cpu = clip_table(pattern, GEOMETRY, CLIP, q, k, scorer)
    cuda = clip_table(pattern, GEOMETRY, CLIP, q.cuda(), k.cuda(), scorer.cuda())
    pages = 2 * CLIP * GEOMETRY.pages_per_frame
    assert torch.equal(cuda.visible_pages(pages).cpu(), cpu.visible_pages(pages))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["persistent_local", "topk"])
def test_clip_table_never_waits_for_the_device(name):
    """No host-device synchronisation while a layer's clip table is built on CUDA (a
    training step builds one per layer; each wait would serialise its launches)."""
    q, k, _, scorer = (t.cuda() for t in _inputs(3))
    clip_table(PATTERNS[name], GEOMETRY, CLIP, q, k, scorer)  # warm-up: kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        table = clip_table(PATTERNS[name], GEOMETRY, CLIP, q, k, scorer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert table.kv_num_blocks.is_cuda
