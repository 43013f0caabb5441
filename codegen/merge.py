"""Exact merge of two attention results over disjoint key sets, through their LSEs."""

from __future__ import annotations

import torch
from torch import Tensor

from codegen.problem import LAYOUTS


def merge_partials(
    out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor, *, layout: str = "BLHD"
) -> tuple[Tensor, Tensor]:
    """Combine (out, lse) pairs computed over disjoint key sets into the joint result.

    out*: [B, Lq, H, D] (BLHD) or [B, H, Lq, D] (BHLD), any float dtype; lse*: [B, H, Lq]
    natural-log sums (-inf where a part saw nothing). Returns (out in out1's dtype,
    lse float32); rows empty in both parts stay at out 0, lse -inf.

    An LSE of +inf or NaN (an overflowed or broken part) has no defined weight: it is
    rejected with a ValueError naming the argument (this check syncs the device).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if out1.shape != out2.shape or out1.dim() != 4:
        raise ValueError(
            f"out1, out2: expected equal 4-D shapes, got {tuple(out1.shape)}, {tuple(out2.shape)}"
        )
    rows = (out1.shape[0], out1.shape[2], out1.shape[1]) if layout == "BLHD" else out1.shape[:3]
    for name, t in (("lse1", lse1), ("lse2", lse2)):
        if tuple(t.shape) != tuple(rows):
            raise ValueError(f"{name}: expected shape {tuple(rows)}, got {tuple(t.shape)}")
        if (t.isnan() | t.isposinf()).any():
            raise ValueError(f"{name}: expected values < +inf (-inf: empty part), got +inf or NaN")
    lse1, lse2 = lse1.float(), lse2.float()
    top = torch.maximum(lse1, lse2)
    # Rows empty in both parts: shift by 0 so the weights are exp(-inf) = 0, not NaN.
    top = torch.where(torch.isinf(top), 0.0, top)
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    total = w1 + w2
    lse = top + torch.log(total)
    denom = torch.where(total > 0, total, 1.0)
    w1, w2 = w1 / denom, w2 / denom
    if layout == "BLHD":
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    out = w1.unsqueeze(-1) * out1.float() + w2.unsqueeze(-1) * out2.float()
    return out.to(out1.dtype), lse
