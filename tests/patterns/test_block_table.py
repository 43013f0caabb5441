import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import flex_attention

from codegen.reference import pbsa_reference
from patterns.block_table import BlockTable, expand_heads


def _random_visibility(seed, b, h, m, n, p=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, m, n, generator=g) < p


def _oracle_lists(visible, ids):
    """Python lists of the sorted page ids each row sees (the brute-force table)."""
    b, h, m, n = visible.shape
    out = {}
    for bi in range(b):
        for hi in range(h):
            for mi in range(m):
                out[bi, hi, mi] = sorted(
                    int(ids[bi, hi, c]) for c in range(n) if visible[bi, hi, mi, c]
                )
    return out


def _table_lists(table):
    counts, idx = table.kv_num_blocks, table.kv_indices
    return {
        (bi, hi, mi): idx[bi, hi, mi, : counts[bi, hi, mi]].tolist()
        for bi in range(counts.shape[0])
        for hi in range(counts.shape[1])
        for mi in range(counts.shape[2])
    }


@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 2),
    hkv=st.integers(1, 2),
    group=st.integers(1, 3),
    m=st.integers(1, 4),
    n=st.integers(1, 12),
    trim=st.booleans(),
)
def test_from_visibility_lists_exactly_the_visible_pages_sorted(seed, b, hkv, group, m, n, trim):
    h = hkv * group
    visible = _random_visibility(seed, b, h, m, n)
    g = torch.Generator().manual_seed(seed + 1)
    num_pages = 3 * n
    # distinct physical ids per (b, kv head), in random order
    ids = torch.stack([torch.randperm(num_pages, generator=g)[:n] for _ in range(b * hkv)]).view(
        b, hkv, n
    )
    kmax = int(visible.sum(-1).max()) if trim else None
    table = BlockTable.from_visibility(visible, 8, 4, page_ids=ids, max_blocks=kmax)
    table.validate(num_pages)
    assert table.kv_indices.dtype == torch.int32 and table.kv_num_blocks.dtype == torch.int32
    assert table.max_blocks == (n if kmax is None else kmax)
    assert _table_lists(table) == _oracle_lists(visible, expand_heads(ids, h, "ids"))


def test_from_visibility_without_ids_uses_column_numbers_and_shares_rows():
    visible = torch.tensor([True, False, True, True, False]).view(1, 1, 1, 5)
    table = BlockTable.from_visibility(
        visible.expand(2, 3, 1, 5), 16, 16, num_q_blocks=4, max_blocks=3
    )
    assert table.kv_indices.shape == (2, 3, 4, 3)
    assert (table.kv_num_blocks == 3).all()
    assert (table.kv_indices == torch.tensor([0, 2, 3], dtype=torch.int32)).all()
    with pytest.raises(ValueError, match="max_blocks"):
        BlockTable.from_visibility(visible, 16, 16, max_blocks=6)
    with pytest.raises(ValueError, match="visible"):
        BlockTable.from_visibility(visible.int(), 16, 16)


def test_from_visibility_runs_a_large_table_fast():
    # Wan at 20 s: 12 heads, 37 query blocks, ~1000 candidate pages
    visible = _random_visibility(0, 1, 12, 37, 1024, p=0.25)
    ids = torch.randperm(4096)[:1024].view(1, 1, 1024).expand(1, 12, 1024)
    start = time.perf_counter()
    table = BlockTable.from_visibility(visible, 128, 128, page_ids=ids, max_blocks=400)
    assert time.perf_counter() - start < 2.0
    table.validate(4096)


