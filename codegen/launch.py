"""Launching the generated kernel: the default config, strides, TMA descriptors, grid."""

from __future__ import annotations

import dataclasses

import torch
import triton
from torch import Tensor

from codegen.cache import get_kernel
from codegen.config import LaunchConfig, spec_for, supports_tma
from codegen.problem import Problem
from codegen.render import MERGE_ROWS, call_args
from codegen.spec import KernelSpec
from codegen.store import lookup

# Per-call host work is on the critical path of short kernels: kernels are memoised.
_kernels: dict[tuple[KernelSpec, bool, str], object] = {}


def memo_kernel(spec: KernelSpec, interpret: bool, kernel: str = "fwd"):
    """`get_kernel`, memoised per (spec, interpret, kernel)."""
    fn = _kernels.get((spec, interpret, kernel))
    if fn is None:
        fn = _kernels[spec, interpret, kernel] = get_kernel(
            spec, interpret=interpret, kernel=kernel
        )
    return fn


# Longest-first tile orders, keyed by the table tensor's identity and version. A stale entry
# (a new tensor at a recycled address) can only cost speed: any order of the same tiles is a
# correct one.
_schedules: dict[tuple, Tensor] = {}


def _schedule(p: Problem, block_m: int) -> Tensor:
    """int32 [B·H·num_m_tiles]: tile ids (bh·num_m_tiles + m) by descending page count."""
    nb = p.kv_num_blocks
    num_tiles = triton.cdiv(p.q_len, block_m)  # the order's length: part of its identity
    # Under CUDA-graph capture the order is part of the graph (recomputed at every replay):
    # a memoised tensor could be freed while the graph still reads it.
    capturing = nb.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (nb.data_ptr(), nb._version, tuple(nb.shape), block_m, num_tiles)
    order = None if capturing else _schedules.get(key)
    if order is None:
        tiles = torch.arange(num_tiles, device=nb.device)
        work = nb[:, :, (tiles * block_m) // p.q_block].reshape(-1)
        order = torch.argsort(work, descending=True).to(torch.int32)
        if not capturing:
            if len(_schedules) >= 16:
                _schedules.clear()
            _schedules[key] = order
    return order


def default_config(p: Problem, interpret: bool) -> LaunchConfig:
    """The persisted winner for the call's bucket, else a fixed config (the interpreter's
    is fixed: it times nothing)."""
    if interpret:
        return LaunchConfig(block_m=min(64, p.q_block), num_warps=4, num_stages=1)
    hit = lookup(p)
    if hit is not None:
        return hit
    if supports_tma(p.q.device) and p.head_dim <= 128 and p.q.element_size() == 2:
        # Untuned on Hopper: the H200 autotune winners of sf5s and paper65k at every density,
        # paged or not, since the strides are specialised (no spills at 128 rows): 128 rows,
        # 8 warps, 3 stages, whole-page TMA steps.
        return LaunchConfig(min(128, p.q_block), 8, 3, tma=True)
    return LaunchConfig(
        block_m=min(128, p.q_block), num_warps=8, num_stages=2, tma=supports_tma(p.q.device)
    )


def _kv_args(p: Problem, spec: KernelSpec) -> dict[str, object]:
    """The kernel's K, V and kv geometry arguments (see `codegen.render.kernel_args`)."""
    if spec.tma:
        return _kv_tma_args(p, spec)
    geometry = (*page_strides(p, p.k), *page_strides(p, p.v))
    names = (f"stride_{t}{d}" for t in "kv" for d in "bhpt")
    return dict(K=p.k, V=p.v, **dict(zip(names, geometry, strict=True)))


def page_strides(p: Problem, t: Tensor) -> tuple[int, int, int, int]:
    """(batch, kv head, page, token) strides of a K/V-shaped tensor `t` of the call."""
    if p.paged:
        return t.stride()[:4]
    # contiguous: page j of head g starts at token j·page
    tok, head = (1, 2) if p.layout == "BLHD" else (2, 1)
    return (t.stride(0), t.stride(head), p.page_size * t.stride(tok), t.stride(tok))


def bhl_strides(p: Problem, t: Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a q-shaped tensor `t` of the call."""
    sb, s1, s2, _ = t.stride()
    return (sb, s2, s1) if p.layout == "BLHD" else (sb, s1, s2)


def split_partials(p: Problem, splits: int) -> Tensor:
    """float32 partials of a split walk: q's layout with batch row b·splits + s for share s
    (the forward's out, the backward's dQ)."""
    return torch.empty((p.batch * splits, *p.q.shape[1:]), dtype=torch.float32, device=p.q.device)


def _kv_tma_args(p: Problem, spec: KernelSpec) -> dict[str, object]:
    """2-D descriptors over K and V, and (kv_row_b, kv_row_h, kv_col_h): page p of kv head g
    of batch b starts at row b·kv_row_b + g·kv_row_h + p·page, column g·kv_col_h."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    d, page = p.head_dim, p.page_size
    if p.paged:  # [B, Hkv, NP, page, D] -> [B·Hkv·NP·page, D]
        views = [t.view(-1, d) for t in (p.k, p.v)]
        rows = (p.kv_heads * p.num_pages * page, p.num_pages * page, 0)
    elif p.layout == "BLHD":  # [B, Lk, Hkv, D] -> [B·Lk, Hkv·D]
        views = [t.view(p.batch * p.kv_len, p.kv_heads * d) for t in (p.k, p.v)]
        rows = (p.kv_len, 0, d)
    else:  # [B, Hkv, Lk, D] -> [B·Hkv·Lk, D]
        views = [t.view(-1, d) for t in (p.k, p.v)]
        rows = (p.kv_heads * p.kv_len, p.kv_len, 0)
    k, v = (TensorDescriptor(t, list(t.shape), list(t.stride()), [spec.block_n, d]) for t in views)
    return dict(K=k, V=v, **dict(zip(("kv_row_b", "kv_row_h", "kv_col_h"), rows, strict=True)))


def aligned(t: Tensor) -> bool:
    """Unit stride on the head dim and every other stride a multiple of 16 elements."""
    return t.stride(-1) == 1 and all(s % 16 == 0 for s in t.stride()[:-1])


def pbsa_triton(
    p: Problem,
    *,
    return_lse: bool = True,
    interpret: bool = False,
    config: LaunchConfig | None = None,
    out: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the generated kernel. `out`/`lse` may be given (e.g. poisoned, by tests)."""
    if not interpret and not p.q.is_cuda:
        raise ValueError("backend='triton' needs CUDA tensors; use 'torch' or 'interpret'")
    config = config or default_config(p, interpret)
    if config.fused_dq:
        raise ValueError("config.fused_dq: a backward choice; the forward takes none")
    spec = spec_for(p, config, return_lse)
    kernel = memo_kernel(spec, interpret)

    # The kernel assumes 16-element-aligned strides (and TMA contiguous K/V): copy otherwise.
    q = p.q if aligned(p.q) else p.q.contiguous()
    k, v = (
        t if (t.is_contiguous() if spec.tma else aligned(t)) else t.contiguous() for t in (p.k, p.v)
    )
    if q is not p.q or k is not p.k or v is not p.v:
        p = dataclasses.replace(p, q=q, k=k, v=v)
    if out is None:
        out = torch.empty_like(p.q, memory_format=torch.contiguous_format)
    elif not aligned(out) or out.shape != p.q.shape:
        raise ValueError("out: expected q's shape with 16-element-aligned strides")
    if lse is None and return_lse:
        lse = torch.empty(p.batch, p.heads, p.q_len, dtype=torch.float32, device=p.q.device)

    m_tiles = triton.cdiv(p.q_len, spec.block_m)
    if m_tiles == 0 or p.batch * p.heads == 0:
        return out, lse
    num_blocks = p.kv_num_blocks.contiguous()
    values = dict(
        Q=p.q,
        Out=out,
        Lse=lse if return_lse else out,  # unused then
        NumBlocks=num_blocks,
        Indices=p.kv_indices.contiguous(),
        # Without page lengths or a schedule the kernel never reads these: any int32 tensor.
        PageLens=p.page_lens.contiguous() if p.page_lens is not None else num_blocks,
        Schedule=_schedule(p, spec.block_m) if spec.scheduled else num_blocks,
        num_heads=p.heads,
        q_len=p.q_len,
        kv_len=p.kv_len,
        num_pages=p.num_pages,
        num_q_blocks=p.num_q_blocks,
        max_blocks=p.max_blocks,
        num_m_tiles=m_tiles,
        qk_scale=p.scale,
    )
    values.update(zip(("stride_qb", "stride_qh", "stride_ql"), bhl_strides(p, p.q), strict=True))
    values.update(_kv_args(p, spec))
    grid = (m_tiles * p.batch * p.heads,) if spec.scheduled else (m_tiles, p.batch * p.heads)
    launch = {} if interpret else dict(num_warps=config.num_warps, num_stages=config.num_stages)
    splits = spec.kv_splits
    if splits == 1:
        values.update(
            zip(("stride_ob", "stride_oh", "stride_ol"), bhl_strides(p, out), strict=True)
        )
        kernel[grid](*call_args(spec, values), UPCAST=interpret, **launch)
        return out, (lse if return_lse else None)
    # Split walk: each share writes float32 partials as batch row b·splits + s (q's layout),
    # then one merge pass writes out (and the LSE).
    part = split_partials(p, splits)
    part_lse = torch.empty(
        p.batch * splits, p.heads, p.q_len, dtype=torch.float32, device=part.device
    )
    values.update(Out=part, Lse=part_lse)
    values.update(zip(("stride_ob", "stride_oh", "stride_ol"), bhl_strides(p, part), strict=True))
    kernel[(*grid, splits)](*call_args(spec, values), UPCAST=interpret, **launch)
    merge = dict(Part=part, PartLse=part_lse, Out=out, Lse=lse if return_lse else part_lse)
    merge.update(num_heads=p.heads, q_len=p.q_len)
    merge.update(zip(("stride_pb", "stride_ph", "stride_pl"), bhl_strides(p, part), strict=True))
    merge.update(zip(("stride_ob", "stride_oh", "stride_ol"), bhl_strides(p, out), strict=True))
    merger = memo_kernel(spec, interpret, "fwd_merge")
    merge_launch = {} if interpret else dict(num_warps=4, num_stages=1)
    merger[(triton.cdiv(p.q_len, MERGE_ROWS), p.batch * p.heads)](
        *call_args(spec, merge, "fwd_merge"), UPCAST=interpret, **merge_launch
    )
    return out, (lse if return_lse else None)
