"""pbsa_attention against the float64 oracle, for every backend available here."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import codegen
from codegen.reference import pbsa_reference
from codegen.samples import random_inputs, small_inputs

# |out - ref| <= atol + rtol·|ref| per dtype: fp32 runs exact fp32 dots; half types round
# the probabilities to the input dtype before P·V, so the error is a few input ulps.
TOL = {
    torch.float32: dict(out=(2e-4, 1e-4), lse=(1e-4, 1e-5)),
    torch.float16: dict(out=(5e-3, 5e-3), lse=(2e-3, 2e-4)),
    torch.bfloat16: dict(out=(3e-2, 2e-2), lse=(2e-2, 2e-3)),
}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "triton"] if CUDA else ["torch", "interpret"]


def check_against_oracle(args: dict, backend: str) -> None:
    out, lse = codegen.pbsa_attention(**args, backend=backend)
    ref_out, ref_lse = pbsa_reference(**args)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), "empty rows must have lse = -inf"
    (oa, orl), (la, lrl) = TOL[out.dtype]["out"], TOL[out.dtype]["lse"]
    err = (out.double() - ref_out).abs() - orl * ref_out.abs()
    assert err.max() <= oa, f"out error {err.max():.3g} > {oa}"
    live = ~empty
    lerr = (lse.double()[live] - ref_lse[live]).abs() - lrl * ref_lse[live].abs()
    assert lerr.numel() == 0 or lerr.max() <= la, f"lse error {lerr.max():.3g} > {la}"


dims = st.fixed_dictionaries(
    dict(
        batch=st.integers(1, 2),
        kv_heads=st.integers(1, 2),
        group=st.sampled_from([1, 2, 3]),
        head_dim=st.sampled_from([16, 32, 64, 128]),
        page_size=st.sampled_from([16, 32]),
        q_block=st.sampled_from([16, 32, 64]),
        q_len=st.integers(1, 100),
        num_pages=st.integers(1, 8),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
        layout=st.sampled_from(["BLHD", "BHLD"]),
        paged=st.booleans(),
        q_scale=st.sampled_from([1.0, 30.0, 100.0]),
        seed=st.integers(0, 2**31 - 1),
    )
)


@pytest.mark.parametrize("backend", BACKENDS)
@given(d=dims)
def test_matches_oracle(backend, d):
    group = d.pop("group")
    args = random_inputs(heads=d["kv_heads"] * group, device=DEVICE, **d)
    check_against_oracle(args, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_table_gives_zero_and_neg_inf(backend):
    args = small_inputs(seed=1, device=DEVICE)
    args["kv_num_blocks"].zero_()
    args["kv_indices"].fill_(12345)  # padding is never read, whatever it holds
    out, lse = codegen.pbsa_attention(**args, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.all(lse == -math.inf)


def test_full_table_equals_dense_sdpa():
    args = random_inputs(
        batch=1,
        heads=4,
        kv_heads=2,
        q_len=50,
        head_dim=32,
        page_size=16,
        q_block=16,
        num_pages=4,
        paged=False,
        layout="BHLD",
        seed=3,
    )
    args["kv_num_blocks"].fill_(4)
    args["kv_indices"] = torch.arange(4, dtype=torch.int32).expand(1, 4, 4, 4).contiguous()
    out, _ = codegen.pbsa_attention(**args, backend="torch")
    k = args["k"].repeat_interleave(2, dim=1)
    v = args["v"].repeat_interleave(2, dim=1)
    dense = torch.nn.functional.scaled_dot_product_attention(args["q"], k, v)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(layout="BSHD"), "layout"),
        (dict(backend="cuda"), "backend"),
        (dict(q_block=0), "q_block"),
        (dict(kv_num_blocks=torch.zeros(1, 2, 2, dtype=torch.int64)), "kv_num_blocks"),
        (dict(kv_num_blocks=torch.zeros(1, 2, 5, dtype=torch.int32)), "kv_num_blocks"),
        (dict(kv_indices=torch.zeros(1, 2, 5, 3, dtype=torch.int32)), "kv_indices"),
        (dict(page_lens=torch.zeros(1, 1, 7, dtype=torch.int32)), "page_lens"),
        (dict(k=torch.zeros(1, 3, 3, 16, 16)), "k"),
        (dict(scale=0.0), "scale"),
        (dict(scale=-0.25), "scale"),
        (dict(scale=math.nan), "scale"),
        (dict(scale=math.inf), "scale"),
        (dict(scale="0.25"), "scale"),
        (dict(autotune=1), "autotune"),
    ],
)
def test_rejects_bad_arguments(change, error):
    args = small_inputs(seed=2)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=error):
        codegen.pbsa_attention(**args)


def test_rejects_out_of_range_page_ids_on_torch_backend():
    args = small_inputs(seed=2)
    args["kv_num_blocks"].fill_(1)
    args["kv_indices"][..., 0] = 3
    with pytest.raises(ValueError, match="kv_indices"):
        codegen.pbsa_attention(**args, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_tied_logits_keep_full_accuracy(backend):
    """Every listed key gets the same logit 1e7 (exact in fp32): the softmax is uniform, so
    out is the mean of the visible values whatever the magnitude."""
    args = small_inputs(seed=6, device=DEVICE)
    q, k = args["q"], args["k"]
    q.zero_()[..., 0] = 1e7
    k.zero_()[..., 0] = 1.0
    # one query block sees nothing, another at least one page, whatever the random table
    args["kv_num_blocks"][:, :, 0] = 0
    args["kv_num_blocks"][:, :, -1].clamp_(min=1)
    out, lse = codegen.pbsa_attention(**args, scale=1.0, backend=backend)
    ref_out, ref_lse = pbsa_reference(**args, scale=1.0)
    assert ref_lse.isinf().any() and (~ref_lse.isinf()).any()  # empty and live rows
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1.0, rtol=0.0)  # fp32 ulp at 1e7
