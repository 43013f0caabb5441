import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.image import imread

from patterns.diagnostics import (
    attention_mass_recall,
    plot_block_mask,
    plot_recall_heatmap,
    topk_recall,
)
from patterns.scoring import block_attention_mass, query_block_rows
from patterns.selection import topk_mask


def _recall_oracle(q, k, visible, q_block, kv_block):
    """Token-level float64: expand the block mask to tokens, sum kept weight per row."""
    q, k = q.double(), k.double()
    heads, kv_heads = q.shape[2], k.shape[2]
    kk = k.repeat_interleave(heads // kv_heads, dim=2)
    probs = (torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(q.shape[3])).softmax(-1)
    rows = torch.arange(q.shape[1]) // q_block
    cols = torch.arange(k.shape[1]) // kv_block
    token_mask = visible[:, :, rows][:, :, :, cols]
    return (probs * token_mask).sum(-1).mean(dim=(0, 2))


@given(
    lq=st.integers(1, 20),
    lk=st.integers(1, 25),
    q_block=st.integers(1, 7),
    kv_block=st.integers(1, 6),
    gqa=st.sampled_from([(2, 2), (4, 1)]),
    seed=st.integers(0, 2**16),
)
def test_attention_mass_recall_matches_token_level_oracle(lq, lk, q_block, kv_block, gqa, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = gqa
    q = torch.randn(2, lq, heads, 8, generator=gen) * 2
    k = torch.randn(2, lk, kv_heads, 8, generator=gen) * 2
    mq, n = -(-lq // q_block), -(-lk // kv_block)
    visible = torch.rand(2, heads, mq, n, generator=gen) > 0.5
    recall = attention_mass_recall(q, k, visible, q_block, kv_block)
    assert recall.shape == (heads,) and recall.dtype == torch.float32
    expect = _recall_oracle(q, k, visible, q_block, kv_block)
    torch.testing.assert_close(recall.double(), expect, rtol=1e-5, atol=1e-5)


def test_attention_mass_recall_extremes():
    q, k = torch.randn(1, 10, 2, 8), torch.randn(1, 17, 2, 8)
    full = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    torch.testing.assert_close(attention_mass_recall(q, k, full, 4, 8), torch.ones(2))
    torch.testing.assert_close(attention_mass_recall(q, k, ~full, 4, 8), torch.zeros(2))


def test_attention_mass_recall_rejects_bad_visibility():
    q, k = torch.randn(1, 10, 2, 8), torch.randn(1, 17, 2, 8)
    with pytest.raises(ValueError, match=r"visible must have shape \[B, H, Mq, N\]"):
        attention_mass_recall(q, k, torch.ones(1, 2, 3, 4, dtype=torch.bool), 4, 8)
    with pytest.raises(TypeError, match="bool"):
        attention_mass_recall(q, k, torch.ones(1, 2, 3, 3), 4, 8)


def test_topk_mask_selects_k_largest():
    scores = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert topk_mask(scores, 2).tolist() == [[False, True, False, True, False]]
    assert topk_mask(scores, 5).all() and topk_mask(scores, 6).all()
    assert not topk_mask(scores, 0).any()
    allowed = torch.tensor([True, False, True, False, True])
    assert topk_mask(scores, 2, allowed).tolist() == [[True, False, False, False, True]]
    assert topk_mask(scores, 4, allowed).tolist() == [allowed.tolist()]
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 0"):
            topk_mask(scores, bad)
    for bad in (0, 6):
        with pytest.raises(ValueError, match=r"k must be an int in \[1, 5\]"):
            topk_recall(scores[None, None], scores[None, None].softmax(-1), bad)


def test_topk_recall_oracle_selection_dominates_and_weights_partial_blocks():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 2, 8, generator=gen) * 3, torch.randn(2, 24, 1, 8, generator=gen) * 3
    mass = block_attention_mass(q, k, 4, 4)
    rows = query_block_rows(10, 4)
    best = topk_recall(mass, mass, 2, row_weights=rows)
    random_scores = torch.rand(mass.shape, generator=gen)
    assert (best >= topk_recall(random_scores, mass, 2, row_weights=rows) - 1e-6).all()
    torch.testing.assert_close(topk_recall(random_scores, mass, 6), torch.ones(2))
    # same selection through the token-level path
    visible = topk_mask(random_scores, 2)
    torch.testing.assert_close(
        topk_recall(random_scores, mass, 2, row_weights=rows),
        attention_mass_recall(q, k, visible, 4, 4),
    )
    # unweighted = plain mean over query blocks
    kept = (mass * visible).sum(-1)
    torch.testing.assert_close(topk_recall(random_scores, mass, 2), kept.mean(dim=(0, 2)))
    with pytest.raises(ValueError, match="same"):
        topk_recall(random_scores[..., :5], mass, 2)
    with pytest.raises(ValueError, match="row_weights"):
        topk_recall(random_scores, mass, 2, row_weights=rows[:2])


def _assert_png(path, min_pixels=200):
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= min_pixels and image.shape[1] >= min_pixels
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_recall_heatmap_writes_png(tmp_path):
    recall = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "recall.png"
    plot_recall_heatmap(recall, path)
    _assert_png(path)
    with pytest.raises(ValueError, match="recall"):
        plot_recall_heatmap(torch.rand(3), tmp_path / "bad.png")


def test_plot_block_mask_bool_and_float(tmp_path):
    gen = torch.Generator().manual_seed(0)
    plot_block_mask(torch.rand(8, 20, generator=gen) > 0.7, tmp_path / "mask.png", "top-K")
    _assert_png(tmp_path / "mask.png")
    mass = block_attention_mass(torch.randn(1, 32, 1, 8), torch.randn(1, 64, 1, 8), 4, 4)
    plot_block_mask(mass[0, 0], tmp_path / "mass.png", "dense mass")
    _assert_png(tmp_path / "mass.png")
    with pytest.raises(ValueError, match="visible"):
        plot_block_mask(mass, tmp_path / "bad.png")
