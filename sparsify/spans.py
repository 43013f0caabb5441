"""Sequences that are not purely video: the spans of a self-attention's q and k.

MM-DiT style models concatenate text (or register) tokens with the video tokens into one
self-attention sequence. A block pattern over such a sequence would take the extra span for a
frame: most queries could no longer see it and the text would stop steering the video. The
graph shows the concatenation: a `cat` whose concatenated dimension has exactly the sequence
length, among the tensors q or k are computed from (not looking past other attention outputs,
but through residual connections, so a stream concatenated once before the first block is
seen by every layer).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from sparsify.classify import ancestors, writers_of
from sparsify.sites.fx import arg, node_shape, op_name
from sparsify.sites.records import AttentionSite


def _concatenation(node: Node, length: int) -> list[int] | None:
    """The span lengths when `node` concatenates tensors along a non-last dimension of size
    `length`, else None."""
    if node.op not in ("call_function", "call_method") or op_name(node) != "cat":
        return None
    shape, pieces = node_shape(node), arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    if shape is None or not isinstance(dim, int) or not isinstance(pieces, (list, tuple)):
        return None
    dim %= len(shape)
    spans = [(node_shape(p) or (0,) * len(shape))[dim] for p in pieces if isinstance(p, Node)]
    spans = [s for s in spans if s]
    if dim == len(shape) - 1 or shape[dim] != length or len(spans) < 2:
        return None
    return spans


def joint_reason(
    site: AttentionSite, sites: list[AttentionSite], module: GraphModule
) -> str | None:
    """Why a self-attention site's sequence is not purely video tokens, or None."""
    barriers = {s.output.node for s in sites if s is not site and s.output is not None}
    barriers |= {s.anchor for s in sites if s is not site}
    writers = writers_of(module)
    order = {n: i for i, n in enumerate(module.graph.nodes)}
    for name, operand, length in (("q", site.q, site.q_shape[1]), ("k", site.k, site.k_shape[1])):
        found = sorted(ancestors(operand.node, barriers, writers), key=order.__getitem__)
        for node in reversed(found):  # the concatenation nearest to the attention
            spans = _concatenation(node, length)
            if spans is not None:
                return (
                    f"joint attention: {name}'s {length}-token sequence comes from {node.name}, "
                    f"a concatenation of spans {spans}, not only video frames (a block pattern "
                    "would treat the extra tokens as a frame)"
                )
    return None
