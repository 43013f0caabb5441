"""Table builders for `bench.kernel --selector`, so `select_overhead` is a measured number.

    python -m bench.kernel --selector bench.selectors:persistent_local

`persistent_local` lays the case's KV out as the runtime would — 32 persistent pages, then the
window's history frames and the current chunk, each frame tiled into 13 pages of 128 — and
times what one layer does per denoising pass to build its table: pool the chunk's queries
into block representatives, score them against the pages' key representatives, take each
query block's top-K window pages, add the persistent pages and the own frames, emit the
table. The per-chunk layout is memoised as in the runtime (built once, reused by the passes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from bench.kernel import KernelCase
from patterns import BlockScorer, CacheView, PersistentLocal, VideoGeometry, pool_query_blocks


def persistent_local(
    case: KernelCase, density: float, q: Tensor, k: Tensor
) -> Callable[[], object]:
    """The default pattern's selection at this case's shape; q [1, Lq, H, D], k [1, Lk, H, D]."""
    g = VideoGeometry(
        tokens_per_frame=case.tokens_per_frame, frames_per_chunk=3, page_size=128, q_block=128
    )
    persistent = case.persistent_tokens // g.page_size
    window_frames = round((case.kv_tokens - case.persistent_tokens) / case.tokens_per_frame)
    history = window_frames - g.frames_per_chunk
    heads, device = case.heads, q.device
    num_pages = persistent + window_frames * g.pages_per_frame

    def ids(start: int, *shape: int) -> Tensor:
        count = int(torch.Size(shape).numel())
        grid = torch.arange(start, start + count, device=device).view(*shape)
        return grid.expand(1, heads, *shape)

    page_lens = g.frame_page_lens(device).repeat(window_frames)
    page_lens = torch.cat(
        [torch.full((persistent,), g.page_size, device=device, dtype=page_lens.dtype), page_lens]
    )
    # The pool keeps each page's mean key (written with the page, not per pass); the
    # case's keys tile 128-token blocks, not 13-page frames, so use their block means.
    blocks = k[:, : (k.shape[1] // g.page_size) * g.page_size].unflatten(1, (-1, g.page_size))
    key_reps = (
        blocks.float().mean(2).transpose(1, 2)[:, :, torch.arange(num_pages) % blocks.shape[1]]
    )
    view = CacheView(
        geometry=g,
        num_heads=heads,
        chunk_start=history,
        history_frames=tuple(range(history)),
        frame_index=torch.arange(history, device=device),
        frame_pages=ids(persistent, history, g.pages_per_frame),
        chunk_pages=ids(
            persistent + history * g.pages_per_frame, g.frames_per_chunk, g.pages_per_frame
        ),
        persistent_pages=ids(0, persistent),
        page_lens=page_lens.expand(1, heads, -1),
        key_reps=key_reps.contiguous(),
        scorer=BlockScorer(heads, heads, q.shape[-1]).to(device),
    )
    pattern = PersistentLocal(
        persistent_blocks=persistent, window_frames=window_frames, local_density=density
    )

    def select() -> object:
        reps = pool_query_blocks(q, g.q_block)
        return pattern.select(dataclasses.replace(view, query_reps=reps))

    return select
