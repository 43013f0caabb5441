"""The fused PersistentLocal selection (three Triton kernels; interpreted on CPU, compiled on a
GPU) against the torch path and a float64 brute force."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from patterns import BlockScorer, CacheView, PersistentLocal, VideoGeometry, pool_query_blocks
from patterns.fused_select import fused_select_supported
from patterns.select_kernel import persistent_local_table

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

GEOMETRIES = [
    VideoGeometry(40, frames_per_chunk=2, page_size=16, q_block=16),  # partial pages
    VideoGeometry(24, frames_per_chunk=3, page_size=8, q_block=32),  # blocks straddle frames
    VideoGeometry(16, frames_per_chunk=1, page_size=16, q_block=4),  # tiny query blocks
]


def make_view(
    geometry, history, chunk_start, *, kv_heads, group, dim, slots, num_persistent, seed,
    scorer=None, dtype=torch.float32, equal_reps=False,
):  # fmt: skip
    """A view laid out as the runtime lays it out: ``frame_pages`` and ``persistent_pages`` are
    slices of wider buffers, every kv head row has its own random page ids."""
    g = torch.Generator().manual_seed(seed)
    ppf, f = geometry.pages_per_frame, geometry.frames_per_chunk
    fh = len(history)
    needed = slots + (fh + 1) * ppf + f * ppf
    num_pages = needed + 3
    rows = [torch.randperm(num_pages, generator=g)[:needed] for _ in range(kv_heads)]
    ids = torch.stack(rows).view(1, kv_heads, needed)
    persistent_buf = ids[..., :slots].clone()
    persistent_buf[..., num_persistent:] = -1
    frame_buf = ids[..., slots : slots + (fh + 1) * ppf].reshape(1, kv_heads, fh + 1, ppf)
    chunk_pages = ids[..., slots + (fh + 1) * ppf :].reshape(1, kv_heads, f, ppf)
    heads = kv_heads * group
    key_reps = torch.randn(1, kv_heads, num_pages, dim, generator=g)
    queries = torch.randn(1, geometry.chunk_tokens, heads, dim, generator=g).to(dtype)
    if equal_reps:
        # small integers: every score is exact in float32, so equal pages tie exactly
        key_reps[:] = torch.randint(-2, 3, (dim,), generator=g).float()
        queries = torch.randint(-2, 3, queries.shape, generator=g).to(dtype)
    view = CacheView(
        geometry=geometry,
        num_heads=heads,
        chunk_start=chunk_start,
        history_frames=tuple(history),
        frame_index=torch.tensor(history, dtype=torch.int64),
        frame_pages=frame_buf[:, :, :fh],
        chunk_pages=chunk_pages,
        persistent_pages=persistent_buf[..., :num_persistent],
        page_lens=torch.full((1, kv_heads, num_pages), geometry.page_size, dtype=torch.int32),
        key_reps=key_reps,
        queries=queries,
        scorer=scorer,
        start=torch.tensor(chunk_start),
    )
    if scorer is not None:
        scorer.to(DEVICE)
    tensors = {
        f.name: getattr(view, f.name).to(DEVICE)
        for f in dataclasses.fields(view)
        if isinstance(getattr(view, f.name), torch.Tensor)
    }
    return dataclasses.replace(view, **tensors)


def torch_view(view):
    """The same view for the torch path: pooled query reps, no raw queries."""
    reps = pool_query_blocks(view.queries, view.geometry.q_block)
    return dataclasses.replace(view, queries=None, query_reps=reps)


def window_scores64(view):
    """float64 scores [H, Mq, Nw] of the window columns (history slots, then the chunk)."""
    q = pool_query_blocks(view.queries.double(), view.geometry.q_block)[0].cpu()
    scorer = view.scorer or BlockScorer(view.num_heads, view.num_kv_heads, q.shape[-1])
    window = torch.cat([view.frame_pages.flatten(2), view.chunk_pages.flatten(2)], -1)[0].cpu()
    k = (
        view.key_reps[0]
        .double()
        .cpu()
        .gather(1, window.clamp(min=0)[..., None].expand(-1, -1, q.shape[-1]))
    )
    phi_q = q @ scorer.wq.detach().double().cpu()
    phi_k = (k @ scorer.wk.detach().double().cpu()).repeat_interleave(
        view.num_heads // view.num_kv_heads, 0
    )
    return phi_q @ phi_k.transpose(-1, -2) / math.sqrt(q.shape[-1]), window


def rows(table):
    counts, idx = table.kv_num_blocks[0].cpu(), table.kv_indices[0].cpu()
    return [
        [idx[h, m, : counts[h, m]].tolist() for m in range(counts.shape[1])]
        for h in range(counts.shape[0])
    ]


@given(
    geometry=st.sampled_from(GEOMETRIES),
    history=st.lists(st.sampled_from([-1, 0, 1]), min_size=0, max_size=5),
    kv_heads=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 2]),
    dim=st.sampled_from([16, 32]),
    num_persistent=st.integers(0, 3),
    k=st.integers(1, 6),
    force_own=st.booleans(),
    trained=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_fused_table_equals_the_torch_selection(
    geometry, history, kv_heads, group, dim, num_persistent, k, force_own, trained, dtype, seed
):
    # absolute frames: history slots hold frames before the chunk (−1 stays absent)
    history = [f if f < 0 else i for i, f in enumerate(history)]
    start = len(history)
    scorer = None
    if trained:
        scorer = BlockScorer(kv_heads * group, kv_heads, dim)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed + 1)
            scorer.wq.add_(0.3 * torch.randn(scorer.wq.shape, generator=gen))
            scorer.wk.add_(0.3 * torch.randn(scorer.wk.shape, generator=gen))
    view = make_view(
        geometry, history, start, kv_heads=kv_heads, group=group, dim=dim, slots=4,
        num_persistent=num_persistent, seed=seed, scorer=scorer, dtype=dtype,
    )  # fmt: skip
    pattern = PersistentLocal(4, 8, local_topk=k, force_own_frame=force_own)
    window_pages = (
        len(view.present_history) + geometry.frames_per_chunk
    ) * geometry.pages_per_frame
    k = pattern.local_k(window_pages)
    if k >= window_pages:
        return  # the all-visible table, no scoring: not the fused kernel's case
    reference = pattern.select(torch_view(view))
    bound = reference.max_blocks
    fused = persistent_local_table(view, k, bound, force_own)
    fused.validate(view.key_reps.shape[2])
    assert fused.kv_indices.shape == reference.kv_indices.shape

    # Same rows, except where two window pages score within float32 noise of the K-th best.
    scores, window = window_scores64(view)
    ref_rows, got_rows = rows(reference), rows(fused)
    for h in range(view.num_heads):
        hkv = h // group
        col_of = {int(p): c for c, p in enumerate(window[hkv].tolist())}
        allowed = [
            c
            for c in range(window.shape[-1])
            if c >= len(history) * geometry.pages_per_frame
            or history[c // geometry.pages_per_frame] >= 0
        ]
        for m in range(geometry.q_blocks_per_chunk):
            differ = set(ref_rows[h][m]) ^ set(got_rows[h][m])
            if not differ:
                continue
            kth = scores[h, m, allowed].sort(descending=True).values[k - 1]
            for page in differ:
                assert page in col_of, f"row ({h}, {m}): a non-window page differs"
                assert abs(float(scores[h, m, col_of[page]] - kth)) < 1e-4, (h, m, page)


def test_ties_go_to_the_lowest_window_column():
    geometry = GEOMETRIES[0]
    history = [0, -1, 2, 3]
    view = make_view(
        geometry, history, 4, kv_heads=1, group=2, dim=16, slots=4, num_persistent=2, seed=3,
        equal_reps=True,
    )  # fmt: skip
    k = 5
    table = persistent_local_table(view, k, 4 + k + 2 * geometry.pages_per_frame, False)
    ppf = geometry.pages_per_frame
    window = torch.cat([view.frame_pages.flatten(2), view.chunk_pages.flatten(2)], -1)[0, 0]
    # every window page scores the same: the first k held columns (slot 1 is absent)
    first = [c for c in range(window.numel()) if c // ppf != 1][:k]
    expected = sorted(view.persistent_pages[0, 0].tolist() + window[first].tolist())
    for h in range(2):
        for m in range(geometry.q_blocks_per_chunk):
            assert table.kv_num_blocks[0, h, m] == len(expected)
            assert table.kv_indices[0, h, m, : len(expected)].tolist() == expected
            assert not table.kv_indices[0, h, m, len(expected) :].any()


def test_large_and_negative_scores_order_like_floats():
    """Scores of both signs and large magnitude: the radix keys must order like the floats."""
    geometry = GEOMETRIES[1]
    view = make_view(
        geometry, [0, 1, 2], 3, kv_heads=1, group=1, dim=16, slots=0, num_persistent=0, seed=5,
    )  # fmt: skip
    view.key_reps.mul_(1e3)
    window_pages = 6 * geometry.pages_per_frame
    for k in (1, 2, window_pages // 2, window_pages - 1):
        table = persistent_local_table(view, k, k, False)
        scores, window = window_scores64(view)
        for m in range(geometry.q_blocks_per_chunk):
            best = scores[0, m].topk(k).indices
            assert sorted(table.kv_indices[0, 0, m].tolist()) == sorted(window[0, best].tolist())


def test_strided_queries_give_the_same_table():
    view = make_view(
        GEOMETRIES[1], [0, 1], 2, kv_heads=2, group=2, dim=16, slots=2, num_persistent=2, seed=7,
    )  # fmt: skip
    # the same values with a non-unit stride on head_dim
    strided = torch.empty(*view.queries.shape, 2, device=DEVICE)[..., 0]
    strided.copy_(view.queries)
    a = persistent_local_table(view, 3, 2 + 3 + 2 * GEOMETRIES[1].pages_per_frame, True)
    b = persistent_local_table(dataclasses.replace(view, queries=strided), 3, a.max_blocks, True)
    assert torch.equal(a.kv_num_blocks, b.kv_num_blocks)
    assert torch.equal(a.kv_indices, b.kv_indices)


def test_fused_path_is_only_taken_on_cuda_with_queries():
    view = make_view(
        GEOMETRIES[0], [0], 1, kv_heads=1, group=1, dim=16, slots=0, num_persistent=0, seed=0,
    )  # fmt: skip
    assert fused_select_supported(view) == (DEVICE == "cuda")
    assert not fused_select_supported(torch_view(view))
    assert not fused_select_supported(dataclasses.replace(view, scorer=torch.nn.Identity()))
    with pytest.raises(ValueError, match="queries"):
        persistent_local_table(dataclasses.replace(view, queries=None), 1, 4, False)
