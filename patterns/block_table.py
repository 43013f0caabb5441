"""The block table: which KV pages each query block attends to (the patterns ↔ codegen format).

It follows FlexAttention's ``kv_num_blocks`` / ``kv_indices`` conventions, indexed by query
head, so a ``BlockMask`` over the page pool viewed as one flat sequence can be produced from
it. Tables are built in block space, vectorised on the device: never from a dense Lq×Lk mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

__all__ = ["BlockTable", "expand_heads"]

_INT32_MAX = torch.iinfo(torch.int32).max


def expand_heads(x: Tensor, heads: int, name: str) -> Tensor:
    """x ``[B, Hx, ...]`` with ``Hx | heads`` → ``[B, heads, ...]`` (query head h reads
    ``h // (heads // Hx)``), as a view when Hx is 1 or heads."""
    hx = x.shape[1]
    if hx == 0 or heads % hx:
        raise ValueError(f"{name}: its head dim ({hx}) must divide the query heads ({heads})")
    if hx == heads:
        return x
    if hx == 1:
        return x.expand(x.shape[0], heads, *x.shape[2:])
    return x.repeat_interleave(heads // hx, dim=1)


@dataclass
class BlockTable:
    """Per (batch, query head, query block): the physical KV pages it attends to.

    kv_num_blocks: int32 ``[B, H, Mq]`` — how many pages are listed for the row.
    kv_indices: int32 ``[B, H, Mq, Kmax]`` — physical page ids into the pool
        ``[B, Hkv, NP, page_size, D]`` (query head h reads kv head ``h // (H // Hkv)``); the
        first ``kv_num_blocks`` entries are valid, strictly ascending (so duplicate-free);
        the rest is padding with value 0 that is never read.
    q_block: query rows per table row (row m covers rows ``[m·q_block, (m+1)·q_block)``).
    page_size: tokens per page; which of a page's tokens are valid is given by the pool's
        ``page_lens`` ``[B, Hkv, NP]``, not by the table.
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    q_block: int
    page_size: int

    @property
    def batch(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_indices.shape[2]

    @property
    def max_blocks(self) -> int:
        return self.kv_indices.shape[3]

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_visibility(
        cls,
        visible: Tensor,
        q_block: int,
        page_size: int,
        page_ids: Tensor | None = None,
        max_blocks: int | None = None,
        num_q_blocks: int | None = None,
    ) -> BlockTable:
        """Table from a block-visibility tensor over N candidate columns.

        visible: bool ``[B, H, Mq, N]`` (any of B, H, Mq may be 1 and is broadcast against
            ``page_ids``). Column n of row (b, h, m) is listed when ``visible[b, h, m, n]``.
        page_ids: physical page id of each column, int ``[B, Hp, N]`` with ``Hp | H`` (kv
            heads or query heads) or ``[N]``; None means column n is page n. Visible columns
            of one row must name distinct pages.
        max_blocks: Kmax of the result (a known bound on the visible count per row keeps
            the table narrow); None means N. Must not be below any row's visible count.
        num_q_blocks: when every query block sees the same columns, pass ``visible`` with
            Mq = 1 and the row count here: the rows are sorted once and then copied.

        Vectorised: one sort (or a top-k when ``max_blocks < N``) along the columns.
        """
        if not isinstance(visible, Tensor) or visible.dtype != torch.bool or visible.dim() != 4:
            raise ValueError("visible must be a bool tensor [B, H, Mq, N]")
        n = visible.shape[-1]
        if page_ids is None:
            ids = torch.arange(n, device=visible.device, dtype=torch.int32)
        else:
            if page_ids.dim() == 3:
                ids = expand_heads(page_ids, visible.shape[1], "page_ids")[:, :, None, :]
            elif page_ids.dim() == 1:
                ids = page_ids
            else:
                raise ValueError(f"page_ids must be [B, Hp, N] or [N], got {tuple(page_ids.shape)}")
            if ids.shape[-1] != n:
                raise ValueError(f"page_ids has {ids.shape[-1]} columns, visible has {n}")
            ids = ids.to(torch.int32)
        kmax = n if max_blocks is None else max_blocks
        if not 0 <= kmax <= n:
            raise ValueError(f"max_blocks must lie in [0, N={n}], got {max_blocks}")
        keys = torch.where(visible, ids, _INT32_MAX)
        if kmax < n:
            chosen = torch.topk(keys, kmax, dim=-1, largest=False, sorted=True).values
        else:
            chosen = torch.sort(keys, dim=-1).values
        listed = chosen != _INT32_MAX
        counts = listed.sum(-1, dtype=torch.int32)
        indices = torch.where(listed, chosen, 0)
        if num_q_blocks is not None:
            if counts.shape[2] != 1:
                raise ValueError("num_q_blocks needs a visibility shared by all rows (Mq = 1)")
            counts = counts.expand(*counts.shape[:2], num_q_blocks)
            indices = indices.expand(*indices.shape[:2], num_q_blocks, kmax)
        return cls(counts.contiguous(), indices.contiguous(), q_block, page_size)

    # -- checks ---------------------------------------------------------------------------

    def validate(self, num_pages: int | None = None) -> None:
        """Raise ValueError unless the table keeps every invariant of the class docstring
        (dtypes, shapes, counts in [0, Kmax], listed ids in [0, num_pages), strictly
        ascending, padding 0). Syncs with the device: for tests and debug runs."""
        counts, idx = self.kv_num_blocks, self.kv_indices
        for name, t in (("kv_num_blocks", counts), ("kv_indices", idx)):
            if not isinstance(t, Tensor) or t.dtype != torch.int32:
                raise ValueError(f"{name} must be an int32 tensor")
        if idx.dim() != 4 or tuple(counts.shape) != tuple(idx.shape[:3]):
            raise ValueError(
                f"kv_num_blocks {tuple(counts.shape)} must be kv_indices' [B, H, Mq] "
                f"(kv_indices {tuple(idx.shape)})"
            )
        if counts.device != idx.device:
            raise ValueError("kv_num_blocks and kv_indices must be on one device")
        if counts.numel() and (bool((counts < 0).any()) or bool((counts > idx.shape[3]).any())):
            raise ValueError(f"kv_num_blocks must lie in [0, Kmax={idx.shape[3]}]")
        listed = torch.arange(idx.shape[3], device=idx.device) < counts[..., None]
        if bool((idx[listed] < 0).any()):
            raise ValueError("kv_indices lists a negative page id")
        if num_pages is not None and bool((idx[listed] >= num_pages).any()):
            raise ValueError(f"kv_indices lists a page id outside [0, num_pages={num_pages})")
        if bool((idx[~listed] != 0).any()):
            raise ValueError("kv_indices padding (after kv_num_blocks) must be 0")
        rising = idx[..., 1:] > idx[..., :-1]
        if bool((listed[..., 1:] & ~rising).any()):
            raise ValueError("kv_indices must be strictly ascending (sorted, no duplicates)")

    # -- views for comparisons and tests -------------------------------------------------

    def visible_pages(self, num_pages: int) -> Tensor:
        """bool ``[B, H, Mq, num_pages]``: page n is listed for the row."""
        listed = torch.arange(self.max_blocks, device=self.kv_indices.device)
        listed = listed < self.kv_num_blocks[..., None]
        out = torch.zeros(
            *self.kv_indices.shape[:3],
            num_pages + 1,
            dtype=torch.bool,
            device=self.kv_indices.device,
        )
        # unlisted slots write into the spare last column, which is dropped
        out.scatter_(-1, torch.where(listed, self.kv_indices.long(), num_pages), True)
        return out[..., :num_pages]

    def to_dense_mask(self, page_lens: Tensor, q_len: int | None = None) -> Tensor:
        """Token-level mask bool ``[B, H, q_len, NP·page_size]`` over the pool seen as one
        flat sequence (token j is page ``j // page_size``, slot ``j % page_size``).

        page_lens: int ``[B, Hkv, NP]``. q_len defaults to ``Mq · q_block``. Materialises
        Lq × NP·page booleans: for tests on small shapes only.
        """
        num_pages = page_lens.shape[-1]
        q_len = self.num_q_blocks * self.q_block if q_len is None else q_len
        blocks = self.visible_pages(num_pages)  # [B, H, Mq, NP]
        lens = expand_heads(page_lens, self.num_heads, "page_lens")  # [B, H, NP]
        slot_ok = torch.arange(self.page_size, device=lens.device) < lens[..., None]
        rows = torch.arange(q_len, device=blocks.device) // self.q_block
        mask = blocks[:, :, rows, :, None] & slot_ok[:, :, None, :, :]
        return mask.flatten(-2)

    def to_block_mask(self, page_lens: Tensor, q_len: int | None = None) -> BlockMask:
        """FlexAttention ``BlockMask`` equal to this table over the flat pool of
        ``NP · page_size`` tokens (page_lens: int ``[B, Hkv, NP]``).

        The block lists let a compiled FlexAttention skip unlisted pages; the ``mask_mod``
        states the whole mask (listed page and token within the page's length), because
        FlexAttention treats the block lists as a hint and eager mode evaluates only the
        ``mask_mod``. It reads a block-level ``[B, H, Mq, NP]`` visibility, not a token mask.
        """
        num_pages = page_lens.shape[-1]
        q_len = self.num_q_blocks * self.q_block if q_len is None else q_len
        lens = expand_heads(page_lens, self.num_heads, "page_lens").to(torch.int32)
        listed = self.visible_pages(num_pages)
        page, q_block = self.page_size, self.q_block

        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            page_id = kv_idx // page
            return listed[b, h, q_idx // q_block, page_id] & (kv_idx % page < lens[b, h, page_id])

        # FlexAttention's transposition needs one kv_indices slot per KV block of the sequence
        pad = num_pages - self.max_blocks
        if pad < 0:
            raise ValueError(f"table is wider (Kmax={self.max_blocks}) than the pool ({num_pages})")
        indices = torch.nn.functional.pad(self.kv_indices, (0, pad))
        return BlockMask.from_kv_blocks(
            self.kv_num_blocks,
            indices,
            BLOCK_SIZE=(self.q_block, page),
            mask_mod=mask_mod,
            seq_lengths=(q_len, num_pages * page),
        )
