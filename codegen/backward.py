"""`pbsa_backward`: gradients of `pbsa_attention` from its output and saved LSE."""

from __future__ import annotations

import torch
from torch import Tensor

from codegen.problem import Problem

BACKWARD_BACKENDS = ("triton", "interpret", "torch")


def check_deterministic(value: object) -> bool:
    """``value`` if it is a bool (the backward's ``deterministic`` option), else a TypeError:
    a None or 0 must not quietly turn the non-deterministic kernel on."""
    if not isinstance(value, bool):
        raise TypeError(f"deterministic: expected a bool, got {type(value).__name__}")
    return value


def pbsa_backward(
    p: Problem,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    *,
    backend: str,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of sum(out · grad_out) for the validated call `p`.

    out: the forward's output (q's shape and dtype); lse: float32 [B, H, Lq], natural log,
    -inf for rows that see nothing (their gradients are 0); grad_out: q's shape and dtype.
    dq has q's shape, layout and dtype; dk and dv have k's and v's (paged pools or
    contiguous tensors in q's layout); entries past a page's length and pages never listed
    get 0. backend: "triton" (generated kernels, CUDA), "interpret" (the same kernels under
    TRITON_INTERPRET=1), "torch" (gather-based; its scatter-adds are not deterministic on
    CUDA, whatever `deterministic` says). deterministic: the generated kernels' gradients are
    the same bits on every run; False lets them add dQ by float atomics from the dK/dV
    kernel (five matrix products per block instead of seven), unless
    `torch.use_deterministic_algorithms(True)` is set.
    """
    check_deterministic(deterministic)
    if backend not in BACKWARD_BACKENDS:
        raise ValueError(f"backend: expected one of {BACKWARD_BACKENDS}, got {backend!r}")
    for name, t in (("out", out), ("grad_out", grad_out)):
        if not isinstance(t, Tensor) or t.shape != p.q.shape or t.dtype != p.q.dtype:
            raise ValueError(
                f"{name}: expected a tensor of q's shape {tuple(p.q.shape)} and dtype "
                f"{p.q.dtype}, got {_describe(t)}"
            )
    expected = (p.batch, p.heads, p.q_len)
    # float64 problems (torch backend only, for gradcheck) carry a float64 lse.
    lse_dtype = torch.float64 if p.q.dtype == torch.float64 else torch.float32
    if not isinstance(lse, Tensor) or tuple(lse.shape) != expected or lse.dtype != lse_dtype:
        raise ValueError(
            f"lse: expected a {lse_dtype} tensor of shape {expected}, got {_describe(lse)}"
        )
    for name, t in (("out", out), ("lse", lse), ("grad_out", grad_out)):
        if t.device != p.q.device:
            raise ValueError(f"{name}: expected device {p.q.device} (q's), got {t.device}")
    if backend == "torch":
        from codegen.torch_backend import pbsa_torch_backward

        return pbsa_torch_backward(p, out, lse, grad_out)
    from codegen.launch_bwd import pbsa_backward_triton

    return pbsa_backward_triton(
        p, out, lse, grad_out, interpret=backend == "interpret", deterministic=deterministic
    )


def _describe(t: object) -> str:
    if isinstance(t, Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}"
    return type(t).__name__
