"""The backward launcher's memo of transposed tables and its output checks."""

import pytest
import torch

from codegen.launch_bwd import pbsa_backward_triton, transposed
from codegen.samples import sample_problem, small_inputs
from codegen.transpose import transpose_table


def test_transposed_table_is_reused_until_the_table_changes():
    args = small_inputs(seed=2)
    p = sample_problem(args)
    first = transposed(p)
    assert transposed(sample_problem(args)) is first  # same tensors: one build
    args["kv_num_blocks"].zero_()  # in place: the version moves, the memo must not hit
    again = transposed(p)
    fresh = transpose_table(p.kv_num_blocks, p.kv_indices, kv_heads=1, num_pages=p.num_pages)
    assert again is not first and torch.equal(again.offsets, fresh.offsets)
    assert int(again.offsets[-1]) == 0


def test_given_outputs_must_match_q_k_v():
    args = small_inputs(seed=0)
    p = sample_problem(args)
    lse = torch.zeros(1, 2, 40)
    with pytest.raises(ValueError, match="dk"):
        pbsa_backward_triton(
            p, args["q"], lse, args["q"], interpret=True, dk=torch.empty_like(args["k"][..., :1])
        )
