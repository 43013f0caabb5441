"""Validation and canonical views of a PBSA call's arguments, shared by every backend.

Shapes (see docs/ARCHITECTURE.md, "The kernel"):
    q            [B, Lq, H, D] (BLHD) or [B, H, Lq, D] (BHLD)
    k, v         paged: [B, Hkv, NP, page, D]; contiguous: q's layout with Lk rows and Hkv heads
    kv_num_blocks int32 [B, H, Mq] with Mq = ceil(Lq / q_block)
    kv_indices    int32 [B, H, Mq, Kmax]
    page_lens     int32 [B, Hkv, NP] (paged only; None means every page is full)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("BLHD", "BHLD")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is for the torch backend only: gradcheck of the autograd reference needs it.
TORCH_DTYPES = (*DTYPES, torch.float64)


@dataclass(frozen=True)
class Problem:
    """A validated call. Tensors are views of the caller's tensors (never copies).

    q_bhld: [B, H, Lq, D] view of q. For contiguous K/V, k_bhld/v_bhld are [B, Hkv, Lk, D]
    views; for paged K/V, k/v are the [B, Hkv, NP, page, D] pools.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    kv_num_blocks: Tensor
    kv_indices: Tensor
    page_lens: Tensor | None
    layout: str
    paged: bool
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int  # contiguous: Lk; paged: NP * page
    num_pages: int
    head_dim: int
    page_size: int
    q_block: int
    scale: float

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[2]

    @property
    def max_blocks(self) -> int:
        return self.kv_indices.shape[3]

    def q_bhld(self) -> Tensor:
        return self.q if self.layout == "BHLD" else self.q.transpose(1, 2)

    def kv_bhld(self, t: Tensor) -> Tensor:
        """Contiguous mode only: [B, Hkv, Lk, D] view of k or v."""
        return t if self.layout == "BHLD" else t.transpose(1, 2)

    def paged_kv(self) -> tuple[Tensor, Tensor, Tensor]:
        """(k, v, page_lens) as pools [B, Hkv, NP, page, D] and int32 [B, Hkv, NP].

        Contiguous K/V are zero-padded to NP·page rows (a copy); paged pools are returned as-is.
        """
        if self.paged:
            lens = self.page_lens
            if lens is None:
                lens = torch.full(
                    (self.batch, self.kv_heads, self.num_pages),
                    self.page_size,
                    dtype=torch.int32,
                    device=self.q.device,
                )
            return self.k, self.v, lens
        pad = self.num_pages * self.page_size - self.kv_len
        pools = []
        for t in (self.k, self.v):
            t = torch.nn.functional.pad(self.kv_bhld(t), (0, 0, 0, pad))
            pools.append(t.reshape(self.batch, self.kv_heads, self.num_pages, self.page_size, -1))
        starts = torch.arange(self.num_pages, device=self.q.device) * self.page_size
        lens = (self.kv_len - starts).clamp(0, self.page_size).to(torch.int32)
        lens = lens.expand(self.batch, self.kv_heads, self.num_pages)
        return pools[0], pools[1], lens


def _shape_error(name: str, expected: str, got: Tensor) -> ValueError:
    return ValueError(f"{name}: expected shape {expected}, got {tuple(got.shape)}")


