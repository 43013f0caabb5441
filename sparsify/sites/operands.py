"""Tracing attention operands back to the tensors the model computed.

From the tensor an attention op consumed, the walk steps back through layout ops
(transpose/permute/casts/no-op expands), merges of (B, H) into one dimension, GQA head repeats
(so k/v keep their Hkv heads) and, for q and k, multiplications by constants (folded into the
site's scale). `scalar_factor` and `state_factor` read the scalings of the scores.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from sparsify.sites.fx import (
    arg,
    constant,
    is_written,
    node_dtype,
    node_shape,
    op_name,
    tensor_input,
)
from sparsify.sites.records import Operand


def compose_perm(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[int, ...]:
    """Permutation p with x.permute(p) == x.permute(inner).permute(outer)."""
    return tuple(inner[i] for i in outer)


def _layout_perm(node: Node, rank: int) -> tuple[int, ...] | None:
    """The permutation a transpose/permute node applies to its input, or None."""
    name = op_name(node)
    if name == "mT":
        p = list(range(rank))
        p[-2], p[-1] = p[-1], p[-2]
        return tuple(p)
    if name == "transpose":
        a, b = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        p = list(range(rank))
        p[a % rank], p[b % rank] = p[b % rank], p[a % rank]
        return tuple(p)
    if name == "permute":
        dims = node.args[1:] if node.op == "call_method" else (arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        if not all(isinstance(d, int) for d in dims) or len(dims) != rank:
            return None
        return tuple(d % rank for d in dims)
    return None


_PASS_THROUGH = {"cast", "contiguous", "clone", "alias", "detach", "lift_fresh_copy"}


def _upcast(src: Node, node: Node) -> bool:
    a, b = node_dtype(src), node_dtype(node)
    return (
        a is not None
        and b is not None
        and a.is_floating_point
        and b.is_floating_point
        and torch.finfo(a).bits < torch.finfo(b).bits
    )


def _mul_or_div(node: Node) -> tuple[str, object, object] | None:
    """("mul" | "div", a, b) for a·b and a/b."""
    name = op_name(node)
    return (name, *node.args[:2]) if name in ("mul", "div") and len(node.args) >= 2 else None


def scalar_factor(node: Node) -> tuple[Node, float] | None:
    """(tensor, c) when node is tensor·c or tensor/c with a constant c."""
    if (parts := _mul_or_div(node)) is None:
        return None
    name, a, b = parts
    if name == "mul" and node_shape(a) is None:
        a, b = b, a
    value = constant(b)
    if node_shape(a) is None or value is None or value == 0:
        return None
    return a, value if name == "mul" else 1.0 / value


_STATE_VIEWS = {"view", "unsqueeze", "squeeze", "expand", "flatten"}


def _state(value: object) -> Node | None:
    """The parameter or buffer (`get_attr` node) `value` is, through casts and views."""
    node = value
    while isinstance(node, Node) and node.op in ("call_function", "call_method"):
        if op_name(node) not in _PASS_THROUGH | _STATE_VIEWS or tensor_input(node) is None:
            return None
        node = tensor_input(node)
    return node if isinstance(node, Node) and node.op == "get_attr" else None


def state_factor(node: Node) -> tuple[Node, Node, int] | None:
    """(tensor, factor, exponent) when node is tensor·factor (1) or tensor/factor (-1) with a
    factor that is a parameter or buffer (through casts and views): a learned temperature."""
    if (parts := _mul_or_div(node)) is None:
        return None
    name, a, b = parts
    if name == "mul" and _state(b) is None:
        a, b = b, a
    if not isinstance(a, Node) or node_shape(a) is None or _state(a) is not None:
        return None
    if _state(b) is None or node_shape(b) is None:
        return None
    return a, b, 1 if name == "mul" else -1


def trace_operand(
    node: Node, perm: tuple[int, ...], *, scaled: bool
) -> tuple[Operand, float] | str:
    """Walk back from the tensor an attention op consumed to the tensor the model computed.

    `perm` brings `node` to canonical order ([B, H, L, D], or [B·H, L, D] when 3-D). Steps
    through transposes/permutes, casts/copies, no-op expands, (B, H) merges, GQA
    `repeat_interleave` over the head dim and, with `scaled` (q and k), constant factors.
    Returns the 4-D operand and the product of the folded factors, or a reason string.
    The operand's dtype is what the op consumed, or the pre-upcast dtype when the op's input
    was upcast for compute (the state then gets the model's activation dtype).
    """
    dtype = node_dtype(node)
    first_cast = True
    factor, groups = 1.0, 1
    while node.op in ("call_function", "call_method"):
        shape, src = node_shape(node), tensor_input(node)
        src_shape = node_shape(src) if src is not None else None
        if shape is None or src_shape is None or is_written(src):
            break  # a tensor written in place may hold other values by the time of the op
        name, rank = op_name(node), len(shape)
        step = _layout_perm(node, rank)
        if step is not None:
            perm = compose_perm(perm, step)
        elif name in _PASS_THROUGH or (name == "expand" and src_shape == shape):
            if name == "cast" and node_dtype(src) != node_dtype(node):
                if first_cast and _upcast(src, node):
                    dtype = node_dtype(src)
                first_cast = False
        elif name == "repeat_interleave" and rank == 4:
            repeats, dim = constant(arg(node, 1, "repeats")), arg(node, 2, "dim")
            if repeats is None or not isinstance(dim, int) or dim % 4 != perm[1]:
                break
            groups *= int(repeats)
        elif (
            name in ("view", "flatten")
            and rank == 3
            and len(src_shape) == 4
            and perm[0] == 0
            and src_shape[0] * src_shape[1] == shape[0]
            and src_shape[2:] == shape[1:]
        ):
            perm = (0, 1) + tuple(p + 1 for p in perm[1:])
        elif scaled and (scaled_by := scalar_factor(node)) is not None:
            src, value = scaled_by
            factor *= value
        else:
            break
        node = src
    shape = node_shape(node)
    if shape is None or len(shape) != 4:
        return f"{node.name}: 3-D attention input whose head split is not visible in the graph"
    return Operand(node, perm, groups, dtype), factor


def trace_qkv(
    q: Node, k: Node, v: Node, perms: tuple[tuple[int, ...], ...]
) -> tuple[tuple[Operand, Operand, Operand], float] | str:
    """Trace the three operands back (see `trace_operand`); `perms[i]` brings operand i to
    canonical order. Returns the operands and the constant factor folded out of q and k."""
    traced, factor = [], 1.0
    for name, node, perm in zip("qkv", (q, k, v), perms, strict=True):
        shape = node_shape(node)
        if shape is None or len(shape) != len(perm):
            return f"{name} is not a {len(perm)}-D tensor"
        result = trace_operand(node, perm, scaled=name != "v")
        if isinstance(result, str):
            return result
        traced.append(result[0])
        factor *= result[1]
    qo, ko, vo = traced
    if qo.groups != 1 or ko.groups != vo.groups:
        return "q, k and v repeat their heads inconsistently"
    return (qo, ko, vo), factor
