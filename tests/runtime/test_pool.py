import random

import pytest
import torch

from patterns import VideoGeometry
from runtime.pool import PagePool

GEOMETRY = VideoGeometry(12, frames_per_chunk=2, page_size=8, q_block=8)  # 2 pages/frame: 8 + 4


def make_pool(num_pages=20, scratch=4, batch=2, kv_heads=3, dim=4, check=True):
    return PagePool(
        GEOMETRY,
        batch,
        kv_heads,
        dim,
        num_pages,
        scratch,
        device="cpu",
        dtype=torch.float32,
        check=check,
    )


def snapshot(pool):
    return (
        # as bytes: the pool is allocated empty, and NaN patterns in unwritten pages would
        # never compare equal to themselves
        [
            t.clone().view(torch.uint8)
            for t in (pool.k, pool.v, pool.page_lens, pool.key_reps, pool.used)
        ],
        pool.num_used,
        pool.peak_used,
    )


def assert_unchanged(pool, snap):
    tensors, used, peak = snap
    for a, b in zip(
        tensors, (pool.k, pool.v, pool.page_lens, pool.key_reps, pool.used), strict=True
    ):
        assert torch.equal(a, b.view(torch.uint8))
    assert (pool.num_used, pool.peak_used) == (used, peak)


def test_shapes_scratch_and_bytes():
    pool = make_pool()
    assert pool.k.shape == (2, 3, 20, 8, 4) and pool.key_reps.shape == (2, 3, 20, 4)
    assert pool.page_lens.dtype == torch.int32
    assert pool.used[..., :4].all() and not pool.used[..., 4:].any()
    assert pool.scratch_ids.shape == (2, 3, 4)
    assert pool.page_bytes == 2 * 2 * 3 * 8 * 4 * 4
    assert pool.current_bytes == 4 * pool.page_bytes == pool.peak_bytes


def test_allocate_gives_lowest_free_pages_per_row_and_tracks_peak():
    pool = make_pool()
    a = pool.allocate(3)
    assert a.shape == (2, 3, 3) and a.dtype == torch.int64
    assert (a == torch.tensor([4, 5, 6])).all()
    pool.free(a[..., 1:2])
    b = pool.allocate(2)
    assert (b == torch.tensor([5, 7])).all()
    assert pool.num_used == 4 + 4 and pool.peak_used == 4 + 4
    pool.free(b)
    assert pool.num_used == 6 and pool.peak_used == 8


def test_rows_can_hold_different_pages():
    pool = make_pool()
    pool.allocate(4)  # 4..7 everywhere
    ids = torch.tensor([4, 7]).view(1, 1, 2).repeat(2, 3, 1)
    ids[1, 2] = torch.tensor([5, 6])
    pool.free(ids)
    again = pool.allocate(2)
    assert again[0, 0].tolist() == [4, 7] and again[1, 2].tolist() == [5, 6]


def test_full_pool_raises_and_allocates_nothing():
    pool = make_pool(num_pages=8)
    pool.allocate(3)
    snap = snapshot(pool)
    with pytest.raises(RuntimeError, match="pool full"):
        pool.allocate(2)
    assert_unchanged(pool, snap)


@pytest.mark.parametrize(
    "bad",
    [
        lambda pool, ids: ids,  # double free
        lambda pool, ids: torch.zeros_like(ids),  # scratch
        lambda pool, ids: torch.full_like(ids, 99),  # out of range
        lambda pool, ids: ids[..., :1].expand(-1, -1, 2).contiguous(),  # listed twice
    ],
    ids=["double-free", "scratch", "range", "duplicate"],
)
def test_bad_free_raises_and_frees_nothing(bad):
    pool = make_pool()
    ids = pool.allocate(2)
    if bad(pool, ids) is ids:  # the double free: free once first
        pool.free(ids)
    snap = snapshot(pool)
    with pytest.raises(ValueError, match="ids"):
        pool.free(bad(pool, ids))
    assert_unchanged(pool, snap)


