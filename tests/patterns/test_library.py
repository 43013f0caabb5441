import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from patterns import (
    BlockScorer,
    CacheView,
    Dense,
    PersistentLocal,
    SinkWindow,
    TopK,
    VideoGeometry,
    full_sequence_table,
    pool_key_blocks,
    pool_query_blocks,
)

# -- a synthetic cache ------------------------------------------------------------------------


def make_view(
    geometry,
    history,
    chunk_start,
    *,
    batch=1,
    kv_heads=2,
    group=2,
    dim=8,
    slots=0,
    num_persistent=0,
    seed=0,
    scorer=None,
):
    """A CacheView over a random pool: ``history`` lists absolute frames per slot (−1 absent);
    every (batch, kv head) row gets its own random, distinct page ids."""
    g = torch.Generator().manual_seed(seed)
    ppf, f = geometry.pages_per_frame, geometry.frames_per_chunk
    fh = len(history)
    needed = slots + fh * ppf + f * ppf
    num_pages = needed + 5
    rows = [torch.randperm(num_pages, generator=g)[:needed] for _ in range(batch * kv_heads)]
    ids = torch.stack(rows).view(batch, kv_heads, needed)
    persistent = ids[..., :slots].clone()
    persistent[..., num_persistent:] = -1
    frame_pages = ids[..., slots : slots + fh * ppf].reshape(batch, kv_heads, fh, ppf)
    chunk_pages = ids[..., slots + fh * ppf :].reshape(batch, kv_heads, f, ppf)
    lens = torch.randint(1, geometry.page_size + 1, (batch, kv_heads, num_pages), generator=g)
    lens = lens.to(torch.int32)
    heads = kv_heads * group
    mq = geometry.q_blocks_per_chunk
    return CacheView(
        geometry=geometry,
        num_heads=heads,
        chunk_start=chunk_start,
        history_frames=tuple(history),
        frame_index=torch.tensor(history, dtype=torch.int64),
        frame_pages=frame_pages,
        chunk_pages=chunk_pages,
        persistent_pages=persistent,
        page_lens=lens,
        key_reps=torch.randn(batch, kv_heads, num_pages, dim, generator=g),
        query_reps=torch.randn(batch, heads, mq, dim, generator=g),
        scorer=scorer,
    )


def row_sets(table):
    counts, idx = table.kv_num_blocks, table.kv_indices
    b, h, m = counts.shape
    return {
        (bi, hi, mi): set(idx[bi, hi, mi, : counts[bi, hi, mi]].tolist())
        for bi in range(b)
        for hi in range(h)
        for mi in range(m)
    }


def held_pages(view, b, kv):
    """Page id → absolute frame (−1 persistent) of everything the view holds for a row."""
    out = {}
    p = view.persistent_pages[b, kv]
    for pid in p[p >= 0].tolist():
        out[pid] = -1
    for slot, frame in enumerate(view.history_frames):
        if frame >= 0:
            for pid in view.frame_pages[b, kv, slot].tolist():
                out[pid] = frame
    for j in range(view.geometry.frames_per_chunk):
        for pid in view.chunk_pages[b, kv, j].tolist():
            out[pid] = view.chunk_start + j
    return out


def own_frames(view, m):
    first, last = view.geometry.q_block_frames()[m].tolist()
    return set(range(view.chunk_start + first, view.chunk_start + last + 1))


