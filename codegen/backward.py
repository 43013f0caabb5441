"""`pbsa_backward`: dQ, dK, dV of a PBSA call from its output and saved LSE.

STAND-IN: autograd through the torch backend (`codegen.torch_backend.pbsa_torch`) for every
backend, until the generated backward kernels land at this path with the same interface.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from codegen.problem import Problem
from codegen.torch_backend import pbsa_torch

BACKWARD_BACKENDS = ("triton", "interpret", "torch")


def pbsa_backward(
    p: Problem, out: Tensor, lse: Tensor, grad_out: Tensor, *, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``sum(out * grad_out)``: dq like p.q, dk/dv like p.k/p.v (paged pools
    or contiguous tensors, GQA heads summed into their kv head).

    out, lse: the forward's results (q's layout; [B, H, Lq]); grad_out: like out.
    """
    if backend not in BACKWARD_BACKENDS:
        raise ValueError(f"backend: expected one of {BACKWARD_BACKENDS}, got {backend!r}")
    # The stand-in recomputes the forward under autograd; out and lse are not needed.
    del out, lse

    # Inside a custom op autograd is dispatched past; torch.func brings its own.
    def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return pbsa_torch(dataclasses.replace(p, q=q, k=k, v=v), return_lse=False)[0]

    _, vjp = torch.func.vjp(forward, p.q, p.k, p.v)
    dq, dk, dv = vjp(grad_out)
    return dq, dk, dv