def test_ids_are_checked_for_shape_and_dtype():
    pool = make_pool()
    with pytest.raises(ValueError, match="int64"):
        pool.free(torch.zeros(2, 3, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="Hkv=3"):
        pool.free(torch.zeros(2, 2, 1, dtype=torch.int64))


def test_write_pages_frames_and_computes_key_reps():
    pool = make_pool()
    ids = pool.allocate(4)  # two frames
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 24, 3, 4, generator=g)
    v = torch.randn(2, 24, 3, 4, generator=g)
    pool.write(ids, k, v)
    lens = pool.page_lens.gather(-1, ids)
    assert (lens == torch.tensor([8, 4, 8, 4], dtype=torch.int32)).all()
    for b in range(2):
        for h in range(3):
            for frame in range(2):
                first, second = ids[b, h, 2 * frame].item(), ids[b, h, 2 * frame + 1].item()
                tokens = torch.cat([pool.k[b, h, first], pool.k[b, h, second, :4]])
                torch.testing.assert_close(tokens, k[b, 12 * frame : 12 * frame + 12, h])
                values = torch.cat([pool.v[b, h, first], pool.v[b, h, second, :4]])
                torch.testing.assert_close(values, v[b, 12 * frame : 12 * frame + 12, h])
                mean = k[b, 12 * frame + 8 : 12 * frame + 12, h].double().mean(0)
                torch.testing.assert_close(pool.key_reps[b, h, second].double(), mean)


def test_write_scratch_equals_write_to_the_scratch_ids():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 24, 3, 4, generator=g)
    v = torch.randn(2, 24, 3, 4, generator=g)
    fast, slow = make_pool(), make_pool()
    assert (fast.page_lens[..., :4] == torch.tensor([8, 4, 8, 4], dtype=torch.int32)).all()
    fast.write_scratch(k, v)
    slow.write(slow.scratch_ids, k, v)
    for a, b in zip(
        (fast.k, fast.v, fast.page_lens, fast.key_reps),
        (slow.k, slow.v, slow.page_lens, slow.key_reps),
        strict=True,
    ):
        assert torch.equal(a, b)
    snap = snapshot(fast)
    with pytest.raises(ValueError, match="k must be"):
        fast.write_scratch(k[:, :12], v[:, :12])
    assert_unchanged(fast, snap)


def test_write_scratch_without_reps_writes_the_same_pages_and_leaves_the_reps():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 24, 3, 4, generator=g)
    v = torch.randn(2, 24, 3, 4, generator=g)
    full, lean = make_pool(), make_pool()
    full.write_scratch(k, v)
    before = lean.key_reps.clone()
    lean.write_scratch(k, v, reps=False)
    for a, b in zip(
        (full.k, full.v, full.page_lens), (lean.k, lean.v, lean.page_lens), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(lean.key_reps, before)
    assert not torch.equal(full.key_reps, before)


def test_scratch_must_hold_whole_frames():
    with pytest.raises(ValueError, match="whole frames"):
        make_pool(scratch=3)


def test_write_rejects_bad_inputs_and_changes_nothing():
    pool = make_pool()
    ids = pool.allocate(2)
    snap = snapshot(pool)
    good = torch.randn(2, 12, 3, 4)
    with pytest.raises(ValueError, match="k must be"):
        pool.write(ids, good.double(), good)
    with pytest.raises(ValueError, match="v must be"):
        pool.write(ids, good, good[:, :6])
    with pytest.raises(ValueError, match="whole frames"):
        pool.write(ids[..., :1], good, good)
    assert_unchanged(pool, snap)


def test_copy_moves_every_page_field():
    pool = make_pool()
    src, dst = pool.allocate(2), pool.allocate(2)
    pool.write(src, torch.randn(2, 12, 3, 4), torch.randn(2, 12, 3, 4))
    pool.copy(src, dst)
    assert (pool.page_lens.gather(-1, dst) == torch.tensor([8, 4], dtype=torch.int32)).all()
    for b in range(2):
        for h in range(3):
            for t in (pool.k, pool.v, pool.page_lens, pool.key_reps):
                assert torch.equal(t[b, h, src[b, h]], t[b, h, dst[b, h]])


def test_random_allocate_free_sequence_keeps_the_free_list_exact():
    rng = random.Random(0)
    pool = make_pool(num_pages=40, scratch=4, batch=1, kv_heads=2)
    held = [set(), set()]  # per kv head, the pages we own
    for _ in range(1000):
        if rng.random() < 0.5 and pool.num_used < 40:
            n = rng.randint(0, 40 - pool.num_used)
            ids = pool.allocate(n)
            for h in range(2):
                new = set(ids[0, h].tolist())
                assert not new & held[h] and len(new) == n and min(new, default=4) >= 4
                held[h] |= new
        elif held[0]:
            n = rng.randint(1, len(held[0]))
            picks = [rng.sample(sorted(held[h]), n) for h in range(2)]
            pool.free(torch.tensor(picks).view(1, 2, n))
            for h in range(2):
                held[h] -= set(picks[h])
        for h in range(2):
            assert set(pool.used[0, h].nonzero().flatten().tolist()) == held[h] | set(range(4))
        assert pool.num_used == 4 + len(held[0])
