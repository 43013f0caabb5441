"""`ClipAttention`: one layer's self-attention over a teacher-forced clip under a pattern.

The training-mode counterpart of `runtime.AttentionState`: called with the q, k, v of the
whole ``[clean ; noisy]`` sequence (BLHD, post-RoPE), it builds the layer's training table
(`patterns.training_table.clip_table`: what the cached rollout would let each query block
see, for the same scores) and runs `codegen.pbsa_attention` over the contiguous K/V. The
selection is discrete and runs without gradient; q, k and v get theirs through the kernel
(backend ``"torch"``: plain autograd through its gathers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import codegen
from patterns import BlockScorer, Pattern, VideoGeometry
from patterns.training_table import check_clip_geometry, clip_table
from runtime.checks import check_backend, check_layout

__all__ = ["ClipAttention"]


class ClipAttention(nn.Module):
    """Self-attention spelling ``forward(q, k, v)`` (BLHD ``[B, 2F·T, H(kv), D]`` →
    ``[B, 2F·T, H, D]``) for clips of ``clip_frames`` frames.

    scorer: the layer's `BlockScorer` (None: identity, i.e. mean pooling). It is held by
    reference, not as a submodule, so that swapping this module into a model leaves the
    model's state_dict unchanged (the owner of the scorer keeps, moves and loads it).
    """

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        clip_frames: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scorer: BlockScorer | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        check_layout(pattern, geometry, num_heads, num_kv_heads, head_dim)
        check_clip_geometry(geometry, clip_frames)
        check_backend(backend)
        if scorer is not None and not isinstance(scorer, nn.Module):
            raise TypeError(f"scorer must be a BlockScorer or None, got {type(scorer).__name__}")
        self.pattern, self.geometry, self.clip_frames = pattern, geometry, clip_frames
        self.backend = backend
        object.__setattr__(self, "scorer", scorer)  # a reference, not a child module

    @torch.compiler.disable  # host bookkeeping per chunk; the rest of a compiled model stays
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # Under autocast the RMSNorm'd q, k may stay float32 while v is bf16.
        q, k = q.to(v.dtype), k.to(v.dtype)
        table = clip_table(
            self.pattern, self.geometry, self.clip_frames, q.detach(), k.detach(), self.scorer
        )
        out, _ = codegen.pbsa_attention(
            q,
            k,
            v,
            table.kv_num_blocks,
            table.kv_indices,
            layout="BLHD",
            q_block=self.geometry.q_block,
            page_size=self.geometry.page_size,
            return_lse=False,
            backend=self.backend,
        )
        return out

    def extra_repr(self) -> str:
        return f"{self.pattern}, {self.geometry}, clip_frames={self.clip_frames}"
