"""PBSA as differentiable torch ops: ``torch.ops.sparse_forcing.pbsa`` and its backward.

``pbsa`` returns (out, lse) and always saves the LSE (the backward kernels need it, whatever
the caller asked for); its autograd formula calls ``sparse_forcing::pbsa_backward``, an op
of its own so that ``torch.compile`` traces both through their fake implementations and
never into a kernel launch. Block tables and page lengths are integer inputs without
gradients; the LSE output is marked non-differentiable (the backward takes dOut only).

Callers go through `codegen.pbsa_attention`, which validates the arguments once; the ops
re-derive the `Problem` from them with `validate`, which reads shapes only (no device sync).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from codegen.backward import pbsa_backward
from codegen.problem import Problem, validate


def run_forward(p: Problem, backend: str, return_lse: bool) -> tuple[Tensor, Tensor | None]:
    """The forward of a validated problem on a concrete backend (not "auto")."""
    if backend == "torch":
        from codegen.torch_backend import pbsa_torch

        return pbsa_torch(p, return_lse=return_lse)
    from codegen.launch import pbsa_triton

    return pbsa_triton(p, return_lse=return_lse, interpret=backend == "interpret")


def _problem(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    page_lens: Tensor | None, scale: float, layout: str, q_block: int, page_size: int,
) -> Problem:  # fmt: skip
    return validate(
        q, k, v, kv_num_blocks, kv_indices, page_lens,
        scale=scale, layout=layout, q_block=q_block, page_size=page_size,
    )  # fmt: skip


def _lse_shape(q: Tensor, layout: str) -> tuple[int, int, int]:
    b, x, y, _ = q.shape
    return (b, y, x) if layout == "BLHD" else (b, x, y)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("sparse_forcing::pbsa", mutates_args=())
def pbsa_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    page_lens: Tensor | None, scale: float, layout: str, q_block: int, page_size: int,
    backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(out, lse) of `codegen.pbsa_attention` (already validated arguments, concrete
    backend); out is contiguous in q's shape. `deterministic` is the backward's."""
    p = _problem(q, k, v, kv_num_blocks, kv_indices, page_lens, scale, layout, q_block, page_size)
    out, lse = run_forward(p, backend, return_lse=True)
    return out.contiguous(), lse


@pbsa_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, page_lens, scale, layout, q_block, page_size, *rest):
    lse = q.new_empty(_lse_shape(q, layout), dtype=_lse_dtype(q))
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse


@torch.library.custom_op("sparse_forcing::pbsa_backward", mutates_args=())
def pbsa_backward_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
    page_lens: Tensor | None, out: Tensor, lse: Tensor, grad_out: Tensor, scale: float,
    layout: str, q_block: int, page_size: int, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv), contiguous, shaped like q, k, v: `codegen.backward.pbsa_backward`."""
    p = _problem(q, k, v, kv_num_blocks, kv_indices, page_lens, scale, layout, q_block, page_size)
    grads = pbsa_backward(p, out, lse, grad_out, backend=backend, deterministic=deterministic)
    return tuple(g.contiguous() for g in grads)


@pbsa_backward_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, page_lens, out, lse, grad_out, *rest):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, kv_num_blocks, kv_indices, page_lens, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, kv_num_blocks, kv_indices, page_lens, out, lse)
    ctx.options = options  # scale, layout, q_block, page_size, backend, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple:
    q, k, v, kv_num_blocks, kv_indices, page_lens, out, lse = ctx.saved_tensors
    dq, dk, dv = pbsa_backward_op(
        q, k, v, kv_num_blocks, kv_indices, page_lens, out, lse, grad_out, *ctx.options
    )
    return dq, dk, dv, *([None] * (3 + len(ctx.options)))


pbsa_op.register_autograd(_backward, setup_context=_setup_context)
