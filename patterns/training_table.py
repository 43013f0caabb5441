"""Training-mode block tables: a teacher-forced clip sees what the cached rollout would see.

A teacher-forced clip of F frames runs as one sequence ``[clean clip ; noisy clip]`` of 2F
frames (chunks of ``frames_per_chunk``). Its keys and values are contiguous: page j holds
tokens ``[j·page, (j+1)·page)``, so clean frame f is pages ``f·ppf …`` and noisy frame f
pages ``(F + f)·ppf …`` (frames must tile into whole pages).

``clip_table`` replays, chunk by chunk, what one layer of the paged runtime does in a
rollout that commits the clean frames:

* clean chunk j = the commit pass of chunk j (t = 0): it sees the cache as it stands
  before the commit (retained history, persistent set) plus itself;
* noisy chunk i = a denoising pass of chunk i: the same cache, plus itself;
* after chunk j, the commit: frames that leave the window are evicted (with persistent
  memory, chunk frames that leave at once compete too) and ``P ← TopC(P ∪ evicted)`` is
  scored with chunk j's clean queries — the pattern's ``cache_policy``.

Each pass's table comes from the pattern's own ``select`` on a ``CacheView`` whose "pool" is
the clip's pages (page id = clip position), so any pattern of ``patterns.library`` gets its
own rules, scorer included. Everything is built in block space; the only Python loop is over
chunks (host frame bookkeeping, as in the rollout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from patterns.block_table import BlockTable
from patterns.cache_view import CacheView
from patterns.geometry import VideoGeometry
from patterns.library import Pattern
from patterns.scoring import pool_key_blocks

__all__ = ["check_clip_geometry", "clip_key_reps", "clip_table"]


def check_clip_geometry(geometry: VideoGeometry, clip_frames: int) -> None:
    """ValueError unless a [clean ; noisy] clip of ``clip_frames`` frames tiles into the
    geometry's pages and query blocks as the rollout's chunks do."""
    f = geometry.frames_per_chunk
    if isinstance(clip_frames, bool) or not isinstance(clip_frames, int) or clip_frames <= 0:
        raise ValueError(f"clip_frames must be a positive int, got {clip_frames!r}")
    if clip_frames % f:
        raise ValueError(
            f"clip_frames must be a multiple of frames_per_chunk={f}, got {clip_frames}"
        )
    if geometry.tokens_per_frame % geometry.page_size:
        raise ValueError(
            f"geometry: tokens_per_frame={geometry.tokens_per_frame} must be a multiple of "
            f"page_size={geometry.page_size} (contiguous clip pages must not straddle frames)"
        )
    if geometry.chunk_tokens % geometry.q_block:
        raise ValueError(
            f"geometry: a chunk's {geometry.chunk_tokens} rows must be a multiple of "
            f"q_block={geometry.q_block} (the clip's query blocks must be the chunks')"
        )


def clip_key_reps(k: Tensor, geometry: VideoGeometry) -> Tensor:
    """Raw mean key of every clip page, float32 ``[B, Hkv, NP, D]``, pooled frame by frame as
    ``runtime.PagePool`` pools the pages it writes (so the scores are the rollout's)."""
    b, length, hkv, d = k.shape
    t = geometry.tokens_per_frame
    frames = length // t
    reps = pool_key_blocks(k.reshape(b * frames, t, hkv, d), geometry.page_size)
    reps = reps.view(b, frames, hkv, geometry.pages_per_frame, d).transpose(1, 2)
    return reps.reshape(b, hkv, frames * geometry.pages_per_frame, d).float()


def _to_device(values: Tensor, device) -> Tensor:
    """A small host-built index tensor on ``device``, copied without the stream
    synchronisation that PyTorch adds to a blocking host-to-device copy (six per chunk and
    layer would make the host wait for the device that often in a training step). From
    pageable memory the driver stages the bytes before the call returns, so the temporary
    may go at once."""
    return values.to(device, non_blocking=True)


def _frame_pages(frames: list[int], first_page: int, ppf: int, rows: tuple, device) -> Tensor:
    """int64 ``[B, Hkv, len(frames), ppf]``: the clip pages of ``frames`` (offset by
    ``first_page``), the same in every (batch, kv head) row."""
    f = torch.tensor(frames, dtype=torch.int64).view(-1, 1)
    ids = first_page + f * ppf + torch.arange(ppf, dtype=torch.int64)
    return _to_device(ids, device).expand(*rows, len(frames), ppf)


def _check_inputs(q: Tensor, k: Tensor, geometry: VideoGeometry, clip_frames: int) -> None:
    length = 2 * clip_frames * geometry.tokens_per_frame
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != length:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{name} must be BLHD [B, {length}, heads, D] (2·{clip_frames} frames of "
                f"{geometry.tokens_per_frame} tokens), got {got}"
            )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B and D, and k's heads "
            "must divide q's"
        )


