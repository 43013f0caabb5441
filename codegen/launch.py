"""Launching the generated kernel: spec and config selection, strides, TMA descriptors, grid."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from codegen.cache import get_kernel
from codegen.problem import Problem
from codegen.spec import DTYPE_NAMES, KernelSpec


@dataclass(frozen=True)
class LaunchConfig:
    """Tuning choices that do not change the problem: tile height, warps, pipeline depth."""

    block_m: int = 128
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = False
    warp_specialize: bool = False
    scheduled: bool = False
    block_n: int | None = None  # keys per step; None: one page per step


@functools.lru_cache(maxsize=16)
def supports_tma(device: torch.device) -> bool:
    """TMA descriptors need a CUDA device of compute capability >= 9 (Hopper). Memoised:
    untuned calls ask on every launch, and the capability query is host work."""
    if device.type != "cuda":
        return False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def spec_for(p: Problem, config: LaunchConfig, return_lse: bool) -> KernelSpec:
    """The structure of `p` plus the config's structural choices."""
    return _spec(
        block_m=min(config.block_m, p.q_block),
        block_n=min(config.block_n or p.page_size, p.page_size),
        page_size=p.page_size,
        q_block=p.q_block,
        head_dim=p.head_dim,
        group=p.group,
        dtype=DTYPE_NAMES[p.q.dtype],
        layout=p.layout,
        paged=p.paged,
        # Decided by the call's form, never by values, so that lengths never recompile.
        partial=not p.paged or p.page_lens is not None,
        return_lse=return_lse,
        tma=config.tma,
        warp_specialize=config.warp_specialize,
        scheduled=config.scheduled,
    )


# Per-call host work is on the critical path of short kernels: specs and kernels are memoised.
_spec = functools.cache(KernelSpec)
_kernels: dict[tuple[KernelSpec, bool], object] = {}


def _kernel(spec: KernelSpec, interpret: bool):
    kernel = _kernels.get((spec, interpret))
    if kernel is None:
        kernel = _kernels[spec, interpret] = get_kernel(spec, interpret=interpret)
    return kernel


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
    if interpret:
        return LaunchConfig(block_m=min(64, p.q_block), num_warps=4, num_stages=1)
    from codegen.tuning import lookup

    return lookup(p) or LaunchConfig(
        block_m=min(128, p.q_block), num_warps=8, num_stages=2, tma=supports_tma(p.q.device)
    )


def _kv_tma_args(p: Problem, spec: KernelSpec) -> tuple[object, object, tuple[int, int, int]]:
    """2-D descriptors over K and V, and (row_b, row_h, col_h): page p of kv head g of batch b
    starts at row b·row_b + g·row_h + p·page, column g·col_h."""
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
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [spec.block_n, d]) for t in views]
    return descs[0], descs[1], rows


def _aligned(t: Tensor) -> bool:
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
    spec = spec_for(p, config, return_lse)
    kernel = _kernel(spec, interpret)

    # The kernel assumes 16-element-aligned strides (and TMA contiguous K/V): copy otherwise.
    q = p.q if _aligned(p.q) else p.q.contiguous()
    k, v = (
        t if (t.is_contiguous() if spec.tma else _aligned(t)) else t.contiguous()
        for t in (p.k, p.v)
    )
    if q is not p.q or k is not p.k or v is not p.v:
        p = dataclasses.replace(p, q=q, k=k, v=v)
    if out is None:
        out = torch.empty_like(p.q, memory_format=torch.contiguous_format)
    elif not _aligned(out) or out.shape != p.q.shape:
        raise ValueError("out: expected q's shape with 16-element-aligned strides")
    if lse is None and return_lse:
        lse = torch.empty(p.batch, p.heads, p.q_len, dtype=torch.float32, device=p.q.device)

    def bhl(t: Tensor) -> tuple[int, int, int]:
        sb, s1, s2, _ = t.stride()
        return (sb, s2, s1) if p.layout == "BLHD" else (sb, s1, s2)

    num_blocks = p.kv_num_blocks.contiguous()
    indices = p.kv_indices.contiguous()
    lens = p.page_lens.contiguous() if p.page_lens is not None else num_blocks  # unused then
    if spec.tma:
        k_arg, v_arg, kv_geom = _kv_tma_args(p, spec)
    else:
        k_arg, v_arg = k, v
        if p.paged:
            kv_geom = (*k.stride()[:4], *v.stride()[:4])
        else:  # contiguous: page j of head g starts at token j·page
            sk, sv = k.stride(), v.stride()
            tok = (1, 2) if p.layout == "BLHD" else (2, 1)  # (token dim, head dim)
            kv_geom = (
                sk[0],
                sk[tok[1]],
                p.page_size * sk[tok[0]],
                sk[tok[0]],
                sv[0],
                sv[tok[1]],
                p.page_size * sv[tok[0]],
                sv[tok[0]],
            )
    m_tiles = triton.cdiv(p.q_len, spec.block_m)
    if m_tiles == 0 or p.batch * p.heads == 0:
        return out, lse
    if spec.scheduled:
        schedule = _schedule(p, spec.block_m)
        grid = (m_tiles * p.batch * p.heads,)
    else:
        schedule, grid = num_blocks, (m_tiles, p.batch * p.heads)  # schedule unused then
    launch = {} if interpret else dict(num_warps=config.num_warps, num_stages=config.num_stages)
    kernel[grid](
        p.q,
        k_arg,
        v_arg,
        out,
        lse if return_lse else out,
        num_blocks,
        indices,
        lens,
        schedule,
        *bhl(p.q),
        *bhl(out),
        *kv_geom,
        p.heads,
        p.q_len,
        p.kv_len,
        p.num_pages,
        p.num_q_blocks,
        p.max_blocks,
        m_tiles,
        p.scale,
        UPCAST=interpret,
        **launch,
    )
    return out, (lse if return_lse else None)
