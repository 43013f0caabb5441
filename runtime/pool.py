"""`PagePool`: the paged KV cache shared by every self-attention layer of a model.

Pages are ``page_size``-token tiles of one frame (``patterns.VideoGeometry``). Each
(batch, kv head) row has its own free list, but every row allocates and frees the same number
of pages at once, so the used count is one host integer and allocation never syncs with the
device. The pool is sized once (from the pattern's footprint) and never grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patterns import VideoGeometry, pool_key_blocks
from patterns.checks import check_int
from runtime.scratch_write import write_scratch_pages, write_scratch_supported

__all__ = ["PagePool"]


class PagePool:
    """Fixed-size page pool.

    Tensors (``NP = num_pages``):
        k, v: ``[B, Hkv, NP, page_size, D]`` in the model's dtype.
        page_lens: int32 ``[B, Hkv, NP]`` valid tokens per page (0 for free pages).
        key_reps: float32 ``[B, Hkv, NP, D]`` mean of each page's valid keys.
        used: bool ``[B, Hkv, NP]`` (the free list; every row has the same count).
    Pages ``[0, scratch_pages)`` are the scratch range: always used, never allocated or
    freed; a layer writes the current chunk there during its passes.

    check: verify page ids on ``free`` (double free, scratch, duplicates). It reads device
    memory, i.e. syncs; the runtime enables it in debug mode.
    fused_writes: `write_scratch` by one Triton kernel (`runtime.scratch_write`) where it
    applies, instead of the torch copies. Off by default until it has passed
    `tests/runtime/test_scratch_write.py` on a GPU.
    """

    def __init__(
        self,
        geometry: VideoGeometry,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        scratch_pages: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        check: bool = True,
        fused_writes: bool = False,
    ):
        for name, value in (
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("num_pages", num_pages),
        ):
            check_int(value, name)
        if not isinstance(scratch_pages, int) or not 0 <= scratch_pages <= num_pages:
            raise ValueError(
                f"scratch_pages must be an int in [0, {num_pages}], got {scratch_pages!r}"
            )
        if scratch_pages % geometry.pages_per_frame:
            raise ValueError(
                f"scratch_pages ({scratch_pages}) must hold whole frames "
                f"({geometry.pages_per_frame} pages each)"
            )
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.geometry = geometry
        self.check = check
        device = torch.device(device)
        shape = (batch_size, num_kv_heads, num_pages)
        page = geometry.page_size
        self.k = torch.empty(*shape, page, head_dim, device=device, dtype=dtype)  # see clear
        self.v = torch.empty_like(self.k)
        self.page_lens = torch.empty(shape, device=device, dtype=torch.int32)
        self.key_reps = torch.empty(*shape, head_dim, device=device, dtype=torch.float32)
        self.used = torch.empty(shape, device=device, dtype=torch.bool)
        self.scratch_ids = torch.arange(scratch_pages, device=device).expand(*shape[:2], -1)
        self._rows = (
            torch.arange(batch_size, device=device)[:, None, None],
            torch.arange(num_kv_heads, device=device)[None, :, None],
        )
        # first flat page of each (batch, kv head) row, int64 [B, Hkv, 1]
        self._row_starts = (
            torch.arange(batch_size * num_kv_heads, device=device).view(batch_size, num_kv_heads, 1)
            * num_pages
        )
        self.scratch_pages = scratch_pages
        # the per-pass destinations of write_scratch, as views built once: [B, Hkv, F, T, D]
        # of k and v, and [B, Hkv, F, ppf, D] of key_reps (each view costs a dispatch per pass)
        frames, span = scratch_pages // geometry.pages_per_frame, geometry.pages_per_frame * page
        tokens = geometry.tokens_per_frame
        self._scratch_kv = tuple(
            t[:, :, :scratch_pages].view(*shape[:2], frames, span, head_dim)[:, :, :, :tokens]
            for t in (self.k, self.v)
        )
        self._scratch_reps = self.key_reps[:, :, :scratch_pages].view(
            *shape[:2], frames, geometry.pages_per_frame, head_dim
        )
        # the fused write where it applies to this pool (decided once; k and v per call)
        self._fused_writes = fused_writes and write_scratch_supported(self.k, self.v, self.key_reps)
        self.clear()
        self.page_bytes = 2 * batch_size * num_kv_heads * page * head_dim * self.k.element_size()

    def clear(self) -> None:
        """Empty the pool in place: every page free and zeroed, the scratch range used. The
        tensors keep their addresses (CUDA graphs captured over them stay valid). Zeros, not
        garbage: the torch backend multiplies masked slots by 0, and 0·NaN = NaN."""
        for t in (self.k, self.v, self.page_lens, self.key_reps, self.used):
            t.zero_()
        self.used[..., : self.scratch_pages] = True
        # the scratch range always holds whole frames: its lengths never change
        g = self.geometry
        self.page_lens[..., : self.scratch_pages] = g.frame_page_lens(self.device).repeat(
            self.scratch_pages // g.pages_per_frame
        )
        self.num_used = self.scratch_pages
        self.peak_used = self.scratch_pages

    # -- sizes ------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def current_bytes(self) -> int:
        """K/V bytes of the used pages (scratch included), over the batch and kv heads."""
        return self.num_used * self.page_bytes

    @property
    def peak_bytes(self) -> int:
        return self.peak_used * self.page_bytes

    # -- free list --------------------------------------------------------------------------

    def reserve(self, n: int) -> None:
        """The host side of ``allocate``: count n more used pages per row. Raises
        RuntimeError, counting nothing, when fewer than n are free. (A CUDA-graph replay of a
        commit redoes the device side; the runtime then calls this alone.)"""
        check_int(n, "n", minimum=0)
        if self.num_used + n > self.num_pages:
            raise RuntimeError(
                f"page pool full: {n} pages requested, {self.num_pages - self.num_used} free of "
                f"{self.num_pages} (the pool is sized from the pattern's footprint; it never grows)"
            )
        self.num_used += n
        self.peak_used = max(self.peak_used, self.num_used)

    def release(self, n: int) -> None:
        """The host side of ``free``: count n fewer used pages per row."""
        check_int(n, "n", minimum=0)
        if n > self.num_used - self.scratch_pages:
            raise RuntimeError(f"release({n}): only {self.num_used - self.scratch_pages} in use")
        self.num_used -= n

    def allocate(self, n: int) -> Tensor:
        """n free pages per (batch, kv head): int64 ``[B, Hkv, n]`` (lowest free ids,
        ascending). Raises RuntimeError, allocating nothing, when fewer than n are free."""
        self.reserve(n)
        # a stable sort puts the free pages (False) first, in id order
        ids = torch.sort(self.used.to(torch.int8), dim=-1, stable=True).indices[..., :n]
        self.used.scatter_(-1, ids, True)
        return ids

    def _check_ids(self, ids: Tensor, name: str) -> None:
        rows = (self.batch_size, self.num_kv_heads)
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != 3:
            raise ValueError(f"{name} must be an int64 tensor [B, Hkv, n]")
        if tuple(ids.shape[:2]) != rows or ids.device != self.device:
            raise ValueError(
                f"{name} must be [B={rows[0]}, Hkv={rows[1]}, n] on {self.device}, "
                f"got {tuple(ids.shape)} on {ids.device}"
            )

    def free(self, ids: Tensor) -> None:
        """Return pages ``ids`` (int64 ``[B, Hkv, n]``) to the free list.

        With ``check``: ValueError, freeing nothing, if a page is free already, a scratch page,
        out of range or listed twice in a row.
        """
        self._check_ids(ids, "ids")
        n = ids.shape[-1]
        if self.check and n:
            in_range = (ids >= self.scratch_pages) & (ids < self.num_pages)
            safe = ids.clamp(0, self.num_pages - 1)
            distinct = (ids.sort(dim=-1).values.diff(dim=-1) != 0).all()
            if not bool(in_range.all() & self.used.gather(-1, safe).all() & distinct):
                raise ValueError(
                    "ids: every page must be an allocated, non-scratch page listed once per row "
                    "(double free?)"
                )
        self.release(n)
        self.used.scatter_(-1, ids, False)
        self.page_lens.scatter_(-1, ids, 0)

    # -- contents ---------------------------------------------------------------------------

    def _check_frames(self, k: Tensor, v: Tensor, frames: int) -> None:
        g = self.geometry
        expected = (self.batch_size, frames * g.tokens_per_frame, self.num_kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if (
                not isinstance(x, Tensor)
                or tuple(x.shape) != expected
                or x.dtype != self.dtype
                or x.device != self.device
            ):
                got = f"{x.dtype} {list(x.shape)} on {x.device}" if isinstance(x, Tensor) else x
                raise ValueError(
                    f"{name} must be {self.dtype} {list(expected)} on {self.device}, got {got}"
                )

    def _frame_reps(self, k: Tensor, frames: int) -> Tensor:
        """Mean keys of the pages of whole frames k: ``[B, Hkv, frames, ppf, D]`` (a strided
        view; float32, float64 stays)."""
        g = self.geometry
        b, hkv, d = self.batch_size, self.num_kv_heads, self.head_dim
        per_frame = k.reshape(b * frames, g.tokens_per_frame, hkv, d)
        reps = pool_key_blocks(per_frame, g.page_size)  # [B·n, Hkv, ppf, D]
        return reps.view(b, frames, hkv, g.pages_per_frame, d).transpose(1, 2)

    def write(self, ids: Tensor, k: Tensor, v: Tensor) -> None:
        """Write whole frames into pages and compute their key reps.

        ids: int64 ``[B, Hkv, n·ppf]`` (frame f goes to ``ids[..., f·ppf:(f+1)·ppf]``);
        k, v: BLHD ``[B, n·T, Hkv, D]`` in the pool's dtype.
        """
        self._check_ids(ids, "ids")
        g = self.geometry
        if ids.shape[-1] % g.pages_per_frame:
            raise ValueError(f"ids must list whole frames ({g.pages_per_frame} pages each)")
        frames = ids.shape[-1] // g.pages_per_frame
        self._check_frames(k, v, frames)
        rows_b, rows_h = self._rows
        self.k[rows_b, rows_h, ids] = g.to_pages(k)
        self.v[rows_b, rows_h, ids] = g.to_pages(v)
        lens = g.frame_page_lens(self.device).repeat(frames)
        self.page_lens[rows_b, rows_h, ids] = lens.expand(*ids.shape[:2], -1)
        reps = self._frame_reps(k, frames).reshape(*ids.shape, self.head_dim)
        self.key_reps[rows_b, rows_h, ids] = reps.float()

    def write_scratch(self, k: Tensor, v: Tensor, reps: bool = True) -> None:
        """Write the current chunk into the scratch pages (the per-pass path): strided copies
        into the fixed range, no scatter. k, v: BLHD ``[B, F·T, Hkv, D]`` filling the range.
        reps: also pool the scratch pages' key reps (False for patterns that never read them:
        their scratch reps then stay stale)."""
        g = self.geometry
        frames = self.scratch_pages // g.pages_per_frame
        self._check_frames(k, v, frames)
        if self._fused_writes and k.stride(-1) == 1 and v.stride(-1) == 1:
            reps_out = self.key_reps if reps else None
            write_scratch_pages(k, v, self.k, self.v, reps_out, g, frames)
            return
        b, hkv, d, t = self.batch_size, self.num_kv_heads, self.head_dim, g.tokens_per_frame
        for dst, x in zip(self._scratch_kv, (k, v), strict=True):
            dst.copy_(x.view(b, frames, t, hkv, d).permute(0, 3, 1, 2, 4))
        if reps:
            self._scratch_reps.copy_(self._frame_reps(k, frames))

    def copy(self, src: Tensor, dst: Tensor) -> None:
        """Copy pages (K, V, lengths, key reps) ``src`` → ``dst``, int64 ``[B, Hkv, n]``."""
        self._check_ids(src, "src")
        self._check_ids(dst, "dst")
        if src.shape != dst.shape:
            raise ValueError(f"src {tuple(src.shape)} and dst {tuple(dst.shape)} differ")
        # flat row indices and index_select/index_copy_: the same copy as advanced indexing
        # with far less host work (it runs for every layer at every commit)
        src, dst = (ids.add(self._row_starts).view(-1) for ids in (src, dst))
        for t in (self.k, self.v, self.page_lens, self.key_reps):
            flat = t.view(-1, *t.shape[3:])
            flat.index_copy_(0, dst, flat.index_select(0, src))
