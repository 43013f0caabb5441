"""`PersistentLocal`'s block table built on the GPU by three Triton kernels.

The torch path (`PersistentLocal.select` over `patterns.selection`) is the reference; this is
the same selection with ~30 small launches (pooling, scoring, top-K, masks, the table's sort
and compaction, and the per-chunk layout that a CUDA-graph replay rebuilds every pass)
folded into three:

1. ``_pool_queries_kernel``, one program per (batch·query head, query block): the block's
   mean query, read straight from q → ``[B, H, Mq, D]``.
2. ``_window_scores_kernel``, one program per (batch·query head, ``GROUP_M`` query blocks, a
   run of window pages): folds the layer's scorer into the queries (``q̄·Wq·Wkᵀ/√D``, so keys
   are scored as stored; one weight read per group of blocks) and scores the pages' key
   means → float32 scores ``[B, H, Mq, Nw]``.
3. ``_table_kernel``, one program per (batch·query head, query block): the row's top-K window
   pages by a radix select on the scores (ties: the lower column wins), ∪ the persistent pages
   ∪ the pages of the block's own frames, in ascending page order (a bitmap over the pool,
   not a sort) → the row of the `BlockTable`.

All three read the cache's layout (frame slots, page ids, persistent set, the chunk's start)
from its device buffers, so a graph captured at one chunk is right at any later chunk of the
same shape.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from patterns.block_table import BlockTable
from patterns.cache_view import CacheView
from patterns.selection import default_scorer

__all__ = ["persistent_local_table"]

# Query blocks per scoring program: the M of its matrix products (tl.dot needs >= 16).
GROUP_M = 16
# Window pages per step of a scoring program, and steps per program.
BLOCK_COLS = 64
COL_STEPS = 2
# Most elements of q a pooling program loads per step (whole blocks of up to 128 x 128).
POOL_TILE = 16384
PRECISION = tl.constexpr("tf32x3")


@triton.jit
def _pool_queries_kernel(
    Q, QMean, stride_qb, stride_ql, stride_qh, num_heads, q_len, num_q_blocks,
    Q_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, POOL_ROWS: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_r = tl.arange(0, POOL_ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    # Mean of the block's valid rows (the chunk's last block may be partial).
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, Q_BLOCK, POOL_ROWS):
        rows = m * Q_BLOCK + r0 + offs_r
        tile = tl.load(
            q_base + rows[:, None].to(tl.int64) * stride_ql + offs_d[None, :],
            mask=(rows < q_len)[:, None], other=0.0,
        )  # fmt: skip
        q_sum += tl.sum(tile.to(tl.float32), 0)
    q_mean = q_sum / tl.maximum(tl.minimum(q_len - m * Q_BLOCK, Q_BLOCK), 1).to(tl.float32)
    tl.store(QMean + (pid_bh * num_q_blocks + m).to(tl.int64) * HEAD_DIM + offs_d, q_mean)


@triton.jit
def _window_scores_kernel(
    QMean, Wq, Wk, KeyReps, FramePages, ChunkPages, Scores,
    stride_fb, stride_fh, stride_cb, stride_ch,
    num_heads, group, num_q_blocks, hist_cols, window_cols, num_pages, scale,
    HEAD_DIM: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_COLS: tl.constexpr,
    COL_STEPS: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    g = h // group
    offs_m = tl.program_id(0) * GROUP_M + tl.arange(0, GROUP_M)
    offs_d = tl.arange(0, HEAD_DIM)
    block_ok = offs_m < num_q_blocks

    # Fold both projections and 1/sqrt(D) into the queries: (q̄ Wq)·(k̄ Wk) = (q̄ Wq Wkᵀ)·k̄,
    # so keys are scored as they are stored. tf32x3 keeps float32 accuracy on tensor cores.
    q_rows = (pid_bh * num_q_blocks + offs_m).to(tl.int64)
    q_mean = tl.load(QMean + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=block_ok[:, None],
                     other=0.0)  # fmt: skip
    w_off = offs_d[:, None] * HEAD_DIM + offs_d[None, :]
    wq = tl.load(Wq + h.to(tl.int64) * HEAD_DIM * HEAD_DIM + w_off)
    wk = tl.load(Wk + g.to(tl.int64) * HEAD_DIM * HEAD_DIM + w_off)
    q_eff = tl.dot(q_mean, wq, input_precision=PRECISION)
    q_eff = tl.dot(q_eff, tl.trans(wk), input_precision=PRECISION) * scale

    # Window column w is page w of the history slots (w < hist_cols) or of the chunk.
    frame_base = FramePages + b.to(tl.int64) * stride_fb + g.to(tl.int64) * stride_fh
    chunk_base = ChunkPages + b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch
    reps_base = KeyReps + (b * (num_heads // group) + g).to(tl.int64) * num_pages * HEAD_DIM
    for step in tl.static_range(COL_STEPS):
        cols = (tl.program_id(2) * COL_STEPS + step) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        in_hist = cols < hist_cols
        in_chunk = (cols >= hist_cols) & (cols < window_cols)
        hist_page = tl.load(frame_base + cols, mask=in_hist, other=0)
        chunk_page = tl.load(chunk_base + cols - hist_cols, mask=in_chunk, other=0)
        # an empty history slot's id is meaningless: read some page, the table ignores it
        page = tl.where(in_chunk, chunk_page, hist_page)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
        reps = tl.load(reps_base + page[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :])
        scores = tl.dot(q_eff, tl.trans(reps), input_precision=PRECISION)
        out = Scores + q_rows[:, None] * window_cols + cols[None, :]
        tl.store(out, scores, mask=block_ok[:, None] & (cols < window_cols)[None, :])


@triton.jit
def _table_kernel(
    Scores, FrameIndex, FramePages, ChunkPages, Persistent, Start, Marks, NumBlocks, Indices,
    stride_fb, stride_fh, stride_cb, stride_ch, stride_pb, stride_ph,
    num_heads, group, q_len, num_q_blocks, num_persistent, hist_cols, window_cols,
    pages_per_frame, tokens_per_frame, top_k, max_blocks,
    Q_BLOCK: tl.constexpr, COLUMNS: tl.constexpr, POOL_PAGES: tl.constexpr,
    FORCE_OWN: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    g = h // group
    start = tl.load(Start)

    # Candidate columns: [persistent | history slots' pages | chunk pages], as the torch path.
    n = tl.arange(0, COLUMNS)
    w = n - num_persistent
    is_persistent = n < num_persistent
    in_hist = (w >= 0) & (w < hist_cols)
    in_chunk = (w >= hist_cols) & (w < window_cols)
    persistent = tl.load(
        Persistent + b.to(tl.int64) * stride_pb + g.to(tl.int64) * stride_ph + n,
        mask=is_persistent, other=-1,
    )  # fmt: skip
    hist_page = tl.load(
        FramePages + b.to(tl.int64) * stride_fb + g.to(tl.int64) * stride_fh + w,
        mask=in_hist, other=0,
    )  # fmt: skip
    chunk_page = tl.load(
        ChunkPages + b.to(tl.int64) * stride_cb + g.to(tl.int64) * stride_ch + w - hist_cols,
        mask=in_chunk, other=0,
    )  # fmt: skip
    hist_frame = tl.load(FrameIndex + w // pages_per_frame, mask=in_hist, other=-1)
    chunk_frame = start + (w - hist_cols) // pages_per_frame
    page = tl.where(is_persistent, persistent, tl.where(in_hist, hist_page, chunk_page))
    allowed = (in_hist & (hist_frame >= 0)) | in_chunk

    # Scores as unsigned keys with the float order (flip all bits of negatives, the sign bit
    # of the rest); columns outside the window get 0, below every real score.
    row = (pid_bh * num_q_blocks + m).to(tl.int64)
    score = tl.load(Scores + row * window_cols + w, mask=in_hist | in_chunk, other=0.0)
    bits = score.to(tl.uint32, bitcast=True)
    all_bits = tl.full([COLUMNS], 0xFFFFFFFF, tl.uint32)
    sign_bit = all_bits ^ (all_bits >> 1)
    flip = tl.where((bits & sign_bit) != 0, all_bits, sign_bit)
    key = tl.where(allowed, bits ^ flip, tl.zeros_like(bits))

    # Radix select of the K-th largest key, most significant bit first: keep a bit when at
    # least K keys are >= the prefix with it set.
    kth = tl.zeros([], dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        trial = kth | (tl.full([], 1, tl.uint32) << bit)
        kth = tl.where(tl.sum((key >= trial).to(tl.int32), 0) >= top_k, trial, kth)
    above = allowed & (key > kth)
    tied = allowed & (key == kth)
    # of the keys equal to the K-th, the lowest columns fill what the larger ones left
    room = top_k - tl.sum(above.to(tl.int32), 0)
    picked = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= room))

    visible = (is_persistent & (persistent >= 0)) | picked
    if FORCE_OWN:
        # the chunk frames that the block's first and last query rows fall in
        first_row = m * Q_BLOCK
        last_row = tl.minimum(first_row + Q_BLOCK, q_len) - 1
        own_first = start + first_row // tokens_per_frame
        own_last = start + last_row // tokens_per_frame
        visible = visible | (in_chunk & (chunk_frame >= own_first) & (chunk_frame <= own_last))

    # The row in ascending page order without a sort: mark the visible ids in this row's
    # bitmap over the pool, then each marked id's slot is the count of marks below it. The
    # barriers make the block's global writes visible to all of its threads.
    offs_pool = tl.arange(0, POOL_PAGES)
    marks = Marks + row * POOL_PAGES
    tl.store(marks + offs_pool, tl.zeros([POOL_PAGES], dtype=tl.int8))
    tl.debug_barrier()
    # (ids are in [0, NP) by the cache's contract; the bound only keeps a bad id in its row)
    tl.store(marks + page, tl.full([COLUMNS], 1, tl.int8),
             mask=visible & (page >= 0) & (page < POOL_PAGES))  # fmt: skip
    tl.debug_barrier()
    marked = tl.load(marks + offs_pool) != 0
    slot = tl.cumsum(marked.to(tl.int32), 0) - 1
    out = Indices + row * max_blocks
    tl.store(out + slot, offs_pool, mask=marked & (slot < max_blocks))
    count = tl.sum(marked.to(tl.int32), 0)
    tl.store(out + n, tl.zeros([COLUMNS], dtype=tl.int32), mask=(n >= count) & (n < max_blocks))
    tl.store(NumBlocks + row, count)


def _padded(count: int) -> int:
    return max(16, triton.next_power_of_2(count))


def persistent_local_table(
    view: CacheView, top_k: int, max_blocks: int, force_own_frame: bool
) -> BlockTable:
    """`PersistentLocal`'s table for ``view`` (which must carry ``queries``): per query block,
    the persistent pages, the ``top_k`` best-scoring window pages and, with
    ``force_own_frame``, the pages of its own frames; ``max_blocks`` is the table's width (a
    bound on every row's count)."""
    q = view.queries
    if q is None:
        raise ValueError("persistent_local_table needs the view's raw queries (view.queries)")
    g = view.geometry
    batch, q_len, heads, head_dim = q.shape
    kv_heads = view.num_kv_heads
    if q_len != g.chunk_tokens or heads != view.num_heads:
        raise ValueError(
            f"queries must be [B, {g.chunk_tokens}, {view.num_heads}, D] (one chunk), "
            f"got {list(q.shape)}"
        )
    if q.stride(-1) != 1:  # the pooling kernel reads a row's head_dim as one run
        q = q.contiguous()
    scorer = default_scorer(view.scorer, heads, kv_heads, head_dim, q.device)
    wq = scorer.wq.detach().float().contiguous()
    wk = scorer.wk.detach().float().contiguous()
    key_reps = view.key_reps
    if key_reps.dtype != torch.float32 or not key_reps.is_contiguous():
        key_reps = key_reps.float().contiguous()
    frame_pages, chunk_pages = view.frame_pages, view.chunk_pages
    persistent = view.persistent_pages
    # the kernels index a (batch, kv head) row's pages (and persistent ids) as one run
    if frame_pages.stride(3) != 1 or frame_pages.stride(2) != g.pages_per_frame:
        frame_pages = frame_pages.contiguous()
    if chunk_pages.stride(3) != 1 or chunk_pages.stride(2) != g.pages_per_frame:
        chunk_pages = chunk_pages.contiguous()
    if persistent.stride(2) != 1:
        persistent = persistent.contiguous()
    start = view.start
    if start is None:
        # a fill, not a host copy: safe inside a CUDA-graph capture
        start = torch.full((), view.chunk_start, device=q.device, dtype=torch.int64)

    num_q_blocks = g.q_blocks_per_chunk
    hist_cols = len(view.history_frames) * g.pages_per_frame
    window_cols = hist_cols + g.pages_per_chunk
    num_pages = key_reps.shape[2]
    group = heads // kv_heads
    rows = batch * heads * num_q_blocks
    device = q.device

    q_mean = torch.empty(batch, heads, num_q_blocks, head_dim, device=device)
    _pool_queries_kernel[(num_q_blocks, batch * heads)](
        q, q_mean, q.stride(0), q.stride(1), q.stride(2), heads, q_len, num_q_blocks,
        Q_BLOCK=g.q_block, HEAD_DIM=head_dim, POOL_ROWS=min(g.q_block, POOL_TILE // head_dim),
        num_warps=8,
    )  # fmt: skip

    scores = torch.empty(batch, heads, num_q_blocks, window_cols, device=device)
    col_split = triton.cdiv(window_cols, BLOCK_COLS * COL_STEPS)
    _window_scores_kernel[(triton.cdiv(num_q_blocks, GROUP_M), batch * heads, col_split)](
        q_mean, wq, wk, key_reps, frame_pages, chunk_pages, scores,
        frame_pages.stride(0), frame_pages.stride(1),
        chunk_pages.stride(0), chunk_pages.stride(1),
        heads, group, num_q_blocks, hist_cols, window_cols, num_pages, 1.0 / math.sqrt(head_dim),
        HEAD_DIM=head_dim, GROUP_M=GROUP_M, BLOCK_COLS=BLOCK_COLS, COL_STEPS=COL_STEPS,
        num_warps=4,
    )  # fmt: skip

    num_persistent = persistent.shape[2]
    pool_pages = _padded(num_pages)
    columns = _padded(num_persistent + window_cols)
    marks = torch.empty(rows, pool_pages, device=device, dtype=torch.int8)
    counts = torch.empty(batch, heads, num_q_blocks, device=device, dtype=torch.int32)
    indices = torch.empty(batch, heads, num_q_blocks, max_blocks, device=device, dtype=torch.int32)
    _table_kernel[(num_q_blocks, batch * heads)](
        scores, view.frame_index, frame_pages, chunk_pages, persistent, start, marks, counts,
        indices,
        frame_pages.stride(0), frame_pages.stride(1), chunk_pages.stride(0),
        chunk_pages.stride(1), persistent.stride(0), persistent.stride(1),
        heads, group, q_len, num_q_blocks, num_persistent, hist_cols, window_cols,
        g.pages_per_frame, g.tokens_per_frame, top_k, max_blocks,
        Q_BLOCK=g.q_block, COLUMNS=columns, POOL_PAGES=pool_pages, FORCE_OWN=force_own_frame,
        # few warps: the radix select is 32 reductions in a row, and a reduction within a
        # warp needs no shared memory or barrier
        num_warps=2 if columns <= 1024 else 4,
    )  # fmt: skip
    return BlockTable(counts, indices, g.q_block, g.page_size)
