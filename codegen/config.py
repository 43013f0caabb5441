"""`LaunchConfig` (the tuning choices of one launch) and the `KernelSpec` a call runs with it."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from codegen.problem import Problem
from codegen.spec import DTYPE_NAMES, KernelSpec, check_kv_splits, is_pow2


@dataclass(frozen=True)
class LaunchConfig:
    """Tuning choices that do not change the problem: tile height, warps, pipeline depth.

    block_m: query rows per program, a power of two >= 16 (capped at the call's q_block).
    num_warps: a power of two in 1..32. num_stages: software-pipeline depth, >= 1.
    tma: Hopper tensor-descriptor loads. scheduled: longest-first tile order.
    warp_specialize: Triton's warp-specialised kv loop (with tma only).
    block_n: keys per step, a power of two >= 16 (capped at the page size); None: one page.
    kv_splits: programs per query tile, each over a share of its pages, merged after (1..8).
    fused_dq: the backward's dK/dV kernel only: its programs also add their shares of dQ by
        float atomics and no dQ kernel runs (five products per block, not seven; dQ is not
        deterministic). With whole-tile walks (kv_splits 1) and pointer loads.
    """

    block_m: int = 128
    num_warps: int = 8
    num_stages: int = 2
    tma: bool = False
    scheduled: bool = False
    block_n: int | None = None
    warp_specialize: bool = False
    kv_splits: int = 1
    fused_dq: bool = False

    def __post_init__(self) -> None:
        for name, value in (("block_m", self.block_m), ("block_n", self.block_n)):
            if value is None and name == "block_n":
                continue
            if not is_pow2(value) or value < 16:
                raise ValueError(
                    f"LaunchConfig.{name}: expected a power of two >= 16, got {value!r}"
                )
        if not is_pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(
                f"LaunchConfig.num_warps: expected a power of two in 1..32, got {self.num_warps!r}"
            )
        stages = self.num_stages
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"LaunchConfig.num_stages: expected an int >= 1, got {stages!r}")
        for name in ("tma", "scheduled", "warp_specialize", "fused_dq"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(
                    f"LaunchConfig.{name}: expected a bool, got {getattr(self, name)!r}"
                )
        if self.warp_specialize and not self.tma:
            raise ValueError("LaunchConfig.warp_specialize: needs tma=True")
        check_kv_splits(self.kv_splits, "LaunchConfig")
        if self.fused_dq and (self.kv_splits != 1 or self.tma):
            raise ValueError(
                "LaunchConfig.fused_dq: the dK/dV kernel owns its key tile (kv_splits 1) and "
                "loads with pointers (tma False)"
            )


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


# Per-call host work is on the critical path of short kernels: specs are memoised.
_spec = functools.cache(KernelSpec)


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
        scheduled=config.scheduled,
        warp_specialize=config.warp_specialize,
        kv_splits=config.kv_splits,
    )


def backward_spec_for(p: Problem, config: LaunchConfig) -> KernelSpec:
    """The spec of the backward kernels run with `config`: the call's structure, the
    config's tile (block_m query rows, block_n keys) and dQ shares, pointer loads in launch
    order."""
    plain = dataclasses.replace(config, tma=False, scheduled=False, warp_specialize=False)
    return spec_for(p, plain, return_lse=True)
