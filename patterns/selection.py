"""Vectorised building blocks shared by the patterns: candidate columns, forced-frame masks,
block scores, row-wise top-k and the persistent top-C update.

Nothing here loops over blocks, heads or batch rows; the only host values are counts that
come from frame bookkeeping (Python ints), so no function syncs with the device.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from patterns.block_table import expand_heads
from patterns.cache_view import CacheView
from patterns.chunk_layout import Columns, WindowColumns
from patterns.geometry import VideoGeometry
from patterns.scoring import BlockScorer

__all__ = [
    "columns",
    "own_frame_mask",
    "visible_heads",
    "window_columns",
    "default_scorer",
    "gather_reps",
    "block_logits",
    "topk_mask",
    "top_c_update",
]


def columns(view: CacheView) -> Columns:
    """The candidate columns of a view (persistent first, then history, then the chunk);
    built once per chunk (``view.layout``)."""
    layout = view.layout
    if layout.columns is None:
        layout.columns = _columns(view)
    return layout.columns


def visible_heads(view: CacheView) -> Tensor:
    """bool ``[B, H, 1, N]``: the columns' validity per query head (once per chunk)."""
    layout = view.layout
    if layout.visible_heads is None:
        valid = columns(view).valid
        layout.visible_heads = expand_heads(valid, view.num_heads, "valid")[:, :, None]
    return layout.visible_heads


def _columns(view: CacheView) -> Columns:
    g = view.geometry
    ppf, device = g.pages_per_frame, view.chunk_pages.device
    b, hkv = view.batch, view.num_kv_heads
    hist_ids = view.frame_pages.reshape(b, hkv, -1)
    chunk_ids = view.chunk_pages.reshape(b, hkv, -1)
    ids = torch.cat([view.persistent_pages.clamp(min=0), hist_ids, chunk_ids], dim=-1)
    hist_frame = view.frame_index.repeat_interleave(ppf)
    chunk_frame = view.chunk_frames().repeat_interleave(ppf)
    persist_frame = torch.full((view.num_persistent_slots,), -1, device=device)
    frame = torch.cat([persist_frame, hist_frame, chunk_frame])
    valid = torch.cat(
        [
            view.persistent_pages >= 0,
            (hist_frame >= 0).expand(b, hkv, -1),
            torch.ones(b, hkv, chunk_ids.shape[-1], dtype=torch.bool, device=device),
        ],
        dim=-1,
    )
    return Columns(ids, valid, frame, view.num_persistent_slots, chunk_ids.shape[-1])


@functools.lru_cache(maxsize=64)
def _q_block_frames(geometry: VideoGeometry, device: torch.device) -> Tensor:
    return geometry.q_block_frames(device=device)


def own_frame_mask(view: CacheView) -> Tensor:
    """bool ``[Mq, N]``: column n's page lies in a frame that query block m touches (once
    per chunk)."""
    layout = view.layout
    if layout.own_frames is None:
        frame = columns(view).frame
        q_frames = _q_block_frames(view.geometry, frame.device) + view.chunk_frames()[0]
        layout.own_frames = (frame >= q_frames[:, :1]) & (frame <= q_frames[:, 1:])
    return layout.own_frames


def window_columns(view: CacheView) -> WindowColumns:
    """The window's columns as the torch top-K selection reads them (once per chunk)."""
    layout = view.layout
    if layout.window is None:
        cols = columns(view)
        c = cols.num_persistent
        valid = visible_heads(view)  # [B, H, 1, N]
        window_ids = cols.ids[..., c:]
        rep_index = window_ids.clamp(min=0)[..., None].expand(
            *window_ids.shape, view.key_reps.shape[-1]
        )
        layout.window = WindowColumns(
            rep_index=rep_index.contiguous(),
            allowed=valid[..., c:],
            blocked=~valid[..., c:],
            own=own_frame_mask(view)[:, c:],
            persistent=valid[..., :c],
            ids=cols.ids.to(torch.int32),
        )
    return layout.window


@functools.lru_cache(maxsize=64)
def max_own_pages(geometry: VideoGeometry) -> int:
    """Most pages a query block's own frames hold (host int, from geometry only)."""
    q_frames = _q_block_frames(geometry, torch.device("cpu"))
    frames = int((q_frames[:, 1] - q_frames[:, 0]).max()) + 1
    return frames * geometry.pages_per_frame


