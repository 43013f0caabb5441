import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patterns import (
    BlockScorer,
    CachePolicy,
    Dense,
    PersistentLocal,
    SinkWindow,
    TopK,
    VideoGeometry,
)
from runtime import AttentionRuntime
from runtime.eager import FrameCache, GlobalCache, RollingCache

# 6-token frames in 4-token pages (4 + 2)
TOKENS, PAGE, H, HKV, D = 6, 4, 2, 1, 8


@given(
    window=st.integers(3, 12),
    sinks=st.integers(0, 3),
    frames=st.integers(1, 3),
    committed_chunks=st.integers(1, 10),
)
def test_retained_frames_keep_sinks_and_the_most_recent(window, sinks, frames, committed_chunks):
    policy = SinkWindow(sinks, window).cache_policy
    if window < sinks + frames:
        with pytest.raises(ValueError, match="window_frames"):
            SinkWindow(sinks, window).check_geometry(VideoGeometry(8, frames_per_chunk=frames))
        return
    n = committed_chunks * frames
    kept = policy.retained_frames(n, frames)
    assert kept == sorted(set(kept)) and all(0 <= f < n for f in kept)
    assert len(kept) == min(n, window - frames)  # the next chunk sees at most `window`
    assert set(range(min(sinks, n))) <= set(kept)
    recent = [f for f in kept if f >= sinks]
    assert recent == list(range(n - len(recent), n))
    assert [f for run in policy.retained_runs(n, frames) for f in run] == kept
    assert all(run for run in policy.retained_runs(n, frames))
    assert Dense().cache_policy.retained_frames(n, frames) == list(range(n))


def test_patterns_share_one_policy_of_their_parameters():
    assert Dense(6, 2).cache_policy == CachePolicy(6, 2, 0) == SinkWindow(2, 6).cache_policy
    assert TopK(window_frames=9, sink_frames=1).cache_policy == CachePolicy(9, 1, 0)
    assert PersistentLocal(7, 8).cache_policy == CachePolicy(8, 0, 7)
    assert PersistentLocal(7, 8).footprint() == CachePolicy(8, 0, 7).footprint()


def test_bad_policies_are_rejected_by_name():
    with pytest.raises(ValueError, match="window_frames"):
        CachePolicy(0)
    with pytest.raises(ValueError, match="sink_frames"):
        CachePolicy(4, -1)
    with pytest.raises(ValueError, match="persistent_capacity"):
        CachePolicy(4, 0, 1.5)
    with pytest.raises(ValueError, match="window_frames=4 must be at least sink_frames=2"):
        CachePolicy(4, 2).check_fits(3)
    with pytest.raises(ValueError, match="persistent_capacity=3"):
        FrameCache(CachePolicy(6, 0, 3))
    with pytest.raises(TypeError, match="policy"):
        FrameCache(Dense(6))


def test_update_without_memory_frees_everything():
    persistent = torch.zeros(1, 2, 0, dtype=torch.int64)
    evicted = torch.arange(6).view(1, 2, 3)
    for pattern in (Dense(4), SinkWindow(1, 5), TopK(window_frames=6), PersistentLocal(0, 4)):
        policy = pattern.cache_policy
        new, kept, freed = policy.update_persistent(persistent, 0, evicted, None, None, None)
        assert kept == 0 == policy.persistent_after(0, 3) and torch.equal(freed, evicted)


