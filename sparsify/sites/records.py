"""Site records: an attention op of a captured graph as one normalised `AttentionSite`, its
operands (`Operand`) and output (`Output`), and `make_site`, which every finder uses to build
one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from sparsify.sites.fx import layer_of, module_path, node_shape

BHLD = (0, 1, 2, 3)
BLHD_TO_BHLD = (0, 2, 1, 3)


@dataclass(frozen=True)
class Operand:
    """An attention input as the model computed it.

    `node.permute(perm)` is the canonical [B, H, L, D] (4-D). The op saw each of the node's
    heads repeated `groups` times (GQA expanded in the graph; the rewrite passes the Hkv heads)
    and consumed it in `dtype` (the rewrite casts `node` to it).
    """

    node: Node
    perm: tuple[int, ...]
    groups: int = 1
    dtype: torch.dtype | None = None

    @property
    def layout(self) -> str:
        return layout_name(self.perm)

    def blhd_shape(self) -> tuple[int, ...] | None:
        """Shape the attention state receives: [B, L, H(kv), D]."""
        shape = node_shape(self.node)
        if shape is None or len(shape) != 4:
            return None
        b, h, length, d = (shape[p] for p in self.perm)
        return (b, length, h, d)


@dataclass(frozen=True)
class Output:
    """The node whose value the attention produced: `canonical.permute(perm)` gives it, where
    canonical is [B, H, Lq, Dv]; with `merged_heads`, canonical is first flattened to
    [B·H, Lq, Dv]."""

    node: Node
    perm: tuple[int, ...]
    merged_heads: bool = False


@dataclass(frozen=True)
class ScaleFactor:
    """A factor on the scores read from the model's state (a learned temperature): `node`, a
    parameter or buffer, multiplies (exponent 1) or divides (-1) q·kᵀ; `per_head`: one value
    per query head (shape [H, 1, 1] against the [B, H, Lq, Lk] scores), else a single value."""

    node: Node
    exponent: int
    per_head: bool


@dataclass
class AttentionSite:
    """One attention op, normalised. `scale` multiplies q·kᵀ (None: the op's 1/√D default), and
    so does each of `scale_factors` (values the model holds as state, read at run time)."""

    index: int
    form: str  # "sdpa", "sdpa_post_dispatch", "flex", "flash_attn", "unfused"
    op: str
    layout: str  # q's layout as the attention op sees it ("BHLD", "BLHD", "(B·H)LD", ...)
    anchor: Node
    q: Operand | None
    k: Operand | None
    v: Operand | None
    output: Output | None
    scale: float | None = None
    mask: Node | str | None = None
    causal: bool = False
    dropout: float = 0.0
    module_path: str | None = None
    layer: int | None = None
    unsupported: str | None = None  # why no pattern can take this site
    scale_factors: tuple[ScaleFactor, ...] = ()

    @property
    def q_shape(self) -> tuple[int, ...] | None:
        return self.q.blhd_shape() if self.q else None

    @property
    def k_shape(self) -> tuple[int, ...] | None:
        return self.k.blhd_shape() if self.k else None

    @property
    def v_shape(self) -> tuple[int, ...] | None:
        return self.v.blhd_shape() if self.v else None

    @property
    def head_dim(self) -> int | None:
        shape = self.q_shape
        return None if shape is None else shape[3]

    def effective_scale(self) -> float | None:
        """The softmax scale of q·kᵀ, default resolved (None without traced operands)."""
        d = self.head_dim
        if self.scale is not None:
            return self.scale
        return None if d is None else 1.0 / math.sqrt(d)


def layout_name(perm: tuple[int, ...]) -> str:
    """Name of the layout whose permute(perm) is canonical [B, H, L, D] ([B·H, L, D] if 3-D)."""
    if len(perm) == 3:
        return "(B·H)LD" if perm == (0, 1, 2) else "(B·H)" + "".join("?LD"[p] for p in perm[1:])
    return "".join("BHLD"[perm.index(i)] for i in range(4))


def make_site(
    form: str,
    anchor: Node,
    layout: str,
    operands: tuple[tuple[Operand, Operand, Operand], float] | str,
    output: Output | None,
    *,
    scale: float | None = None,
    unsupported: str | None = None,
    **fields: Any,
) -> AttentionSite:
    """Assemble a site; `scale` is the op's own scale argument (None: 1/√D), multiplied by the
    factor folded out of q and k."""
    reason = operands if isinstance(operands, str) else None
    qkv: tuple = (None, None, None) if reason else operands[0]
    if not reason and (operands[1] != 1.0 or scale is not None):
        d = qkv[0].blhd_shape()[3]
        scale = operands[1] * (1.0 / math.sqrt(d) if scale is None else scale)
    if output is None:
        reason = reason or "the attention output is never used"
    target = anchor.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name
    else:
        name = getattr(target, "__name__", str(target))
    path = module_path(anchor)
    return AttentionSite(
        index=-1,
        form=form,
        op=name,
        layout=layout,
        anchor=anchor,
        q=qkv[0],
        k=qkv[1],
        v=qkv[2],
        output=output,
        scale=scale,
        module_path=path,
        layer=layer_of(path),
        unsupported=unsupported or reason,
        **fields,
    )