@functools.lru_cache(maxsize=16)
def _identity_scorer(heads: int, kv_heads: int, dim: int, device: torch.device) -> BlockScorer:
    return BlockScorer(heads, kv_heads, dim).to(device).requires_grad_(False)


def default_scorer(
    scorer: nn.Module | None, heads: int, kv_heads: int, dim: int, device: torch.device
) -> nn.Module:
    """``scorer``, or an untrained (identity) ``BlockScorer``: raw pooled q·k / sqrt(D)."""
    return scorer if scorer is not None else _identity_scorer(heads, kv_heads, dim, device)


def gather_reps(key_reps: Tensor, ids: Tensor) -> Tensor:
    """Key reps of the listed pages: key_reps ``[B, Hkv, NP, D]``, ids int ``[B, Hkv, N]``
    (negative ids read page 0) → ``[B, Hkv, N, D]``."""
    idx = ids.clamp(min=0)[..., None].expand(*ids.shape, key_reps.shape[-1])
    return key_reps.gather(2, idx)


def block_logits(view: CacheView, key_reps: Tensor) -> Tensor:
    """float32 ``[B, H, Mq, N]`` scores of the view's query blocks against key_reps
    ``[B, Hkv, N, D]`` by the view's scorer."""
    q = view.pooled_queries()
    scorer = default_scorer(view.scorer, q.shape[1], key_reps.shape[1], q.shape[3], q.device)
    return scorer.block_logits(q, key_reps)


def topk_mask(scores: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """bool mask, shaped like ``scores`` ``[..., N]``, of the ``k`` highest entries of every
    row (last dim) among the ``allowed`` ones (ties: any).

    allowed: bool, broadcasts against scores (None: every entry); rows with fewer than k
    allowed entries keep all of them. ``k`` is a host int >= 0 (k >= N keeps every allowed
    entry).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an int >= 0 (entries kept per row), got {k!r}")
    if allowed is None:
        allowed = torch.ones((), dtype=torch.bool, device=scores.device)
    allowed = allowed.expand_as(scores)
    if k >= scores.shape[-1]:
        return allowed.clone()
    if k <= 0:
        return torch.zeros_like(allowed)
    masked = scores.masked_fill(~allowed, float("-inf"))
    picked = torch.zeros_like(allowed).scatter_(-1, masked.topk(k, dim=-1).indices, True)
    return picked & allowed


def top_c_update(
    persistent: Tensor,
    num_persistent: int,
    evicted: Tensor,
    capacity: int,
    key_reps: Tensor,
    query_reps: Tensor,
    scorer: nn.Module | None,
) -> tuple[Tensor, int, Tensor]:
    """P ← TopC(P ∪ E) per (batch, kv head) by the scorer's importance for the clean queries.

    persistent: int64 ``[B, Hkv, C]`` with the ``num_persistent`` valid ids first, −1 after.
    evicted: int64 ``[B, Hkv, E]`` page ids leaving the window (all valid).
    key_reps: the pool's ``[B, Hkv, NP, D]``; query_reps ``[B, H, Mq, D]``.
    Returns (new persistent ``[B, Hkv, C]``, valid ids first and ascending, −1 after; the new
    valid count; freed ids ``[B, Hkv, num_persistent + E − kept]``).
    """
    b, hkv, slots = persistent.shape
    if slots != capacity:
        raise ValueError(f"persistent must have {capacity} slots, got {slots}")
    candidates = torch.cat([persistent[..., :num_persistent], evicted], dim=-1)
    n = candidates.shape[-1]
    keep = min(capacity, n)
    if keep == n:
        kept, freed = candidates, candidates[..., :0]
    else:
        valid = torch.ones_like(candidates, dtype=torch.bool)
        scorer = default_scorer(
            scorer, query_reps.shape[1], hkv, query_reps.shape[3], query_reps.device
        )
        importance = scorer.importance(query_reps, gather_reps(key_reps, candidates), valid)
        top = importance.topk(keep, dim=-1).indices
        kept_mask = torch.zeros_like(valid).scatter_(-1, top, True)
        # stable sort puts the freed columns (False) first, in column order
        order = torch.sort(kept_mask.to(torch.int8), dim=-1, stable=True).indices
        freed = candidates.gather(-1, order[..., : n - keep])
        kept = candidates.gather(-1, order[..., n - keep :])
    kept = kept.sort(dim=-1).values
    new = torch.full_like(persistent, -1)
    new[..., :keep] = kept
    return new, keep, freed