@given(
    seed=st.integers(0, 100),
    capacity=st.integers(1, 6),
    num_persistent=st.integers(0, 6),
    evicted=st.integers(0, 6),
)
def test_update_keeps_the_most_important_pages_and_the_planned_count(
    seed, capacity, num_persistent, evicted
):
    num_persistent = min(num_persistent, capacity)
    policy = PersistentLocal(capacity, 4).cache_policy
    g = torch.Generator().manual_seed(seed)
    b, hkv, num_pages = 2, 2, 20
    ids = torch.stack([torch.randperm(num_pages, generator=g) for _ in range(b * hkv)])
    ids = ids.view(b, hkv, num_pages)
    persistent = torch.full((b, hkv, capacity), -1, dtype=torch.int64)
    persistent[..., :num_persistent] = ids[..., :num_persistent]
    out_ids = ids[..., num_persistent : num_persistent + evicted]
    key_reps = torch.randn(b, hkv, num_pages, D, generator=g)
    q_reps = torch.randn(b, 4, 3, D, generator=g)
    new, kept, freed = policy.update_persistent(
        persistent, num_persistent, out_ids, key_reps, q_reps, None
    )
    total = num_persistent + evicted
    assert kept == policy.persistent_after(num_persistent, evicted) == min(capacity, total)
    assert new.shape == (b, hkv, capacity) and freed.shape == (b, hkv, total - kept)
    assert (new[..., kept:] == -1).all()
    scorer = BlockScorer(4, 2, D)
    for bi in range(b):
        for kv in range(hkv):
            candidates = persistent[bi, kv, :num_persistent].tolist() + out_ids[bi, kv].tolist()
            kept_ids = new[bi, kv, :kept].tolist()
            assert kept_ids == sorted(kept_ids)
            assert sorted(kept_ids + freed[bi, kv].tolist()) == sorted(candidates)
            if kept < total:
                imp = scorer.importance(
                    q_reps[bi : bi + 1],
                    key_reps[bi : bi + 1, :, candidates],
                    torch.ones(1, hkv, total, dtype=torch.bool),
                )[0, kv]
                best = {candidates[i] for i in imp.topk(kept).indices.tolist()}
                assert set(kept_ids) == best
    with pytest.raises(ValueError, match="query_reps"):
        policy.update_persistent(persistent, num_persistent, out_ids, key_reps, None, None)


# -- the eager dense cache and the paged runtime keep the same frames ---------------------------


patterns_strategy = st.one_of(
    st.builds(Dense, st.none() | st.integers(3, 9), st.just(0)),
    st.builds(Dense, st.integers(5, 9), st.integers(0, 2)),
    st.builds(SinkWindow, st.integers(0, 2), st.integers(5, 9)),
    st.builds(TopK, window_frames=st.none() | st.integers(5, 9), sink_frames=st.integers(0, 2)),
    st.builds(PersistentLocal, st.integers(0, 6), st.integers(3, 9)),
)


def _eager_cache(policy: CachePolicy) -> FrameCache:
    """The eager baseline's cache for a pattern's window and sinks (it has no memory)."""
    if policy.window_frames is None:
        return GlobalCache()
    return RollingCache(policy.window_frames, policy.sink_frames)


@settings(max_examples=25, deadline=None)
@given(pattern=patterns_strategy, frames=st.integers(1, 3), chunks=st.integers(1, 5))
def test_eager_cache_and_paged_runtime_keep_exactly_the_same_frames(pattern, frames, chunks):
    geometry = VideoGeometry(TOKENS, frames_per_chunk=frames, page_size=PAGE, q_block=8)
    policy = pattern.cache_policy
    if policy.window_frames is not None and policy.window_frames < policy.sink_frames + frames:
        return  # both caches reject it (test_bad_policies_are_rejected_by_name)
    num_frames = chunks * frames
    runtime = AttentionRuntime(pattern, geometry, 1, H, HKV, D, backend="torch")
    runtime.reset(1, "cpu", torch.float32, num_frames)
    eager = _eager_cache(policy)
    eager.reset(1, TOKENS, frames, num_frames)
    gen = torch.Generator().manual_seed(frames * 100 + chunks)
    keys = {}  # frame -> its clean K [1, T, Hkv, D]
    for start in range(0, num_frames, frames):
        q = torch.randn(1, frames * TOKENS, H, D, generator=gen)
        k, v = torch.randn(2, 1, frames * TOKENS, HKV, D, generator=gen)
        keys.update({start + j: k[:, j * TOKENS : (j + 1) * TOKENS] for j in range(frames)})
        with runtime.chunk_pass(start, commit=True):
            runtime.states[0](q, k, v)
        (slot,) = eager.begin_chunk(start, commit=True)
        slot.keys_values(k, v)
        eager.end_chunk(ok=True)

        expected = tuple(policy.retained_frames(start + frames, frames))
        assert eager.frames == runtime.states[0].frames == expected
        # and both hold those frames' keys, not just their indices
        held = torch.cat([keys[f] for f in expected], dim=1) if expected else k[:, :0]
        torch.testing.assert_close(slot.k[:, : slot.tokens], held, rtol=0, atol=0)
        pool = runtime.pool
        pages = runtime.states[0].page_ids()[0, 0, : len(expected) * geometry.pages_per_frame]
        paged = pool.k[0, 0, pages].reshape(len(expected), -1, D)[:, :TOKENS]
        torch.testing.assert_close(paged.reshape(1, -1, HKV, D), held, rtol=0, atol=0)