def _concat(tables: list[BlockTable], geometry: VideoGeometry) -> BlockTable:
    width = max(t.max_blocks for t in tables)
    indices = [torch.nn.functional.pad(t.kv_indices, (0, width - t.max_blocks)) for t in tables]
    return BlockTable(
        torch.cat([t.kv_num_blocks for t in tables], dim=2).contiguous(),
        torch.cat(indices, dim=2).contiguous(),
        geometry.q_block,
        geometry.page_size,
    )


@torch.no_grad()
def clip_table(
    pattern: Pattern,
    geometry: VideoGeometry,
    clip_frames: int,
    q: Tensor,
    k: Tensor,
    scorer: nn.Module | None = None,
    *,
    per_chunk: bool = False,
) -> BlockTable | list[tuple[BlockTable, BlockTable]]:
    """The block table of one layer for a teacher-forced clip (see the module docstring).

    q: ``[B, 2F·T, H, D]``, k: ``[B, 2F·T, Hkv, D]`` — BLHD, post-RoPE, of the
    ``[clean ; noisy]`` sequence (F = ``clip_frames``); scorer: the layer's ``BlockScorer``
    (None: the identity one). Returns a table over the contiguous clip K/V, rows
    ``[clean query blocks ; noisy query blocks]``, or with ``per_chunk`` the list of
    (clean, noisy) tables of every chunk (for comparisons with the rollout's).
    No gradient flows through the selection.
    """
    pattern.check_geometry(geometry)
    check_clip_geometry(geometry, clip_frames)
    _check_inputs(q, k, geometry, clip_frames)
    fpc, ppf, t = geometry.frames_per_chunk, geometry.pages_per_frame, geometry.tokens_per_frame
    b, hkv, device = k.shape[0], k.shape[2], k.device
    rows = (b, hkv)
    noisy_first = clip_frames * ppf
    key_reps = clip_key_reps(k, geometry)
    page_lens = torch.full(key_reps.shape[:3], geometry.page_size, dtype=torch.int32, device=device)
    policy = pattern.cache_policy
    capacity = policy.persistent_capacity
    persistent = torch.full((b, hkv, capacity), -1, dtype=torch.int64, device=device)
    num_persistent = 0
    history: list[int] = []
    chunks = []
    for start in range(0, clip_frames, fpc):
        chunk = list(range(start, start + fpc))
        hist_pages = _frame_pages(history, 0, ppf, rows, device)
        tables = []
        for first_page, row0 in ((0, 0), (noisy_first, clip_frames * t)):
            view = CacheView(
                geometry=geometry,
                num_heads=q.shape[2],
                chunk_start=start,
                history_frames=tuple(history),
                frame_index=_to_device(torch.tensor(history, dtype=torch.int64), device),
                frame_pages=hist_pages,
                chunk_pages=_frame_pages(chunk, first_page, ppf, rows, device),
                persistent_pages=persistent[..., :num_persistent],
                page_lens=page_lens,
                key_reps=key_reps,
                queries=q[:, row0 + start * t : row0 + (start + fpc) * t],
                scorer=scorer,
            )
            tables.append(pattern.select(view))
            if first_page == 0:
                clean_view = view
        chunks.append(tuple(tables))
        # the commit of the clean chunk (runtime.commit.plan_commit / execute_commit)
        retained = set(policy.retained_frames(start + fpc, fpc))
        evicted = [f for f in history if f not in retained]
        if capacity:
            evicted += [f for f in chunk if f not in retained]
        if evicted:
            persistent, num_persistent, _ = policy.update_persistent(
                persistent,
                num_persistent,
                _frame_pages(evicted, 0, ppf, rows, device).reshape(b, hkv, -1),
                key_reps,
                clean_view.pooled_queries() if pattern.needs_scores else None,
                scorer,
            )
        history = [f for f in history + chunk if f in retained]
    if per_chunk:
        return chunks
    return _concat([c for c, _ in chunks] + [n for _, n in chunks], geometry)
