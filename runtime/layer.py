"""`PatternLayer`: what every attention module that runs a pattern holds.

The pattern, the video geometry, the head layout and the layer's learned ``BlockScorer``
(``self.scorer``, so its parameters are in the state_dict), checked once here for the
cached (`runtime.AttentionState`) and the bidirectional (`runtime.FullSequenceAttention`)
forms.
"""

from __future__ import annotations

from torch import nn

from patterns import BlockScorer, Pattern, VideoGeometry
from runtime.checks import check_layout

__all__ = ["PatternLayer"]


class PatternLayer(nn.Module):
    """Base of one layer's pattern attention: ``num_heads`` query heads and
    ``num_kv_heads`` (dividing it) KV heads of ``head_dim``."""

    def __init__(
        self,
        pattern: Pattern,
        geometry: VideoGeometry,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ):
        super().__init__()
        check_layout(pattern, geometry, num_heads, num_kv_heads, head_dim)
        self.pattern, self.geometry = pattern, geometry
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scorer = BlockScorer(num_heads, num_kv_heads, head_dim)

    def extra_repr(self) -> str:
        return f"{self.pattern}, {self.geometry}"
