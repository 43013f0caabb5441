"""Autograd of `pbsa_attention` (``torch.ops.sparse_forcing.pbsa``): gradcheck of the torch
backend in float64, the kernel backends' gradients against it, the saved LSE, compile."""

import pytest
import torch

import codegen
from codegen.reference import pbsa_reference
from codegen.samples import small_inputs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _split(args: dict) -> tuple[tuple, dict]:
    qkv = tuple(args.pop(n).requires_grad_() for n in ("q", "k", "v"))
    return qkv, args


@pytest.mark.parametrize(("paged", "layout"), [(True, "BLHD"), (False, "BHLD")])
def test_gradcheck_float64_torch_backend(paged, layout):
    # GQA (2 query heads on 1 kv head), partial and empty pages, rows listing nothing; tiny
    # so that the numerical Jacobian stays cheap.
    args = small_inputs(
        seed=3, dtype=torch.float64, paged=paged, layout=layout,
        q_len=10, head_dim=4, page_size=4, q_block=4, num_pages=4,
    )  # fmt: skip
    qkv, rest = _split(args)
    assert (rest["kv_num_blocks"] == 0).any()

    def attention(q, k, v):
        return codegen.pbsa_attention(q, k, v, **rest, backend="torch", return_lse=False)[0]

    assert torch.autograd.gradcheck(attention, qkv, fast_mode=True)


def test_gradients_match_the_float64_oracle():
    args = small_inputs(seed=5, dtype=torch.float64, q_len=40, q_scale=3.0)
    qkv, rest = _split(args)
    grad = torch.randn(
        qkv[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    out, _ = codegen.pbsa_attention(*qkv, **rest, backend="torch")
    got = torch.autograd.grad(out, qkv, grad)
    ref, _ = pbsa_reference(*qkv, **rest)
    expected = torch.autograd.grad(ref, qkv, grad)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["triton"] if CUDA else ["interpret"])
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
def test_kernel_backend_gradients_match_torch(backend, paged, deterministic):
    args = small_inputs(seed=7, paged=paged, device=DEVICE)
    grad = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for b in (backend, "torch"):
        qkv, rest = _split({k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()})
        out, lse = codegen.pbsa_attention(*qkv, **rest, backend=b, deterministic=deterministic)
        results.append((out, lse, torch.autograd.grad(out, qkv, grad)))
    (out, lse, grads), (ref_out, ref_lse, ref_grads) = results
    torch.testing.assert_close(out, ref_out, atol=2e-4, rtol=1e-4)
    for g, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_lse_is_saved_but_carries_no_gradient():
    args = small_inputs(seed=1)
    qkv, rest = _split(args)
    out, lse = codegen.pbsa_attention(*qkv, **rest, backend="torch")
    assert out.requires_grad and not lse.requires_grad
    out2, none = codegen.pbsa_attention(*qkv, **rest, backend="torch", return_lse=False)
    assert none is None
    torch.testing.assert_close(out2, out)
    # out2's backward still reads the LSE its forward saved
    (dq,) = torch.autograd.grad(out2.square().sum(), qkv[:1])
    assert dq.abs().sum() > 0
    with torch.no_grad():  # no graph: the direct backend call, not the op
        assert not codegen.pbsa_attention(*qkv, **rest, backend="torch")[0].requires_grad


def test_float64_is_torch_backend_only():
    args = small_inputs(seed=1, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 runs on backend='torch' only"):
        codegen.pbsa_attention(**args, backend="interpret")


def test_compiled_forward_and_backward_equal_eager():
    args = small_inputs(seed=4, paged=False)
    grad = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(3))

    def loss(q, k, v, rest):
        out, lse = codegen.pbsa_attention(q, k, v, **rest, backend="torch")
        return (out * grad).sum() + lse.nan_to_num(neginf=0.0).sum().detach()

    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        qkv, rest = _split({k: v.clone() if torch.is_tensor(v) else v for k, v in args.items()})
        value = fn(*qkv, rest)
        results.append((value, torch.autograd.grad(value, qkv)))
    (v1, g1), (v2, g2) = results
    torch.testing.assert_close(v2, v1)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def test_nondeterministic_backward_adds_dq_in_the_dkdv_kernel_unless_torch_forbids(monkeypatch):
    """deterministic=False runs the dK/dV kernel that adds dQ (no dQ kernel); under
    torch.use_deterministic_algorithms(True) the split kernels run instead."""
    import codegen.launch_bwd as launch_bwd

    launched = []
    memo = launch_bwd.memo_kernel

    def spy(spec, interpret, kernel="fwd"):
        launched.append(kernel)
        return memo(spec, interpret, kernel)

    monkeypatch.setattr(launch_bwd, "memo_kernel", spy)
    args = small_inputs(seed=7, device=DEVICE)
    grad = torch.randn(args["q"].shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    backend = "triton" if CUDA else "interpret"
    qkv, rest = _split(args)

    def kernels(deterministic: bool) -> list[str]:
        launched.clear()
        out, _ = codegen.pbsa_attention(*qkv, **rest, backend=backend, deterministic=deterministic)
        torch.autograd.grad(out, qkv, grad)
        return launched[:]

    assert kernels(True) == ["bwd_delta", "bwd_dq", "bwd_dkdv"]
    assert kernels(False) == ["bwd_delta", "bwd_fused"]
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert kernels(False) == ["bwd_delta", "bwd_dq", "bwd_dkdv"]
    finally:
        torch.use_deterministic_algorithms(before)
    with pytest.raises(TypeError, match="deterministic"):
        codegen.pbsa_attention(*qkv, **rest, backend=backend, deterministic=1)
