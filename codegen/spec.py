"""`KernelSpec`: the structure a generated PBSA kernel is specialised on, and nothing else.

Sequence lengths, page counts, strides and table contents are runtime arguments, so a growing
cache or a new block table reuses the compiled kernel. Tuning knobs that live outside the
source (num_warps, num_stages) are launch options and are not part of the spec.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


HEAD_DIMS = tuple(2**i for i in range(4, 9))  # the head dims the kernels take: 16 … 256


def is_pow2(x: object) -> bool:
    """x is a positive power-of-two int (bools excluded)."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


MAX_KV_SPLITS = 8


def check_kv_splits(value: object, owner: str) -> None:
    """ValueError unless ``value`` is an int in 1..MAX_KV_SPLITS (``owner`` names the field)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KV_SPLITS:
        raise ValueError(f"{owner}.kv_splits: expected an int in 1..{MAX_KV_SPLITS}, got {value!r}")


@dataclass(frozen=True)
class KernelSpec:
    """Structural parameters of one generated kernel.

    block_m: query rows per program; divides q_block.
    block_n: keys per inner step; divides page_size (a page takes page_size // block_n steps).
    page_size: tokens per kv page.
    q_block: query rows per block-table row (the q tile m reads row m·block_m // q_block).
    head_dim: D, a power of two in 16…256.
    group: query heads per kv head (H // Hkv).
    dtype: "float32" | "float16" | "bfloat16".
    layout: q (and contiguous K/V) layout, "BLHD" | "BHLD".
    paged: K/V are page pools [B, Hkv, NP, page, D] (else contiguous in q's layout).
    partial: some pages may hold fewer than block_n valid tokens (masking is generated).
    return_lse: the kernel writes the log-sum-exp.
    tma: load tiles with Hopper tensor descriptors (TMA) instead of pointer loads.
    scheduled: programs take their tile from a launcher-made longest-first schedule.
    warp_specialize: the kv loop is a ``tl.range(..., warp_specialize=True)``: Triton splits
        it into producer warps (the TMA loads) and consumer warps (the products and the
        softmax), which overlap. Needs tma.
    kv_splits: programs per query tile (1..8). Split s walks the s-th contiguous share of
        the tile's steps and writes a float32 partial (out, LSE); the module's `fwd_merge`
        kernel combines the shares. More, shorter programs fill the SMs that the last wave
        of whole tiles leaves idle (444 tiles of the 1.3B model's chunk on 132 SMs: 3.4
        waves, the fourth a third full).
    """

    block_m: int = 128
    block_n: int = 128
    page_size: int = 128
    q_block: int = 128
    head_dim: int = 128
    group: int = 1
    dtype: str = "bfloat16"
    layout: str = "BLHD"
    paged: bool = True
    partial: bool = True
    return_lse: bool = True
    tma: bool = False
    scheduled: bool = False
    warp_specialize: bool = False
    kv_splits: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "page_size", "q_block"):
            value = getattr(self, name)
            if not is_pow2(value) or value < 16:
                raise ValueError(f"KernelSpec.{name}: expected a power of two >= 16, got {value!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(
                f"KernelSpec.head_dim: expected one of {HEAD_DIMS}, got {self.head_dim!r}"
            )
        if self.page_size % self.block_n:
            raise ValueError(
                f"KernelSpec.block_n: {self.block_n} must divide page_size={self.page_size}"
            )
        if self.q_block % self.block_m:
            raise ValueError(
                f"KernelSpec.block_m: {self.block_m} must divide q_block={self.q_block}"
            )
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"KernelSpec.group: expected a positive int, got {self.group!r}")
        if self.dtype not in DTYPE_NAMES.values():
            raise ValueError(
                f"KernelSpec.dtype: expected one of {sorted(DTYPE_NAMES.values())}, "
                f"got {self.dtype!r}"
            )
        if self.layout not in ("BLHD", "BHLD"):
            raise ValueError(f"KernelSpec.layout: expected 'BLHD' or 'BHLD', got {self.layout!r}")
        for name in ("paged", "partial", "return_lse", "tma", "scheduled", "warp_specialize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelSpec.{name}: expected a bool")
        if self.warp_specialize and not self.tma:
            raise ValueError("KernelSpec.warp_specialize: needs tma=True (TMA loads)")
        check_kv_splits(self.kv_splits, "KernelSpec")

    @property
    def name(self) -> str:
        """A readable, unique identifier (also the generated kernel's function name)."""
        flags = "".join(
            tag
            for tag, on in (
                ("p", self.paged),
                ("r", self.partial),
                ("l", self.return_lse),
                ("t", self.tma),
                ("s", self.scheduled),
                ("w", self.warp_specialize),
            )
            if on
        )
        return (
            f"pbsa_m{self.block_m}_n{self.block_n}_p{self.page_size}_qb{self.q_block}"
            f"_d{self.head_dim}"
            f"_g{self.group}_{self.dtype}_{self.layout.lower()}_{flags or 'x'}"
            + (f"_k{self.kv_splits}" if self.kv_splits > 1 else "")
        )

    def key(self) -> str:
        """Stable JSON of the fields (for hashing and for the autotuner's records)."""
        return json.dumps(asdict(self), sort_keys=True)

    def digest(self, *extra: str) -> str:
        """Short hash of the spec together with extra strings (template text, versions)."""
        h = hashlib.sha256(self.key().encode())
        for e in extra:
            h.update(b"\0" + e.encode())
        return h.hexdigest()[:20]
