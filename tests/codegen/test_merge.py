"""merge_partials: two halves of a page list merge into the whole."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import codegen
from codegen.samples import random_inputs


@given(seed=st.integers(0, 2**31 - 1), layout=st.sampled_from(["BLHD", "BHLD"]))
def test_merging_disjoint_halves_equals_whole(seed, layout):
    args = random_inputs(
        batch=2,
        heads=2,
        kv_heads=1,
        q_len=37,
        head_dim=16,
        page_size=16,
        q_block=16,
        num_pages=6,
        layout=layout,
        seed=seed,
    )
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
