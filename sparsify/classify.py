"""Self- vs cross-attention by data flow, confirmed by module names; and the rewrite decision.

A site is self-attention when q, k and v descend from one common activation (the hidden
state, through projections, norms and RoPE) without passing through another attention: walking
back from each of them stops at the outputs of other attention sites, and the walks meet at a
node computed from a graph input. Cross-attention's k/v come from the context alone, which the
video stream reaches only through earlier cross-attention outputs, so the walks never meet.
A module path naming the layer ("self_attn", "attn1" / "cross_attn", "attn2") must agree;
disagreement leaves the site dense with both verdicts in the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor
from torch.fx import GraphModule, Node

from codegen.spec import HEAD_DIMS
from sparsify.sites.fx import node_value, op_name, view_chain, written_input
from sparsify.sites.records import AttentionSite

SELF, CROSS = "self", "cross"


@dataclass(frozen=True)
class Verdict:
    """kind: "self" or "cross", decided by data flow; `by_module_path` is what the module path
    names (or None); `conflict` explains a disagreement between the two."""

    kind: str
    by_module_path: str | None
    conflict: str | None = None


def kind_from_path(path: str | None) -> str | None:
    """The kind a module path names, deepest component first, or None."""
    if not path:
        return None
    for part in reversed(path.lower().split(".")):
        if "cross" in part or part == "attn2":
            return CROSS
        if "self" in part or part == "attn1":
            return SELF
    return None


def _input_dependent(module: GraphModule) -> set[Node]:
    """Nodes whose value depends on a graph input (not only on parameters and constants)."""
    out: set[Node] = set()
    for node in module.graph.nodes:
        if node.op == "placeholder" or any(a in out for a in node.all_input_nodes):
            out.add(node)
    return out


def _carries_tensors(value: object) -> bool:
    """A tensor, or a tuple/list holding one (e.g. the result of `chunk`)."""
    if isinstance(value, (tuple, list)):
        return any(_carries_tensors(v) for v in value)
    return isinstance(value, Tensor)


# Ops that read some tensor inputs only for their dtype, device or shape.
_METADATA_ONLY = {
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "_assert_tensor_metadata", "sym_size",
}  # fmt: skip
_FIRST_ONLY = {"cast", "expand_as", "view_as", "reshape_as"}  # x.type_as(other), x.to(other)


def writers_of(module: GraphModule) -> dict[Node, list[Node]]:
    """tensor → the in-place ops that write into it (directly or through a view of it)."""
    out: dict[Node, list[Node]] = {}
    for node in module.graph.nodes:
        written = written_input(node)
        if written is not None:
            for tensor in view_chain(written):
                out.setdefault(tensor, []).append(node)
    return out


def _data_inputs(node: Node, writers: dict[Node, list[Node]]) -> list[Node]:
    """The nodes whose values flow into `node`'s value, in-place writes into it included."""
    name = op_name(node) if node.op in ("call_function", "call_method") else None
    if name in _METADATA_ONLY:
        inputs = []
    elif name in _FIRST_ONLY:
        inputs = node.all_input_nodes[:1]
    else:
        inputs = node.all_input_nodes
    return [*inputs, *writers.get(node, ())]


def ancestors(start: Node, barriers: set[Node], writers: dict[Node, list[Node]]) -> set[Node]:
    """start and the tensors it is computed from, not looking past `barriers`.

    Only tensor values are followed: a shape read (`x.shape[0]` in a view) is not data flow;
    nor is an input read only for its dtype (`type_as`, `empty_like`). A tensor filled in
    place (diffusers' RoPE writes into an `empty_like`) descends from what was written.
    """
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node in barriers and node is not start:
            continue
        for parent in _data_inputs(node, writers):
            if parent not in seen and _carries_tensors(node_value(parent)):
                seen.add(parent)
                stack.append(parent)
    return seen


def classify(site: AttentionSite, sites: list[AttentionSite], module: GraphModule) -> Verdict:
    """Self or cross for one site with traced operands (see the module docstring)."""
    barriers = {s.output.node for s in sites if s is not site and s.output is not None}
    barriers |= {s.anchor for s in sites if s is not site}
    live = _input_dependent(module)
    writers = writers_of(module)
    common = live - barriers
    for operand in (site.q, site.k, site.v):
        common &= ancestors(operand.node, barriers, writers)
    by_flow = SELF if common else CROSS
    by_path = kind_from_path(site.module_path)
    conflict = None
    if by_path is not None and by_path != by_flow:
        conflict = (
            f"data flow says {by_flow}-attention but module path "
            f"{site.module_path!r} says {by_path}-attention"
        )
    return Verdict(by_flow, by_path, conflict)


def keep_reason(site: AttentionSite, verdict: Verdict | None) -> str | None:
    """Why a site must stay dense whatever the pattern, or None when it can be rewritten.

    Needs `verdict` for sites with traced operands; sites without them are unsupported.
    """
    if site.unsupported:
        return site.unsupported
    if verdict.conflict:
        return verdict.conflict
    if verdict.kind == CROSS:
        return "cross-attention (k/v come from the context, not the video tokens)"
    if site.mask is not None:
        return "has an arbitrary dense attn_mask (a block pattern cannot honour it)"
    if site.causal:
        return "is_causal=True (a token-causal mask is not a block pattern)"
    if site.dropout != 0.0:
        return f"attention dropout (p={site.dropout})"
    q, k = site.q_shape, site.k_shape
    if q[1] != k[1]:
        return f"self-attention with {k[1]} keys for {q[1]} queries (joint or cached attention)"
    if q[3] not in HEAD_DIMS or site.v_shape[3] != q[3]:
        return f"head_dim {q[3]} (v: {site.v_shape[3]}) is not one of {HEAD_DIMS}"
    if q[2] % k[2]:
        return f"{k[2]} kv heads do not divide {q[2]} query heads"
    scale = site.effective_scale()
    if scale is None or not math.isfinite(scale) or scale <= 0:
        return f"unsupported softmax scale {site.scale}"
    return None