def logits64(view, k_reps_rows):
    """float64 pooled q·k / sqrt(D) of an untrained scorer, [B, H, Mq, N]."""
    q = view.query_reps.double()
    k = k_reps_rows.double().repeat_interleave(view.num_heads // view.num_kv_heads, 1)
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


GEOMETRIES = [
    VideoGeometry(16, frames_per_chunk=2, page_size=8, q_block=8),
    VideoGeometry(12, frames_per_chunk=3, page_size=8, q_block=16),  # partial pages, straddling
    VideoGeometry(5, frames_per_chunk=1, page_size=4, q_block=4),
]

# -- tables of every pattern -------------------------------------------------------------------


@given(
    geometry=st.sampled_from(GEOMETRIES),
    frames=st.lists(st.integers(0, 1), min_size=0, max_size=6),
    pattern=st.sampled_from(
        [
            Dense(),
            SinkWindow(1, 8),
            TopK(density=0.3, nearest_frames=1),
            PersistentLocal(4, 8, local_topk=2),
            PersistentLocal(4, 8, local_density=0.4, force_own_frame=False),
            PersistentLocal(4, 8),
        ]
    ),
    batch=st.integers(1, 2),
    seed=st.integers(0, 100),
)
def test_every_table_is_valid_and_lists_only_held_pages(geometry, frames, pattern, batch, seed):
    # history slots: frames 0.. in order, with some slots absent (-1)
    history = [i if present else -1 for i, present in enumerate(frames)]
    start = len(frames)
    slots = pattern.cache_policy.persistent_capacity
    view = make_view(
        geometry,
        history,
        start,
        batch=batch,
        slots=slots,
        num_persistent=min(slots, 3),
        seed=seed,
    )
    table = pattern.select(view)
    table.validate(view.page_lens.shape[-1])
    assert table.kv_indices.shape[:3] == (batch, 4, geometry.q_blocks_per_chunk)
    for (b, h, m), pages in row_sets(table).items():
        held = held_pages(view, b, h // 2)
        assert pages <= set(held)
        persistent = {p for p, fr in held.items() if fr == -1}
        assert persistent <= pages  # every persistent page, for every query block
        own = {p for p, fr in held.items() if fr in own_frames(view, m)}
        if getattr(pattern, "force_own_frame", True):
            assert own <= pages


@given(
    geometry=st.sampled_from(GEOMETRIES),
    n_hist=st.integers(0, 5),
    seed=st.integers(0, 100),
)
def test_dense_lists_everything_held(geometry, n_hist, seed):
    view = make_view(geometry, list(range(n_hist)), n_hist, seed=seed)
    table = Dense().select(view)
    for (b, h, _), pages in row_sets(table).items():
        assert pages == set(held_pages(view, b, h // 2))


@given(
    geometry=st.sampled_from(GEOMETRIES),
    n_hist=st.integers(0, 5),
    num_persistent=st.integers(0, 5),
    seed=st.integers(0, 100),
)
def test_persistent_local_with_all_window_pages_is_dense_plus_persistent(
    geometry, n_hist, num_persistent, seed
):
    view = make_view(
        geometry, list(range(n_hist)), n_hist, slots=5, num_persistent=num_persistent, seed=seed
    )
    window_pages = (n_hist + geometry.frames_per_chunk) * geometry.pages_per_frame
    for pattern in (PersistentLocal(5, 8), PersistentLocal(5, 8, local_topk=window_pages)):
        got = row_sets(pattern.select(view))
        assert got == row_sets(Dense().select(view))  # Dense lists persistent pages as held
        for (b, h, _), pages in got.items():
            assert pages == set(held_pages(view, b, h // 2))


@given(
    geometry=st.sampled_from(GEOMETRIES),
    n_hist=st.integers(1, 4),
    k=st.integers(1, 6),
    force=st.booleans(),
    seed=st.integers(0, 100),
)
def test_persistent_local_takes_the_row_wise_top_k_of_the_window(geometry, n_hist, k, force, seed):
    history = list(range(n_hist))
    view = make_view(geometry, history, n_hist, slots=3, num_persistent=2, seed=seed)
    pattern = PersistentLocal(3, 8, local_topk=k, force_own_frame=force)
    got = row_sets(pattern.select(view))
    for (b, h, m), pages in got.items():
        held = held_pages(view, b, h // 2)
        window = [p for p, fr in held.items() if fr >= 0]
        reps = view.key_reps[b : b + 1, :, window]
        scores = logits64(view, reps)[0, h, m]
        top = {window[i] for i in scores.topk(min(k, len(window))).indices.tolist()}
        own = {p for p, fr in held.items() if fr in own_frames(view, m)} if force else set()
        persistent = {p for p, fr in held.items() if fr == -1}
        assert pages == top | own | persistent


def test_persistent_local_uses_the_layer_scorer():
    g = GEOMETRIES[0]
    view = make_view(g, [0, 1, 2], 3, seed=1)
    pattern = PersistentLocal(0, 8, local_topk=2, force_own_frame=False)
    plain = row_sets(pattern.select(view))
    scorer = BlockScorer(4, 2, 8)
    with torch.no_grad():
        scorer.wk.mul_(-1)  # reverses every score
    flipped = row_sets(pattern.select(dataclasses.replace(view, scorer=scorer)))
    assert all(plain[key].isdisjoint(flipped[key]) for key in plain)


@given(seed=st.integers(0, 100), n_hist=st.integers(2, 6), beta=st.sampled_from([0.0, 0.3]))
def test_topk_matches_a_brute_force_two_stage_selection(seed, n_hist, beta):
    g = GEOMETRIES[0]
    ppf = g.pages_per_frame
    pattern = TopK(density=0.4, frame_density=0.5, sink_frames=1, nearest_frames=1, beta=beta)
    view = make_view(g, list(range(n_hist)), n_hist, seed=seed)
    got = row_sets(pattern.select(view))
    scored = [f for f in range(n_hist) if f >= 1 and f < n_hist - 1]
    density = pattern.density_at(n_hist, g.frames_per_chunk)
    for (b, h, m), pages in got.items():
        kv = h // 2
        held = held_pages(view, b, kv)
        forced = {p for p, fr in held.items() if fr not in scored}
        if not scored:
            assert pages == set(held)
            continue
        frame_reps = []
        for f in scored:
            ids = view.frame_pages[b, kv, f]
            lens = view.page_lens[b, kv, ids].double()
            frame_reps.append(
                (view.key_reps[b, kv, ids].double() * lens[:, None]).sum(0) / lens.sum()
            )
        q = view.query_reps[b, h, m].double()
        frame_scores = torch.stack(frame_reps) @ q
        n_frames = math.ceil(0.5 * len(scored))
        chosen_frames = [scored[i] for i in frame_scores.topk(n_frames).indices.tolist()]
        candidates = [p for f in chosen_frames for p in view.frame_pages[b, kv, f].tolist()]
        page_scores = view.key_reps[b, kv, candidates].double() @ q
        n_pages = min(math.ceil(density * len(scored) * ppf), n_frames * ppf)
        chosen = {candidates[i] for i in page_scores.topk(n_pages).indices.tolist()}
        assert pages == forced | chosen


def test_topk_schedule_is_denser_early_and_first_chunk_dense():
    p = TopK(density=0.25, beta=0.5)
    assert p.density_at(0, 3) == 1.0
    early, late = p.density_at(3, 3), p.density_at(48, 3)
    assert early > late > 0.25
    assert math.isclose(late, 1 - (0.75 - 0.5 * math.sqrt(3 / 48)))
    assert TopK(density=0.25).density_at(30, 3) == 0.25


# -- no loops over heads or blocks -------------------------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "pattern",
    [Dense(), TopK(nearest_frames=1), PersistentLocal(6, 12, local_topk=3)],
    ids=["dense", "topk", "persistent_local"],
)
def test_table_building_op_count_does_not_depend_on_heads_or_blocks(pattern):
    counts = []
    for geometry, kv_heads, group in (
        (VideoGeometry(16, frames_per_chunk=2, page_size=8, q_block=8), 2, 2),
        (VideoGeometry(64, frames_per_chunk=2, page_size=8, q_block=8), 4, 3),
    ):
        view = make_view(
            geometry, [0, 1, 2, 3, 4], 5, kv_heads=kv_heads, group=group, slots=6, num_persistent=4
        )
        pattern.select(view)  # warm caches
        with _CountOps() as ops:
            pattern.select(view)
        counts.append(ops.count)
    assert counts[0] == counts[1]


def test_the_views_of_a_chunk_share_its_layout_built_once():
    geometry = VideoGeometry(16, frames_per_chunk=2, page_size=8, q_block=8)
    pattern = PersistentLocal(6, 12, local_topk=3)
    view = make_view(geometry, [0, 1, 2, 3, 4], 5, slots=6, num_persistent=4)
    first = pattern.select(view)
    again = dataclasses.replace(view, query_reps=view.query_reps.flip(2))
    assert again.layout is view.layout
    assert view.layout.columns is not None and view.layout.window is not None
    with _CountOps() as shared:
        table = pattern.select(again)
    view.layout.clear()
    with _CountOps() as fresh:
        rebuilt = pattern.select(again)
    assert shared.count < fresh.count
    assert row_sets(table) == row_sets(rebuilt) != row_sets(first)


# -- full sequence -----------------------------------------------------------------------------


def _full_inputs(geometry, frames, seed=0, heads=4, kv_heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    length = frames * geometry.tokens_per_frame
    q = torch.randn(1, length, heads, dim, generator=g)
    k = torch.randn(1, length, kv_heads, dim, generator=g)
    return q, k


def test_full_sequence_dense_keeps_every_block():
    g = VideoGeometry(12, page_size=8, q_block=16)
    q, k = _full_inputs(g, 5)
    table = full_sequence_table(Dense(), q, k, g)
    table.validate(math.ceil(60 / 8))
    assert table.kv_num_blocks.shape == (1, 4, math.ceil(60 / 16))
    assert (table.kv_num_blocks == math.ceil(60 / 8)).all()
    with pytest.raises(ValueError, match="full-sequence"):
        full_sequence_table(SinkWindow(1, 4), q, k, g)


@given(
    seed=st.integers(0, 50),
    c=st.integers(0, 4),
    k=st.sampled_from([None, 1, 3]),
    radius=st.integers(0, 2),
)
def test_full_sequence_persistent_local_matches_brute_force(seed, c, k, radius):
    g = VideoGeometry(12, page_size=8, q_block=16)
    frames = 6
    q, keys = _full_inputs(g, frames, seed)
    pattern = PersistentLocal(c, 4, local_topk=k, radius_frames=radius)
    table = full_sequence_table(pattern, q, keys, g)
    n_blocks = math.ceil(frames * 12 / 8)
    table.validate(n_blocks)
    q_reps, k_reps = pool_query_blocks(q, 16).double(), pool_key_blocks(keys, 8).double()
    scorer = BlockScorer(4, 2, 8)
    imp = scorer.importance(q_reps, k_reps, torch.ones(1, 2, n_blocks, dtype=torch.bool))
    t = g.tokens_per_frame

    def span(j, size):
        start, stop = j * size, min((j + 1) * size, frames * t)
        return start // t, (stop - 1) // t

    for (_, h, m), pages in row_sets(table).items():
        qf = span(m, 16)
        window = [
            n
            for n in range(n_blocks)
            if span(n, 8)[0] <= qf[1] + radius and span(n, 8)[1] >= qf[0] - radius
        ]
        own = {n for n in range(n_blocks) if span(n, 8)[0] <= qf[1] and span(n, 8)[1] >= qf[0]}
        persistent = set(imp[0, h // 2].topk(min(c, n_blocks)).indices.tolist()) if c else set()
        window_max = max(
            sum(
                1
                for n in range(n_blocks)
                if span(n, 8)[0] <= span(mm, 16)[1] + radius
                and span(n, 8)[1] >= span(mm, 16)[0] - radius
            )
            for mm in range(math.ceil(frames * t / 16))
        )
        if k is None or k >= window_max:
            local = set(window)
        else:
            scores = q_reps[0, h, m] @ k_reps[0, h // 2, window].T
            local = {window[i] for i in scores.topk(min(k, len(window))).indices.tolist()} | own
        assert pages == local | persistent


# -- parameters and description ----------------------------------------------------------------


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: Dense(window_frames=0), "window_frames"),
        (lambda: Dense(sink_frames=-1), "sink_frames"),
        (lambda: SinkWindow(1, 0), "window_frames"),
        (lambda: TopK(density=0), "density"),
        (lambda: TopK(frame_density=1.5), "frame_density"),
        (lambda: TopK(beta=-1), "beta"),
        (lambda: PersistentLocal(-1, 4), "persistent_blocks"),
        (lambda: PersistentLocal(4, 4, local_topk=2, local_density=0.5), "local_topk"),
        (lambda: PersistentLocal(4, 4, local_density=2.0), "local_density"),
        (lambda: PersistentLocal(4, 4, force_own_frame=1), "force_own_frame"),
    ],
)
def test_bad_parameters_are_rejected_by_name(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_str_shows_parameters_and_footprint():
    text = str(PersistentLocal(32, 21, local_density=0.25))
    assert "persistent_blocks=32" in text and "local_density=0.25" in text
    assert "Min(32" in text and "KV pages per layer" in text
    assert "window_frames=9" in str(SinkWindow(2, 9))


def test_patterns_are_frozen_and_hashable():
    p = PersistentLocal(8, 6)
    with pytest.raises(AttributeError):
        p.window_frames = 3
    assert hash(p) == hash(PersistentLocal(8, 6))
