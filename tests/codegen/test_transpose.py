"""The transposed block table: every listed (query block, page) pair exactly once, sorted."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codegen.samples import random_table
from codegen.transpose import transpose_table


def listed_pairs(nb, idx, kv_heads):
    """{(b, g, page): [h·Mq + block, ...]} straight from the table, in loops."""
    batch, heads, mq, _ = idx.shape
    group = heads // kv_heads
    pairs = {}
    for b in range(batch):
        for h in range(heads):
            for r in range(mq):
                for slot in range(int(nb[b, h, r])):
                    key = (b, h // group, int(idx[b, h, r, slot]))
                    pairs.setdefault(key, []).append(h * mq + r)
    return pairs


@given(
    batch=st.integers(1, 2),
    heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (4, 1)]),
    mq=st.integers(1, 5),
    num_pages=st.integers(1, 6),
    extra_slots=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_pair_once_in_ascending_order(batch, heads_kv, mq, num_pages, extra_slots, seed):
    heads, kv_heads = heads_kv
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, num_pages + 1, (batch, heads, mq), generator=g)
    nb, idx = random_table(counts, num_pages, generator=g, kmax=num_pages + extra_slots)
    # Padding slots may hold anything (here: out-of-range ids): they must never be listed.
    slots = torch.arange(idx.shape[-1])
    idx = torch.where(slots < nb.unsqueeze(-1), idx, 10**6).to(torch.int32)
    t = transpose_table(nb, idx, kv_heads=kv_heads, num_pages=num_pages)

    n_keys = batch * kv_heads * num_pages
    assert t.offsets.dtype == t.entries.dtype == torch.int32
    assert t.offsets.shape == (n_keys + 1,) and int(t.offsets[0]) == 0
    assert int(t.offsets[-1]) == int(nb.sum())
    assert bool((t.offsets[1:] >= t.offsets[:-1]).all())
    expected = listed_pairs(nb, idx, kv_heads)
    for b in range(batch):
        for kv in range(kv_heads):
            for page in range(num_pages):
                key = (b * kv_heads + kv) * num_pages + page
                lo, hi = int(t.offsets[key]), int(t.offsets[key + 1])
                got = t.entries[lo:hi].tolist()
                # Exactly the table's pairs for this page, strictly ascending.
                assert got == sorted(expected.get((b, kv, page), []))
                assert all(x < y for x, y in zip(got, got[1:], strict=False))


def test_empty_table_and_zero_slots():
    nb = torch.zeros(1, 2, 3, dtype=torch.int32)
    idx = torch.zeros(1, 2, 3, 0, dtype=torch.int32)
    t = transpose_table(nb, idx, kv_heads=1, num_pages=4)
    assert t.offsets.tolist() == [0] * 5 and t.entries.numel() == 0


@pytest.mark.parametrize(
    "nb_shape, idx_shape, kv_heads, match",
    [
        ((1, 2, 3), (1, 2, 4, 2), 1, "kv_num_blocks, kv_indices"),
        ((1, 2, 3), (1, 2, 3), 1, "kv_num_blocks, kv_indices"),
        ((1, 3, 3), (1, 3, 3, 2), 2, "kv_heads"),
    ],
)
def test_rejects_bad_shapes(nb_shape, idx_shape, kv_heads, match):
    nb = torch.zeros(nb_shape, dtype=torch.int32)
    idx = torch.zeros(idx_shape, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        transpose_table(nb, idx, kv_heads=kv_heads, num_pages=4)
