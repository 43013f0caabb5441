import math
import random

import pytest
import torch

from patterns import Dense, PersistentLocal, SinkWindow, TopK, VideoGeometry
from patterns.footprint import evaluate
from runtime import AttentionRuntime

# 6-token frames in 4-token pages (4 + 2), 2 frames per chunk, query blocks straddle frames
GEOMETRY = VideoGeometry(6, frames_per_chunk=2, page_size=4, q_block=8)
H, HKV, D = 4, 2, 8


def make_runtime(pattern, layers=2, geometry=GEOMETRY, num_frames=12, batch=1):
    rt = AttentionRuntime(pattern, geometry, layers, H, HKV, D, backend="torch", debug=True)
    rt.reset(batch, "cpu", torch.float32, num_frames)
    return rt


def chunk_qkv(gen, geometry=GEOMETRY, batch=1):
    rows = geometry.chunk_tokens
    return (
        torch.randn(batch, rows, H, D, generator=gen),
        torch.randn(batch, rows, HKV, D, generator=gen),
        torch.randn(batch, rows, HKV, D, generator=gen),
    )


def dense_oracle(q, ks, vs):
    """float64 softmax attention of q [B, Lq, H, D] over the concatenated keys/values."""
    k = torch.cat(ks, dim=1).double().repeat_interleave(H // HKV, dim=2)
    v = torch.cat(vs, dim=1).double().repeat_interleave(H // HKV, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) / math.sqrt(D)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@pytest.mark.parametrize(
    "pattern",
    [
        Dense(),
        Dense(window_frames=6, sink_frames=2),
        SinkWindow(0, 4),
        PersistentLocal(0, 4),
        PersistentLocal(10**3, 4),
    ],
    ids=["global", "sink-window", "window", "pl-no-memory", "pl-all-memory"],
)
def test_outputs_equal_dense_attention_over_the_retained_frames(pattern):
    gen = torch.Generator().manual_seed(0)
    rt = make_runtime(pattern, layers=1)
    f, t = GEOMETRY.frames_per_chunk, GEOMETRY.tokens_per_frame
    committed = {}  # frame -> (k, v) of the clean pass
    keep_all = isinstance(pattern, PersistentLocal) and pattern.persistent_blocks > 0
    for chunk in range(6):
        start = chunk * f
        visible = range(start) if keep_all else pattern.cache_policy.retained_frames(start, f)
        for commit in (False, False, True):
            q, k, v = chunk_qkv(gen)
            with rt.chunk_pass(start, commit):
                out = rt.states[0](q, k, v)
            hist = [committed[fr] for fr in visible]
            expected = dense_oracle(q, [h[0] for h in hist] + [k], [h[1] for h in hist] + [v])
            torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        for j in range(f):
            committed[start + j] = (k[:, j * t : (j + 1) * t], v[:, j * t : (j + 1) * t])
        assert rt.states[0].frames == tuple(pattern.cache_policy.retained_frames(start + f, f))


def _pool_snapshot(rt):
    pool = rt.pool
    # as bytes: the pool is allocated empty, and NaN patterns in unwritten pages would never
    # compare equal to themselves
    tensors = [
        t.clone().view(torch.uint8)
        for t in (pool.k, pool.v, pool.page_lens, pool.key_reps, pool.used)
    ]
    states = [
        (s.frames, s.num_persistent, s.committed_frames, s.page_ids().clone()) for s in rt.states
    ]
    return tensors, pool.num_used, pool.peak_used, states


def _assert_same(a, b):
    ta, ua, pa, sa = a
    tb, ub, pb, sb = b
    assert all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))
    assert (ua, pa) == (ub, pb)
    for (fa, na, ca, ia), (fb, nb, cb, ib) in zip(sa, sb, strict=True):
        assert (fa, na, ca) == (fb, nb, cb) and torch.equal(ia, ib)


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda q, k, v: (q[:, :-1], k, v), "q"),
        (lambda q, k, v: (q, k.double(), v), "k"),
        (lambda q, k, v: (q, k, v[..., :4]), "v"),
        (lambda q, k, v: (q, k.repeat(1, 1, 2, 1), v), "k"),
        (lambda q, k, v: (q.to("meta"), k, v), "q"),
        (lambda q, k, v: (q.tolist(), k, v), "q"),
    ],
    ids=["rows", "dtype", "head_dim", "kv-heads", "device", "type"],
)
@pytest.mark.parametrize("commit", [False, True])
def test_rejected_call_names_the_argument_and_changes_nothing(mutate, name, commit):
    gen = torch.Generator().manual_seed(1)
    rt = make_runtime(PersistentLocal(4, 4, local_topk=2))
    for chunk in range(3):  # some history, some persistent pages
        with rt.chunk_pass(chunk * 2, True):
            for state in rt.states:
                state(*chunk_qkv(gen))
    before = _pool_snapshot(rt)
    with pytest.raises(ValueError, match=name), rt.chunk_pass(6, commit):
        rt.states[0](*mutate(*chunk_qkv(gen)))
    _assert_same(before, _pool_snapshot(rt))


