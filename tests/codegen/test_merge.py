"""merge_partials: two halves of a page list merge into the whole."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import codegen
from codegen.samples import small_inputs


@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(["BLHD", "BHLD"]))
def test_merging_disjoint_halves_equals_whole(seed, layout):
    args = small_inputs(batch=2, q_len=37, num_pages=6, layout=layout, seed=seed)
    whole_out, whole_lse = codegen.pbsa_attention(**args, backend="torch")
    counts, idx = args["kv_num_blocks"], args["kv_indices"]
    first = (counts + 1) // 2  # split each row's list in two (either part may be empty)
    slots = torch.arange(idx.shape[-1])
    second_idx = torch.gather(idx, -1, (slots + first.unsqueeze(-1)).clamp(max=idx.shape[-1] - 1))
    out1, lse1 = codegen.pbsa_attention(**{**args, "kv_num_blocks": first}, backend="torch")
    part2 = {**args, "kv_num_blocks": counts - first, "kv_indices": second_idx.contiguous()}
    out2, lse2 = codegen.pbsa_attention(**part2, backend="torch")
    out, lse = codegen.merge_partials(out1, lse1, out2, lse2, layout=layout)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, whole_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)


def test_rejects_mismatched_lse():
    out = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="lse2"):
        codegen.merge_partials(out, torch.zeros(1, 2, 4), out, torch.zeros(1, 4, 2))


def test_an_empty_part_leaves_the_other_unchanged():
    out1, out2 = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    lse1, lse2 = torch.randn(1, 2, 3), torch.full((1, 2, 3), -torch.inf)
    lse2[0, 0, 0] = lse1[0, 0, 0] = -torch.inf  # one row empty in both parts
    out, lse = codegen.merge_partials(out1, lse1, out2, lse2)
    assert torch.equal(lse, lse1)
    assert torch.equal(out[0, 0, 0], torch.zeros(8))
    torch.testing.assert_close(out[0, 1:], out1[0, 1:])


@pytest.mark.parametrize("bad", [torch.inf, torch.nan])
@pytest.mark.parametrize("which", ["lse1", "lse2"])
def test_rejects_positive_infinite_or_nan_lse(bad, which):
    out = torch.zeros(1, 4, 2, 8)
    lses = dict(lse1=torch.zeros(1, 2, 4), lse2=torch.zeros(1, 2, 4))
    lses[which][0, 1, 2] = bad
    with pytest.raises(ValueError, match=which):
        codegen.merge_partials(out, lses["lse1"], out, lses["lse2"])