def _valid_table():
    return BlockTable(
        torch.tensor([[[2, 0]]], dtype=torch.int32),
        torch.tensor([[[[1, 3, 0], [0, 0, 0]]]], dtype=torch.int32),
        q_block=4,
        page_size=4,
    )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.kv_indices.__setitem__((0, 0, 0, 1), 1), "ascending"),
        (lambda t: t.kv_indices.__setitem__((0, 0, 0, 0), 5), "ascending"),
        (lambda t: t.kv_indices.__setitem__((0, 0, 0, 1), 9), "num_pages"),
        (lambda t: t.kv_indices.__setitem__((0, 0, 0, 0), -1), "negative"),
        (lambda t: t.kv_num_blocks.__setitem__((0, 0, 1), 4), "Kmax"),
        (lambda t: t.kv_indices.__setitem__((0, 0, 1, 2), 7), "padding"),
    ],
)
def test_validate_rejects_each_broken_invariant(mutate, message):
    table = _valid_table()
    table.validate(num_pages=8)
    mutate(table)
    with pytest.raises(ValueError, match=message):
        table.validate(num_pages=8)


def test_validate_rejects_wrong_dtype_and_shape():
    table = _valid_table()
    with pytest.raises(ValueError, match="int32"):
        BlockTable(table.kv_num_blocks.long(), table.kv_indices, 4, 4).validate()
    with pytest.raises(ValueError, match="kv_num_blocks"):
        BlockTable(table.kv_num_blocks[..., :1], table.kv_indices, 4, 4).validate()


def _paged_problem(seed, b=1, hkv=2, group=2, m=3, num_pages=7, page=4, q_block=4, d=8):
    g = torch.Generator().manual_seed(seed)
    h = hkv * group
    visible = torch.rand(b, h, m, num_pages, generator=g) < 0.5
    table = BlockTable.from_visibility(visible, q_block, page)
    lens = torch.randint(0, page + 1, (b, hkv, num_pages), generator=g, dtype=torch.int32)
    q = torch.randn(b, m * q_block, h, d, generator=g)
    k = torch.randn(b, hkv, num_pages, page, d, generator=g)
    v = torch.randn(b, hkv, num_pages, page, d, generator=g)
    return table, lens, q, k, v


def test_visible_pages_inverts_from_visibility():
    visible = _random_visibility(3, 2, 2, 3, 9)
    table = BlockTable.from_visibility(visible, 8, 8)
    assert torch.equal(table.visible_pages(9), visible)


def test_to_dense_mask_marks_valid_tokens_of_listed_pages():
    table, lens, *_ = _paged_problem(0)
    mask = table.to_dense_mask(lens)
    blocks = table.visible_pages(lens.shape[-1])
    b, h, lq, _ = mask.shape
    for hi in range(h):
        for row in range(lq):
            for page in range(lens.shape[-1]):
                for slot in range(table.page_size):
                    expected = bool(blocks[0, hi, row // table.q_block, page]) and slot < int(
                        lens[0, hi // 2, page]
                    )
                    assert bool(mask[0, hi, row, page * table.page_size + slot]) == expected


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_to_block_mask_gives_the_same_attention_as_the_table():
    table, lens, q, k, v = _paged_problem(1)
    lens[..., 0] = 4  # page 0 listed and full for every row: no row sees nothing
    table = BlockTable.from_visibility(
        table.visible_pages(lens.shape[-1]) | (torch.arange(7) == 0), 4, 4
    )
    block_mask = table.to_block_mask(lens, q_len=q.shape[1])
    dense_blocks = block_mask.to_dense()[..., : lens.shape[-1]].bool()
    assert torch.equal(dense_blocks, table.visible_pages(lens.shape[-1]))
    b, hkv, n, page, d = k.shape
    flat_k = k.reshape(b, hkv, n * page, d).double()
    flat_v = v.reshape(b, hkv, n * page, d).double()
    out = flex_attention(
        q.transpose(1, 2).double(), flat_k, flat_v, block_mask=block_mask, enable_gqa=True
    ).transpose(1, 2)
    expected, _ = pbsa_reference(q, k, v, table.kv_num_blocks, table.kv_indices, lens, q_block=4)
    torch.testing.assert_close(out, expected)
