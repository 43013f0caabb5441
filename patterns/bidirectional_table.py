"""Block tables for bidirectional full-sequence attention (no cache): a whole video at once.

The keys are contiguous — ``[B, num_frames · T, Hkv, D]`` — and the kernel's contiguous mode
cuts them into pages of ``page_size`` tokens tiling the **flat** sequence, so here a page may
straddle two frames (unlike the cache's pages, which tile each frame on its own). Query blocks
of ``q_block`` rows tile the same sequence. Used when a non-causal video DiT (e.g. diffusers'
``WanTransformer3DModel``) is sparsified.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn

from patterns.block_table import BlockTable
from patterns.geometry import VideoGeometry, token_block_frames
from patterns.library import FullSequenceLayout, Pattern
from patterns.scoring import pool_key_blocks, pool_query_blocks

__all__ = ["full_sequence_layout", "full_sequence_table"]


@functools.lru_cache(maxsize=32)
def full_sequence_layout(
    geometry: VideoGeometry, num_frames: int, device: torch.device
) -> FullSequenceLayout:
    """Frame span of every query block and key block of a ``num_frames``-frame video."""
    tokens = num_frames * geometry.tokens_per_frame
    t = geometry.tokens_per_frame
    q_frames = token_block_frames(tokens, geometry.q_block, t)  # on the host: no sync
    return FullSequenceLayout(
        geometry,
        num_frames,
        q_frames.to(device),
        token_block_frames(tokens, geometry.page_size, t, device),
        int((q_frames[:, 1] - q_frames[:, 0]).max()) + 1,
    )


def full_sequence_table(
    pattern: Pattern,
    q: Tensor,
    k: Tensor,
    geometry: VideoGeometry,
    scorer: nn.Module | None = None,
) -> BlockTable:
    """Block table of ``pattern`` for bidirectional attention over a whole video.

    q: ``[B, L, H, D]``, k: ``[B, L, Hkv, D]`` (BLHD, post-RoPE), ``L = num_frames · T``.
    Table rows are query blocks of ``geometry.q_block`` rows; page ids are key blocks of
    ``geometry.page_size`` tokens of the flat sequence (the last one partial).
    scorer: the layer's ``BlockScorer`` (None: untrained, raw pooled q·k).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be BLHD 4-D tensors, got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    b, length, heads, dim = q.shape
    if k.shape[0] != b or k.shape[1] != length or k.shape[3] != dim or heads % k.shape[2]:
        raise ValueError(
            f"k must be [B={b}, L={length}, Hkv | {heads}, D={dim}], got {tuple(k.shape)}"
        )
    if length % geometry.tokens_per_frame:
        raise ValueError(
            f"q's length {length} is not a whole number of {geometry.tokens_per_frame}-token frames"
        )
    layout = full_sequence_layout(geometry, length // geometry.tokens_per_frame, q.device)
    if pattern.needs_scores:
        layout = dataclasses.replace(
            layout,
            q_reps=pool_query_blocks(q, geometry.q_block),
            k_reps=pool_key_blocks(k, geometry.page_size),
            scorer=scorer,
        )
    visible, bound = pattern.full_sequence_visibility(layout)
    mq = layout.q_frames.shape[0]
    shared_rows = visible.shape[2] == 1
    visible = visible.expand(b, heads, visible.shape[2], visible.shape[3])
    return BlockTable.from_visibility(
        visible,
        geometry.q_block,
        geometry.page_size,
        max_blocks=bound,
        num_q_blocks=mq if shared_rows else None,
    )
