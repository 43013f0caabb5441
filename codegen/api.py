"""`pbsa_attention`: the one entry point; validates once and dispatches to a backend."""

from __future__ import annotations

import torch
from torch import Tensor

from codegen.autograd import pbsa_op, run_forward
from codegen.backward import check_deterministic
from codegen.problem import validate
from codegen.tuning import ensure_tuned

BACKENDS = ("auto", "triton", "interpret", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that `backend` names for tensors on `device` ("auto": triton on
    CUDA, torch elsewhere)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def pbsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    page_lens: Tensor | None = None,
    *,
    scale: float | None = None,
    layout: str = "BLHD",
    q_block: int = 128,
    return_lse: bool = True,
    backend: str = "auto",
    page_size: int | None = None,
    autotune: bool = False,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Persistent block-sparse attention over the pages listed in a block table.

    q: [B, Lq, H, D] ("BLHD") or [B, H, Lq, D] ("BHLD"), fp32/fp16/bf16.
    k, v: paged pools [B, Hkv, NP, page, D] with page_lens int32 [B, Hkv, NP] (None: all
        pages full), or contiguous tensors in q's layout ([B, Lk, Hkv, D] / [B, Hkv, Lk, D])
        cut into pages of `page_size` tokens (default: q_block), the last one partial.
    kv_num_blocks: int32 [B, H, ceil(Lq / q_block)]; kv_indices: int32 [B, H, Mq, Kmax]
        (first kv_num_blocks entries valid, ascending, duplicate-free; the rest never read).
    Returns out (q's shape, layout and dtype) and lse (float32 [B, H, Lq], natural log, -inf
    with out 0 for rows that see nothing) or None when return_lse is False.
    backend: "triton" (CUDA), "interpret" (the same kernel under TRITON_INTERPRET=1),
    "torch" (gather-based; also float64), "auto" (triton on CUDA, torch elsewhere).
    autotune: on the triton backend, the first call of a shape bucket with no stored winner
    times the candidate configs (`codegen.autotune`) and stores the fastest; later calls of
    the bucket (and processes) run it. Skipped under CUDA-graph capture and compilation.

    Differentiable in q, k and v (``torch.ops.sparse_forcing.pbsa``; the backward runs
    `codegen.backward.pbsa_backward` on the same backend from the saved LSE); lse carries
    no gradient. The torch backend under autograd is the reference of the backward.
    deterministic: the triton backward gives the same bits on every run; False lets it add
    dQ by float atomics from the dK/dV kernel (faster, as FlashAttention's default), unless
    `torch.use_deterministic_algorithms(True)` is set.
    """
    check_deterministic(deterministic)
    backend = resolve_backend(backend, q.device if isinstance(q, Tensor) else torch.device("cpu"))
    p = validate(
        q,
        k,
        v,
        kv_num_blocks,
        kv_indices,
        page_lens,
        scale=scale,
        layout=layout,
        q_block=q_block,
        page_size=page_size,
    )
    if q.dtype == torch.float64 and backend != "torch":
        raise TypeError(f"q: float64 runs on backend='torch' only, not {backend!r}")
    if not isinstance(autotune, bool):
        raise TypeError(f"autotune: expected a bool, got {type(autotune).__name__}")
    if autotune and backend == "triton" and not torch.compiler.is_compiling():
        ensure_tuned(p, return_lse)
    # The op costs a dispatch per call: take it only where autograd or a compiler needs it.
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        out, lse = pbsa_op(
            q, k, v, kv_num_blocks, kv_indices, page_lens,
            p.scale, layout, q_block, p.page_size, backend, deterministic,
        )  # fmt: skip
        return out, (lse if return_lse else None)
    return run_forward(p, backend, return_lse)