def test_calls_outside_a_pass_or_twice_in_a_commit_are_rejected():
    gen = torch.Generator().manual_seed(2)
    rt = make_runtime(Dense(window_frames=4))
    before = _pool_snapshot(rt)
    with pytest.raises(ValueError, match="phase"):
        rt.states[0](*chunk_qkv(gen))
    _assert_same(before, _pool_snapshot(rt))
    with pytest.raises(ValueError, match="phase"), rt.chunk_pass(0, True):
        rt.states[0](*chunk_qkv(gen))
        rt.states[1](*chunk_qkv(gen))
        rt.states[0](*chunk_qkv(gen))


def _check_pool_invariant(rt):
    """Used pages == scratch ∪ every page some state references, disjointly."""
    pool = rt.pool
    b, hkv = pool.batch_size, pool.num_kv_heads
    refs = [s.page_ids() for s in rt.states]
    total = pool.scratch_pages + sum(r.shape[-1] for r in refs)
    assert pool.num_used == total
    for bi in range(b):
        for h in range(hkv):
            owned = [pid for r in refs for pid in r[bi, h].tolist()]
            assert len(owned) == len(set(owned))  # no page shared or listed twice
            expected = set(owned) | set(range(pool.scratch_pages))
            assert set(pool.used[bi, h].nonzero().flatten().tolist()) == expected


def test_a_thousand_random_commits_never_leak_or_double_free():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(3)
    geometry = VideoGeometry(6, frames_per_chunk=1, page_size=4, q_block=4)
    patterns = [
        PersistentLocal(5, 3, local_topk=2),
        PersistentLocal(3, 1),  # the chunk itself leaves the window at its commit
        SinkWindow(1, 3),
        TopK(density=0.5, window_frames=4, nearest_frames=1),
    ]
    steps = 0
    for pattern in patterns:
        chunks = 250
        rt = make_runtime(pattern, layers=2, geometry=geometry, num_frames=chunks, batch=2)
        fp = pattern.footprint()
        peak, held = fp.peak_pages(), fp.held_pages()
        for chunk in range(chunks):
            if rng.random() < 0.2:
                with rt.chunk_pass(chunk, False):
                    for state in rt.states:
                        state(*chunk_qkv(gen, geometry, batch=2))
            with rt.chunk_pass(chunk, True):
                for state in rt.states:
                    state(*chunk_qkv(gen, geometry, batch=2))
            steps += 1
            _check_pool_invariant(rt)
            assert rt.pool.peak_used == evaluate(peak, geometry, num_layers=2, chunks=chunk + 1)
            assert rt.pool.num_used == evaluate(held, geometry, num_layers=2, chunks=chunk + 1)
        assert rt.pool.peak_used == evaluate(fp.peak_bound_pages(), geometry, num_layers=2)
    assert steps == 1000


def test_persistent_pages_are_the_most_important_evicted_pages():
    gen = torch.Generator().manual_seed(4)
    rt = make_runtime(PersistentLocal(3, 2), layers=1)  # window = the chunk: all history evicted
    state = rt.states[0]
    for chunk in range(3):
        q, k, v = chunk_qkv(gen)
        with rt.chunk_pass(chunk * 2, True):
            state(q, k, v)
        assert state.frames == ()
    assert state.num_persistent == 3
    ids = state.page_ids()
    assert (rt.pool.page_lens.gather(-1, ids) > 0).all()
