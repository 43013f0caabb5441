"""A chunk's keys and values written into the pool's scratch pages by one Triton kernel.

Every pass of every layer writes the chunk's K and V (BLHD ``[B, F·T, Hkv, D]``) into the
scratch pages (``[B, Hkv, pages, page, D]``: frame f's tokens fill pages ``f·ppf …``, the last
one partly) and, for patterns that score pages, pools each page's mean key into the key reps.
The torch path (`PagePool.write_scratch`) is the reference: two strided copies, a float32
conversion, a block sum and a third copy, five launches whose transposing copies run far from
the card's bandwidth. Here one program per (scratch page, batch, kv head) copies the page's
rows of K and V and sums its keys on the way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from codegen.spec import is_pow2
from patterns import VideoGeometry

__all__ = ["write_scratch_pages", "write_scratch_supported"]

# Elements of K (and of V) a program moves per step: 64 rows of a 128-wide head.
STEP_ELEMS = 8192


@triton.jit
def _write_scratch_kernel(
    K, V, KPool, VPool, Reps,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_pb, stride_ph, stride_pp, stride_pt, stride_rb, stride_rh, stride_rp,
    num_kv_heads, tokens_per_frame, pages_per_frame,
    PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, WRITE_REPS: tl.constexpr,
):  # fmt: skip
    page = tl.program_id(0)  # scratch page: frame · pages_per_frame + page within the frame
    pid_bg = tl.program_id(1)
    b = pid_bg // num_kv_heads
    g = pid_bg % num_kv_heads
    frame = page // pages_per_frame
    first = (page % pages_per_frame) * PAGE  # the page's first token within its frame
    valid = tl.minimum(tokens_per_frame - first, PAGE)  # the frame's last page is partial
    chunk_row = frame * tokens_per_frame + first  # ... and its row in the chunk
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    k_src = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_src = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    dst = b.to(tl.int64) * stride_pb + g.to(tl.int64) * stride_ph + page.to(tl.int64) * stride_pp
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, PAGE, ROWS):
        rows = r0 + offs_r
        ok = (rows < valid)[:, None]
        src_rows = (chunk_row + rows).to(tl.int64)[:, None]
        dst_rows = dst + rows.to(tl.int64)[:, None] * stride_pt + offs_d[None, :]
        # Slots past the page's length are neither read nor written (they stay as cleared).
        k = tl.load(k_src + src_rows * stride_kl + offs_d[None, :], mask=ok, other=0.0)
        tl.store(KPool + dst_rows, k, mask=ok)
        v = tl.load(v_src + src_rows * stride_vl + offs_d[None, :], mask=ok, other=0.0)
        tl.store(VPool + dst_rows, v, mask=ok)
        if WRITE_REPS:
            k_sum += tl.sum(k.to(tl.float32), 0)
    if WRITE_REPS:
        # The page's mean key over its valid tokens, as `patterns.pool_key_blocks` pools it.
        rep = k_sum / valid.to(tl.float32)
        reps_row = (
            b.to(tl.int64) * stride_rb + g.to(tl.int64) * stride_rh + page.to(tl.int64) * stride_rp
        )
        tl.store(Reps + reps_row + offs_d, rep)


def write_scratch_supported(k_pool: Tensor, v_pool: Tensor, key_reps: Tensor) -> bool:
    """Whether `write_scratch_pages` takes this pool: fp16/bf16/fp32 K and V of equal
    strides, a power-of-two page and head_dim (16..256), head_dim the unit-stride axis of
    both and of the float32 key reps. (The chunk's k and v must also have a unit-stride
    head_dim: the caller checks that per call.)"""
    page, head_dim = k_pool.shape[3], k_pool.shape[4]
    return (
        k_pool.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and v_pool.stride() == k_pool.stride()
        and key_reps.dtype == torch.float32
        and is_pow2(page)
        and is_pow2(head_dim)
        and 16 <= head_dim <= 256
        and k_pool.stride(-1) == 1
        and key_reps.stride(-1) == 1
    )


def write_scratch_pages(
    k: Tensor,
    v: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    key_reps: Tensor | None,
    geometry: VideoGeometry,
    frames: int,
) -> None:
    """Write ``frames`` whole frames of k, v (BLHD ``[B, frames·T, Hkv, D]``, the pool's dtype)
    into the first ``frames·ppf`` pages of ``k_pool``/``v_pool`` (``[B, Hkv, NP, page, D]``,
    same strides), and with ``key_reps`` (float32 ``[B, Hkv, NP, D]``) each page's mean key.
    The caller checks shapes, `write_scratch_supported` and k's and v's unit-stride head_dim."""
    batch, kv_heads, _, page, head_dim = k_pool.shape
    pages = frames * geometry.pages_per_frame
    if batch * kv_heads * pages == 0:
        return
    reps = key_reps if key_reps is not None else k_pool  # never read without WRITE_REPS
    reps_strides = key_reps.stride()[:3] if key_reps is not None else (0, 0, 0)
    rows = min(page, max(1, STEP_ELEMS // head_dim))
    _write_scratch_kernel[(pages, batch * kv_heads)](
        k, v, k_pool, v_pool, reps,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        *k_pool.stride()[:4], *reps_strides,
        kv_heads, geometry.tokens_per_frame, geometry.pages_per_frame,
        PAGE=page, HEAD_DIM=head_dim, ROWS=rows, WRITE_REPS=key_reps is not None,
        num_warps=4,
    )  # fmt: skip
