"""Launching the generated backward kernels: configs, the transposed table, strides, grids.

Three launches per call: delta = rowsum(dO·O) per query row, dQ (one program per query tile,
walking its table row) and dK/dV (one program per key tile of a page, walking the pairs of
the transposed table). dQ and dK/dV are tuned separately (`codegen.tuning.autotune_backward`).
A dK/dV config with `fused_dq` replaces the last two by one kernel whose dK/dV programs also
add their dQ shares, by float atomics (five products per block instead of seven; dQ is then
not deterministic). It runs when asked for: by an explicit `configs`, or by
`deterministic=False` (`pbsa_attention`'s option) outside
`torch.use_deterministic_algorithms(True)`; the deterministic default never picks it.
On CUDA, dQ runs on a side stream beside dK/dV: neither reads what the other writes, and
each one's last wave leaves SMs idle that the other's programs can fill (flex gets the same
overlap from one launch of both).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
from torch import Tensor

from codegen.config import LaunchConfig, backward_spec_for
from codegen.launch import aligned, bhl_strides, memo_kernel, page_strides, split_partials
from codegen.problem import Problem
from codegen.render import call_args, kernel_args
from codegen.store import lookup
from codegen.transpose import TransposedTable, transpose_table

# Transposed tables keyed by the table tensors' addresses, strides and versions (one build
# per mask: a forward's table is reused by its backward, and often by several layers). Each
# entry keeps its table tensors alive, so no other tensor can take their addresses while the
# entry exists, and an in-place change bumps the version: a hit is always the same table.
_tables: dict[tuple, tuple[Tensor, Tensor, TransposedTable]] = {}


def transposed(p: Problem) -> TransposedTable:
    """The call's transposed table, memoised per table (except under CUDA-graph capture,
    where it is part of the graph: a memoised tensor could be freed while the graph reads
    it)."""
    nb, idx = p.kv_num_blocks, p.kv_indices
    capturing = nb.is_cuda and torch.cuda.is_current_stream_capturing()
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in (nb, idx))
    key += (p.kv_heads, p.num_pages)
    hit = None if capturing else _tables.get(key)
    if hit is not None:
        return hit[2]
    table = transpose_table(nb, idx, kv_heads=p.kv_heads, num_pages=p.num_pages)
    if not capturing:
        if len(_tables) >= 16:
            _tables.clear()
        _tables[key] = (nb, idx, table)
    return table


_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per CUDA device for the dQ launch (reused: a stream per call would
    grow a capture's graph and the driver's stream count)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def default_backward_configs(
    p: Problem, interpret: bool, deterministic: bool = True
) -> tuple[LaunchConfig, LaunchConfig]:
    """(dQ config, dK/dV config): the persisted winners for the call's bucket, else fixed
    ones (the interpreter's are fixed: it times nothing). With ``deterministic`` False (and
    `torch.use_deterministic_algorithms` off) the dK/dV config is the one that adds dQ too
    (`LaunchConfig.fused_dq`: dQ by float atomics), whose winner has a record of its own."""
    fused = not deterministic and not torch.are_deterministic_algorithms_enabled()
    if interpret:
        tile = LaunchConfig(block_m=min(64, p.q_block), num_warps=4, num_stages=1)
        return tile, dataclasses.replace(tile, fused_dq=fused)
    # Untuned. head_dim <= 128: the fastest of `bench.bwd_kernel --sweep` on an H200 with
    # pipelined loads (dQ 128 rows × 64 keys, 8 warps, 3 stages: 1.28× faster than 128 × 32
    # with 4 warps; dK/dV 128 keys × 64 rows, 8 warps, 2 stages: 1.15× faster than 32 rows).
    # head_dim 256 (not swept): half-size tiles that keep the doubled fp32 accumulators in
    # registers.
    if p.head_dim > 128:
        dq_default = LaunchConfig(min(64, p.q_block), 8, 2, block_n=32)
        dkdv_default = LaunchConfig(min(32, p.q_block), 4, 2, block_n=32)
    else:
        dq_default = LaunchConfig(min(128, p.q_block), 8, 3, block_n=min(64, p.page_size))
        dkdv_default = LaunchConfig(min(64, p.q_block), 8, 2, block_n=min(128, p.page_size))
    dq = lookup(p, "bwd_dq") or dq_default
    if fused:
        # Untuned: dK/dV's tile, which the added dQ product still fits (triton 3.6, sm_90a:
        # 255 registers and no spills at head_dim 128, 92 bytes of spills at 256).
        return dq, lookup(p, "bwd_fused") or dataclasses.replace(dkdv_default, fused_dq=True)
    dkdv = lookup(p, "bwd_dkdv") or dkdv_default
    return dq, dkdv


def _output(given: Tensor | None, like: Tensor, name: str) -> Tensor:
    if given is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if given.shape != like.shape or given.dtype != like.dtype or not aligned(given):
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape)}, dtype {like.dtype} and "
            "16-element-aligned strides"
        )
    return given


def pbsa_backward_triton(
    p: Problem,
    out: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    *,
    interpret: bool = False,
    configs: tuple[LaunchConfig, LaunchConfig] | None = None,
    deterministic: bool = True,
    dq: Tensor | None = None,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the generated kernels. `configs`: (dQ, dK/dV) launch configs
    (default: `default_backward_configs` with `deterministic`). dq/dk/dv may be given (e.g.
    poisoned, by tests): every element is written."""
    if not interpret and not p.q.is_cuda:
        raise ValueError("backend='triton' needs CUDA tensors; use 'torch' or 'interpret'")
    dq_config, dkdv_config = configs or default_backward_configs(p, interpret, deterministic)
    if dq_config.fused_dq:
        raise ValueError("configs[0]: fused_dq is a choice of the dK/dV kernel (configs[1])")
    if dkdv_config.fused_dq and torch.are_deterministic_algorithms_enabled():
        raise RuntimeError(
            "configs[1].fused_dq adds dQ by float atomics, which is not deterministic, and "
            "torch.use_deterministic_algorithms(True) is set: use a config without fused_dq"
        )
    if dkdv_config.kv_splits != 1:
        raise ValueError(
            f"configs[1]: the dK/dV kernel owns its key tile and takes no kv_splits, "
            f"got {dkdv_config.kv_splits}"
        )
    dq_spec = backward_spec_for(p, dq_config)
    dkdv_spec = backward_spec_for(p, dkdv_config)

    # The kernels assume 16-element-aligned strides: copy otherwise.
    q, k, v, out, grad_out = (
        t if aligned(t) else t.contiguous() for t in (p.q, p.k, p.v, out, grad_out)
    )
    if q is not p.q or k is not p.k or v is not p.v:
        p = dataclasses.replace(p, q=q, k=k, v=v)
    dq = _output(dq, p.q, "dq")
    dk = _output(dk, p.k, "dk")
    dv = _output(dv, p.v, "dv")
    if p.batch * p.heads == 0 or p.q_len == 0:
        return dq, dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)

    def options(config: LaunchConfig) -> dict:
        return {} if interpret else dict(num_warps=config.num_warps, num_stages=config.num_stages)

    qo = dict(num_heads=p.heads, q_len=p.q_len)
    strides = {
        f"stride_{t}{d}": s
        for t, x in (("q", p.q), ("do", grad_out), ("o", out), ("dq", dq))
        for d, s in zip("bhl", bhl_strides(p, x), strict=True)
    }
    kv = dict(K=p.k, V=p.v)
    for t, x in (("k", p.k), ("v", p.v), ("dk", dk), ("dv", dv)):
        kv.update(zip((f"stride_{t}{d}" for d in "bhpt"), page_strides(p, x), strict=True))
    page_lens = p.page_lens.contiguous() if p.page_lens is not None else p.kv_num_blocks
    common = dict(
        Q=p.q,
        DOut=grad_out,
        Lse=lse,
        Delta=delta,
        PageLens=page_lens,  # read only when pages may be partial
        kv_len=p.kv_len,
        num_pages=p.num_pages,
        num_q_blocks=p.num_q_blocks,
        qk_scale=p.scale,
        **qo,
        **kv,
    )

    def run(spec, config, kernel: str, grid: tuple[int, ...], values: dict) -> None:
        fn = memo_kernel(spec, interpret, kernel)
        picked = {a.name: values[a.name] for a in kernel_args(spec, kernel)}
        fn[grid](*call_args(spec, picked, kernel), UPCAST=interpret, **options(config))

    rows = triton.cdiv(p.q_len, dq_spec.block_m)
    values = dict(common, **strides, Out=out, DQ=dq)
    run(dq_spec, dq_config, "bwd_delta", (rows, p.batch * p.heads), values)
    values.update(
        NumBlocks=p.kv_num_blocks.contiguous(),
        Indices=p.kv_indices.contiguous(),
        max_blocks=p.max_blocks,
    )
    tiles = p.num_pages * (p.page_size // dkdv_spec.block_n)
    grid = (tiles, p.batch * p.kv_heads)
    if dkdv_config.fused_dq:
        # dQ gathers in float32 (the kernel applies the scale), then takes q's dtype and layout
        acc = torch.zeros(p.batch * p.heads, p.q_len, p.head_dim, device=p.q.device)
        table = transposed(p)
        values.update(DK=dk, DV=dv, DQAcc=acc, Offsets=table.offsets, Entries=table.entries)
        if tiles:
            run(dkdv_spec, dkdv_config, "bwd_fused", grid, values)
        acc = acc.view(p.batch, p.heads, p.q_len, p.head_dim)
        dq.copy_(acc if p.layout == "BHLD" else acc.transpose(1, 2))
        return dq, dk, dv
    splits = dq_spec.kv_splits
    # Shares write float32 partials as batch row b·splits + s (q's layout); their sum over
    # s, in a fixed order, is dQ. Allocated here, on the caller's stream, which frees it only
    # after waiting for the side stream.
    part = split_partials(p, splits) if splits > 1 else None
    side = None
    if not interpret:
        main = torch.cuda.current_stream(p.q.device)
        side = _side_stream(p.q.device)
        side.wait_stream(main)  # delta, and whatever produced q/k/v/dO
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        if part is None:
            run(dq_spec, dq_config, "bwd_dq", (rows, p.batch * p.heads), values)
        else:
            shares = dict(values, DQ=part)
            dq_strides = bhl_strides(p, part)
            shares.update(zip(("stride_dqb", "stride_dqh", "stride_dql"), dq_strides, strict=True))
            run(dq_spec, dq_config, "bwd_dq", (rows, p.batch * p.heads, splits), shares)
            dq.copy_(part.unflatten(0, (p.batch, splits)).sum(1))
    table = transposed(p)
    values.update(DK=dk, DV=dv, Offsets=table.offsets, Entries=table.entries)
    if tiles:
        run(dkdv_spec, dkdv_config, "bwd_dkdv", grid, values)
    if side is not None:
        main.wait_stream(side)
    return dq, dk, dv
