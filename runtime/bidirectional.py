"""`FullSequenceAttention`: a pattern applied to bidirectional attention over a whole video.

No cache: q, k, v hold every frame; the pattern's full-sequence table
(`patterns.full_sequence_table`) is built per call and the kernel runs in contiguous mode,
whose pages tile the flat sequence (they may straddle frames).

Differentiable (the training path of a rewritten model): called directly, through
`codegen.pbsa_attention`'s autograd; behind ``sparse_forcing::pbsa_site``, through
``site_backward``. Either way the table is a constant of the step: selection is discrete,
and the scorer learns from a distillation term instead (`patterns.distill`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import Tensor

import codegen
from codegen.api import resolve_backend
from codegen.backward import pbsa_backward
from codegen.problem import validate
from patterns import BlockTable, Pattern, VideoGeometry, full_sequence_table
from runtime.checks import check_backend
from runtime.layer import PatternLayer

__all__ = ["FullSequenceAttention"]


@dataclass(frozen=True)
class _Saved:
    """The last forward's table and LSE, tied to its inputs by identity and version."""

    refs: tuple[weakref.ref, ...]
    versions: tuple[int, ...]
    table: BlockTable
    lse: Tensor

    def matches(self, *inputs: Tensor) -> bool:
        return all(
            r() is t and t._version == n
            for r, t, n in zip(self.refs, inputs, self.versions, strict=True)
        )


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
        self._saved: _Saved | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def _check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
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

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, BlockTable]:
        g = self.geometry
        table = full_sequence_table(self.pattern, q, k, g, self.scorer)
        out, lse = codegen.pbsa_attention(
            q,
            k,
            v,
            table.kv_num_blocks,
            table.kv_indices,
            layout="BLHD",
            q_block=g.q_block,
            page_size=g.page_size,
            backend=self.backend,
        )
        return out, lse, table

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        self._check(q, k, v)
        out, lse, table = self._attend(q, k, v)
        # Kept for site_backward (a few bytes per query row): it then needs no second forward.
        self._saved = _Saved(
            tuple(weakref.ref(t) for t in (q, k, v)),
            tuple(t._version for t in (q, k, v)),
            table,
            lse.detach(),
        )
        return out

    def site_backward(
        self, q: Tensor, k: Tensor, v: Tensor, out: Tensor, grad_out: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of ``forward(q, k, v) = out`` for ``grad_out`` (BLHD, like q, k, v), the
        block table held fixed. Reuses the table and LSE of the forward that produced `out`
        when its inputs are these very tensors, unmodified; recomputes them otherwise."""
        saved = self._saved
        if saved is not None and saved.matches(q, k, v):
            table, lse = saved.table, saved.lse
        else:
            self._check(q, k, v)
            _, lse, table = self._attend(q, k, v)
        g = self.geometry
        p = validate(
            q, k, v, table.kv_num_blocks, table.kv_indices,
            layout="BLHD", q_block=g.q_block, page_size=g.page_size,
        )  # fmt: skip
        return pbsa_backward(p, out, lse, grad_out, backend=resolve_backend(self.backend, q.device))