def validate(
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
    page_size: int | None = None,
) -> Problem:
    """Check shapes, dtypes, devices and the scale (no device sync) and return the canonical
    Problem. Takes `codegen.pbsa_attention`'s arguments (less backend and return_lse), with
    the same defaults, so that every entry point that takes them forwards them here."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in TORCH_DTYPES:
        raise TypeError(
            f"q: expected dtype float32/float16/bfloat16 (or float64, torch backend), got {q.dtype}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (q's), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {t.device}")
    if q.dim() != 4:
        raise _shape_error("q", f"4-D {layout}", q)
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if isinstance(q_block, bool) or not isinstance(q_block, int) or q_block <= 0:
        raise ValueError(f"q_block: expected a positive int, got {q_block!r}")

    if layout == "BLHD":
        batch, q_len, heads, head_dim = q.shape
    else:
        batch, heads, q_len, head_dim = q.shape

    paged = k.dim() == 5
    if paged:
        _, kv_heads, num_pages, pool_page, _ = k.shape
        if k.shape[0] != batch or k.shape[4] != head_dim:
            raise _shape_error("k", f"[{batch}, Hkv, NP, page, {head_dim}] (paged)", k)
        if page_size is not None and page_size != pool_page:
            raise ValueError(f"page_size: {page_size} disagrees with the pool's page {pool_page}")
        page_size = pool_page
        kv_len = num_pages * page_size
        if page_lens is not None:
            if not isinstance(page_lens, Tensor) or page_lens.dtype != torch.int32:
                raise TypeError("page_lens: expected an int32 tensor")
            if tuple(page_lens.shape) != (batch, kv_heads, num_pages):
                raise _shape_error("page_lens", f"[{batch}, {kv_heads}, {num_pages}]", page_lens)
            if page_lens.device != q.device:
                raise ValueError(f"page_lens: expected device {q.device}, got {page_lens.device}")
    elif k.dim() == 4:
        if page_lens is not None:
            raise ValueError("page_lens: only for paged K/V (5-D pools); got contiguous K/V")
        if layout == "BLHD":
            kb, kv_len, kv_heads, kd = k.shape
        else:
            kb, kv_heads, kv_len, kd = k.shape
        if kb != batch or kd != head_dim:
            raise _shape_error("k", f"{layout} with B={batch}, D={head_dim} (contiguous)", k)
        page_size = q_block if page_size is None else page_size
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
            raise ValueError(f"page_size: expected a positive int, got {page_size!r}")
        num_pages = math.ceil(kv_len / page_size)
    else:
        raise _shape_error("k", "5-D paged pool or 4-D contiguous tensor", k)

    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"k: kv heads ({kv_heads}) must divide query heads ({heads})")
    num_q_blocks = math.ceil(q_len / q_block)
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{name}: expected an int32 tensor")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (q's), got {t.device}")
    if tuple(kv_num_blocks.shape) != (batch, heads, num_q_blocks):
        raise _shape_error("kv_num_blocks", f"[{batch}, {heads}, {num_q_blocks}]", kv_num_blocks)
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (batch, heads, num_q_blocks):
        raise _shape_error("kv_indices", f"[{batch}, {heads}, {num_q_blocks}, Kmax]", kv_indices)

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale > 0):
        # The kernels take the row max of the raw logits as the max of the scaled ones: a
        # scale <= 0 would return zeros with LSE -inf instead of an error.
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    return Problem(
        q=q,
        k=k,
        v=v,
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        page_lens=page_lens,
        layout=layout,
        paged=paged,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        num_pages=num_pages,
        head_dim=head_dim,
        page_size=page_size,
        q_block=q_block,
        scale=float(scale),
    )


def check_table_values(p: Problem) -> None:
    """Value checks that need a device sync (used by the torch backend and the oracle)."""
    counts = p.kv_num_blocks
    if counts.numel() and (counts.min() < 0 or counts.max() > p.max_blocks):
        raise ValueError(f"kv_num_blocks: values must lie in [0, Kmax={p.max_blocks}]")
    slots = torch.arange(p.max_blocks, device=counts.device)
    listed = slots < counts.unsqueeze(-1)
    used = p.kv_indices[listed]
    if used.numel() and (used.min() < 0 or used.max() >= p.num_pages):
        raise ValueError(f"kv_indices: listed page ids must lie in [0, NP={p.num_pages})")
    lens = p.page_lens
    if lens is not None and lens.numel() and (lens.min() < 0 or lens.max() > p.page_size):
        raise ValueError(f"page_lens: values must lie in [0, page_size={p.page_size}]")
