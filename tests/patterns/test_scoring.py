import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from patterns.scorer_weights import load_scorers, save_scorers
from patterns.scoring import (
    BlockScorer,
    block_attention_mass,
    iter_scorers,
    pool_key_blocks,
    pool_pages,
    pool_query_blocks,
    query_block_rows,
)


def _randomise(scorer: BlockScorer, seed: int) -> BlockScorer:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in scorer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return scorer


def _block_mean_oracle(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [B, L, H, D] -> [B, H, M, D] by an explicit loop over blocks, float64."""
    x = x.double()
    means = [x[:, s : s + block].mean(1) for s in range(0, x.shape[1], block)]
    return torch.stack(means, dim=2)


def _mass_oracle(q, k, q_block, kv_block):
    """Token-level float64 dense attention reduced to blocks by explicit loops."""
    q, k = q.double(), k.double()
    heads, kv_heads, dim = q.shape[2], k.shape[2], q.shape[3]
    kk = k.repeat_interleave(heads // kv_heads, dim=2)
    probs = (torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(dim)).softmax(-1)
    lq, lk = q.shape[1], k.shape[1]
    rows = []
    for qs in range(0, lq, q_block):
        cols = [
            probs[:, :, qs : qs + q_block, ks : ks + kv_block].sum(-1).mean(-1)
            for ks in range(0, lk, kv_block)
        ]
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, 2)


def test_query_block_rows_partial_last_block():
    assert query_block_rows(10, 4).tolist() == [4, 4, 2]
    assert query_block_rows(8, 4).tolist() == [4, 4]


def test_pool_query_blocks_matches_loop_and_upcasts_half():
    q = torch.randn(2, 11, 3, 8)
    out = pool_query_blocks(q, 4)
    assert out.shape == (2, 3, 3, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _block_mean_oracle(q, 4))
    out_bf16 = pool_query_blocks(q.bfloat16(), 4)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16.double(), _block_mean_oracle(q.bfloat16(), 4))


def test_pool_pages_ignores_padding_and_zeroes_empty_pages():
    pages = torch.randn(1, 2, 3, 4, 5)
    lens = torch.tensor([[[4, 1, 0], [2, 3, 4]]], dtype=torch.int32)
    garbage = pages.clone()
    valid = torch.arange(4) < lens[..., None]
    garbage[~valid] = float("nan")  # padding must never be read
    out = pool_pages(garbage, lens)
    assert out.shape == (1, 2, 3, 5)
    for h in range(2):
        for n in range(3):
            length = int(lens[0, h, n])
            expect = pages[0, h, n, :length].mean(0) if length else torch.zeros(5)
            torch.testing.assert_close(out[0, h, n], expect)


def test_pool_key_blocks_equals_pool_pages_of_the_same_keys():
    k = torch.randn(2, 13, 2, 4)  # 13 = 3 pages of 4 + 1
    pages = torch.zeros(2, 2, 4, 4, 4)
    lens = torch.zeros(2, 2, 4, dtype=torch.int64)
    for n in range(4):
        chunk = k[:, n * 4 : (n + 1) * 4].permute(0, 2, 1, 3)
        pages[:, :, n, : chunk.shape[2]] = chunk
        lens[:, :, n] = chunk.shape[2]
    torch.testing.assert_close(pool_key_blocks(k, 4), pool_pages(pages, lens))


def test_pool_pages_rejects_bad_lengths():
    with pytest.raises(ValueError, match="page_lens"):
        pool_pages(torch.randn(1, 1, 2, 4, 3), torch.tensor([[[5, 1]]]))
    with pytest.raises(TypeError, match="page_lens"):
        pool_pages(torch.randn(1, 1, 2, 4, 3), torch.tensor([[[1.0, 1.0]]]))
    with pytest.raises(ValueError, match="page_lens"):
        pool_pages(torch.randn(1, 1, 2, 4, 3), torch.tensor([[1, 1]]))


def test_untrained_scorer_is_mean_pooling():
    q = torch.randn(2, 9, 4, 8)
    k = torch.randn(2, 21, 2, 8)
    scorer = BlockScorer(4, 2, 8)
    logits = scorer.block_logits(pool_query_blocks(q, 4), pool_key_blocks(k, 8))
    qm, km = _block_mean_oracle(q, 4), _block_mean_oracle(k, 8).repeat_interleave(2, dim=1)
    expect = qm @ km.transpose(-1, -2) / math.sqrt(8)
    assert logits.shape == (2, 4, 3, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_block_logits_gqa_mapping_with_trained_weights(heads, kv_heads):
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    scorer = _randomise(BlockScorer(heads, kv_heads, 8), seed=heads + kv_heads)
    q_reps = torch.randn(2, heads, 3, 8, generator=gen)
    k_reps = torch.randn(2, kv_heads, 5, 8, generator=gen)
    logits = scorer.block_logits(q_reps, k_reps)
    wq, wk = scorer.wq.double().detach(), scorer.wk.double().detach()
    for h in range(heads):
        g = h // (heads // kv_heads)
        expect = (q_reps[:, h].double() @ wq[h]) @ (k_reps[:, g].double() @ wk[g]).transpose(-1, -2)
        torch.testing.assert_close(
            logits[:, h].double(), expect / math.sqrt(8), rtol=1e-5, atol=1e-5
        )


def test_block_logits_float32_for_half_inputs_and_half_parameters():
    scorer = _randomise(BlockScorer(2, 1, 8), 0)
    q_reps, k_reps = torch.randn(1, 2, 2, 8), torch.randn(1, 1, 3, 8)
    ref = scorer.block_logits(q_reps, k_reps)
    out = scorer.to(torch.bfloat16).block_logits(q_reps.bfloat16(), k_reps.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_block_logits_rejects_wrong_shapes():
    scorer = BlockScorer(4, 2, 8)
    with pytest.raises(ValueError, match="q_reps"):
        scorer.block_logits(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="k_reps"):
        scorer.block_logits(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="batch"):
        scorer.block_logits(torch.randn(2, 4, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockScorer(4, 3, 8)


def test_importance_softmax_over_candidates_only():
    gen = torch.Generator().manual_seed(1)
    scorer = _randomise(BlockScorer(4, 2, 8), 3)
    q_reps = torch.randn(2, 4, 3, 8, generator=gen)
    k_reps = torch.randn(2, 2, 6, 8, generator=gen)
    cand = torch.rand(2, 2, 6, generator=gen) > 0.4
    cand[:, :, 0] = True
    cand[1, 1] = False  # a kv head with no candidate at all
    imp = scorer.importance(q_reps, k_reps, cand)
    assert imp.shape == (2, 2, 6)
    assert torch.isneginf(imp[~cand]).all() and torch.isfinite(imp[cand]).all()
    # candidates of each kv head sum to (query blocks) x (query heads of the group)
    sums = imp.masked_fill(~cand, 0).sum(-1)
    torch.testing.assert_close(sums[cand.any(-1)], torch.full_like(sums[cand.any(-1)], 3 * 2.0))
    # oracle: softmax restricted to the candidate subset, loops over (b, kv head)
    logits = scorer.block_logits(q_reps, k_reps).double()
    for b in range(2):
        for g in range(2):
            idx = cand[b, g].nonzero().flatten()
            if idx.numel() == 0:
                continue
            expect = logits[b, 2 * g : 2 * g + 2][..., idx].softmax(-1).sum((0, 1))
            torch.testing.assert_close(imp[b, g, idx].double(), expect, rtol=1e-5, atol=1e-5)
    # what non-candidate blocks contain does not matter
    moved = k_reps.clone()
    moved[~cand] = 100.0
    torch.testing.assert_close(scorer.importance(q_reps, moved, cand), imp)


def test_importance_rejects_bad_mask_without_side_effects():
    scorer = BlockScorer(2, 1, 4)
    q_reps, k_reps = torch.randn(1, 2, 2, 4), torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match="candidate_mask"):
        scorer.importance(q_reps, k_reps, torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="candidate_mask"):
        scorer.importance(q_reps, k_reps, torch.ones(1, 2, 3, dtype=torch.bool))


@given(
    batch=st.integers(1, 2),
    lq=st.integers(1, 23),
    lk=st.integers(1, 30),
    q_block=st.integers(1, 8),
    kv_block=st.integers(1, 9),
    gqa=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    chunk=st.sampled_from([1, 37, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_block_attention_mass_matches_float64_oracle(
    batch, lq, lk, q_block, kv_block, gqa, chunk, seed
):
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = gqa
    q = torch.randn(batch, lq, heads, 8, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(batch, lk, kv_heads, 8, generator=gen, dtype=torch.float64) * 2
    mass = block_attention_mass(q, k, q_block, kv_block, max_chunk_elems=chunk)
    assert mass.shape == (batch, heads, -(-lq // q_block), -(-lk // kv_block))
    torch.testing.assert_close(mass, _mass_oracle(q, k, q_block, kv_block))
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass.sum(-1)))


def test_block_attention_mass_half_inputs_computed_in_float32():
    q, k = torch.randn(1, 10, 2, 16), torch.randn(1, 20, 1, 16)
    mass = block_attention_mass(q.bfloat16(), k.bfloat16(), 4, 8)
    assert mass.dtype == torch.float32
    torch.testing.assert_close(mass.double(), _mass_oracle(q.bfloat16(), k.bfloat16(), 4, 8))


def test_block_attention_mass_rejects_bad_input():
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        block_attention_mass(q, k, 2, 2)
    with pytest.raises(ValueError, match="q_block"):
        block_attention_mass(q, torch.randn(1, 4, 2, 8), 0, 2)
    with pytest.raises(ValueError, match="k must be"):
        block_attention_mass(q, torch.randn(1, 4, 2, 4), 2, 2)


class _Layer(nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scorer = BlockScorer(heads, 1, 4)


def _model(heads=(2, 2)) -> nn.Module:
    return nn.ModuleList(_Layer(h) for h in heads)


def test_scorer_projections_live_in_parent_state_dict():
    keys = _model().state_dict().keys()
    assert {"0.scorer.wq", "0.scorer.wk", "1.scorer.wq", "1.scorer.wk"} <= set(keys)
    assert [name for name, _ in iter_scorers(_model())] == ["0.scorer", "1.scorer"]


def test_save_load_round_trip(tmp_path):
    src = _model()
    for i, (_, s) in enumerate(iter_scorers(src)):
        _randomise(s, i)
    path = tmp_path / "scorers.safetensors"
    save_scorers(src, path)
    dst = _model()
    load_scorers(dst, path)
    for (_, a), (_, b) in zip(iter_scorers(src), iter_scorers(dst), strict=True):
        torch.testing.assert_close(a.wq, b.wq)
        torch.testing.assert_close(a.wk, b.wk)
    assert not torch.equal(dst[0].scorer.wq, dst[1].scorer.wq)


def test_load_mismatch_raises_and_changes_nothing(tmp_path):
    path = tmp_path / "scorers.safetensors"
    save_scorers(_randomise(BlockScorer(2, 1, 4), 0), tmp_path / "single.safetensors")
    save_scorers(_model((2, 2)), path)
    for target, pattern in (
        (_model((2, 4)), "shape mismatches.*1.scorer.wq"),
        (_model((2, 2, 2)), "missing keys.*2.scorer"),
        (_model((2,)), "unexpected keys.*1.scorer"),
    ):
        with torch.no_grad():  # non-identity, so a partial load would show
            target[0].scorer.wq.mul_(3.0)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match=pattern):
            load_scorers(target, path)
        for key, value in target.state_dict().items():
            assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="missing keys"):
        load_scorers(_model(), tmp_path / "single.safetensors")
    with pytest.raises(ValueError, match="no BlockScorer"):
        save_scorers(nn.Linear(2, 2), tmp_path / "none.safetensors")


def _saved(tmp_path, tensors, name="bad.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (float("nan"), "holds NaN or inf"),
        (float("inf"), "holds NaN or inf"),
        (-float("inf"), "holds NaN or inf"),
    ],
)
def test_load_rejects_non_finite_weights_naming_file_and_key(tmp_path, value, message):
    good = {k: v.detach().clone() for k, v in _model().state_dict().items() if "scorer" in k}
    good["1.scorer.wk"][0, 1, 2] = value
    path = _saved(tmp_path, good)
    target = _model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"bad.safetensors.*'1.scorer.wk' {message}"):
        load_scorers(target, path)
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_load_rejects_non_float_weights_naming_file_and_key(tmp_path):
    tensors = {k: v.detach().clone() for k, v in _model().state_dict().items() if "scorer" in k}
    tensors["0.scorer.wq"] = tensors["0.scorer.wq"].to(torch.int32)
    with pytest.raises(ValueError, match=r"bad.safetensors.*'0.scorer.wq' is torch.int32"):
        load_scorers(_model(), _saved(tmp_path, tensors))


def test_load_rejects_shapes_of_another_layer_and_files_that_are_not_safetensors(tmp_path):
    path = tmp_path / "scorers.safetensors"
    save_scorers(_model((2, 2)), path)
    # same keys, projections of a layer with another head_dim
    other = nn.ModuleList([nn.Module(), nn.Module()])
    other[0].scorer, other[1].scorer = BlockScorer(2, 1, 8), BlockScorer(2, 1, 8)
    with pytest.raises(ValueError, match=r"scorers.safetensors.*0.scorer.wq: file \(2, 4, 4\)"):
        load_scorers(other, path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors.*not a readable safetensors"):
        load_scorers(_model(), junk)


def test_save_is_atomic_and_refuses_non_finite_projections(tmp_path):
    path = tmp_path / "scorers.safetensors"
    save_scorers(_model(), path)
    before = path.read_bytes()
    broken = _model()
    with torch.no_grad():
        broken[1].scorer.wq[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'1.scorer.wq' holds NaN or inf"):
        save_scorers(broken, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scorers.safetensors"]
