"""`FullSequenceAttention`: a pattern applied to bidirectional attention over a whole video.

No cache: q, k, v hold every frame; the pattern's full-sequence table
(`patterns.full_sequence_table`) is built per call and the kernel runs in contiguous mode,
whose pages tile the flat sequence (they may straddle frames).
"""

from __future__ import annotations

from torch import Tensor

import codegen
from patterns import Pattern, VideoGeometry, full_sequence_table
from runtime.checks import check_backend
from runtime.layer import PatternLayer

__all__ = ["FullSequenceAttention"]


class FullSequenceAttention(PatternLayer):
    """Drop-in self-attention ``forward(q, k, v)`` with q ``[B, L, H, D]``, k, v
    ``[B, L, Hkv, D]`` (BLHD, ``L = frames · tokens_per_frame``) → ``[B, L, H, D]``.

    A `PatternLayer`: its ``BlockScorer`` (``self.scorer``) serves patterns that score blocks.
    """

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        backend: str = "auto",
    ):
        super().__init__(pattern, geometry, num_heads, num_kv_heads, head_dim)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        for name, x, heads in (
            ("q", q, self.num_heads),
            ("k", k, self.num_kv_heads),
            ("v", v, self.num_kv_heads),
        ):
            if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[2:] != (heads, self.head_dim):
                raise ValueError(
                    f"{name} must be BLHD [B, L, {heads}, {self.head_dim}], got "
                    f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
                )
        if k.shape != v.shape or k.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                "must share B and L (and k, v their shape)"
            )
        g = self.geometry
        table = full_sequence_table(self.pattern, q, k, g, self.scorer)
        out, _ = codegen.pbsa_attention(
            q,
            k,
            v,
            table.kv_num_blocks,
            table.kv_indices,
            layout="BLHD",
            q_block=g.q_block,
            page_size=g.page_size,
            return_lse=False,
            backend=self.backend,
        )
        return out
