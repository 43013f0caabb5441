"""Finding attention in a graph: the unfused form by subgraph matching on a networkx view.

The fx graph is viewed as a networkx DiGraph over the nodes that can take part in an unfused
attention — matrix products (matmul/bmm/@/einsum), softmax, constant scalings, mask additions
(add/masked_fill) and dropout — with every value-preserving op in between (casts, copies,
views, no-op expands) contracted away. Small pattern graphs

    QK(matmul) → [scale | mask]* → softmax → [dropout] → PV(matmul)

are matched against it with VF2 (`networkx.algorithms.isomorphism.DiGraphMatcher`), so any
spelling whose ops reduce to those kinds matches. Each match is then read through the
products' einsum equations (a matmul/bmm is `…xy,…yz->…xz`) to find which operand is q, k and
v and how each is laid out. `find_sites` combines these with the fused forms of
`sparsify.sites.fused` (`sparsify.sites.find`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import networkx as nx
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import nn
from torch.fx import GraphModule, Node

from sparsify.sites.fx import arg, constant, node_shape, op_name, tensor_input
from sparsify.sites.operands import scalar_factor, state_factor, trace_qkv
from sparsify.sites.records import AttentionSite, Output, ScaleFactor, layout_name, make_site

_PRODUCTS = {"matmul", "bmm", "einsum", "baddbmm"}
_CONTRACTED = {"cast", "contiguous", "clone", "alias", "detach", "view", "lift_fresh_copy"}
_MASKS = {"add", "masked_fill"}

# Chains between the two products; longer patterns are tried first so that a softmax is
# matched with everything in front of it.
_MIDDLES = (
    ("scale", "mask", "scale"),
    ("scale", "mask"),
    ("mask", "scale"),
    ("scale", "scale"),
    ("scale",),
    ("mask",),
    (),
)
_TAILS = (("dropout",), ())


def _kind(node: Node, module: GraphModule) -> str | None:
    """The role a node can play in an unfused attention, "through" when it only carries its
    input along, or None."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return None
    name = op_name(node, module)
    if name in _PRODUCTS:
        return "matmul"
    if name == "softmax":
        return "softmax"
    if name == "dropout":
        return "dropout"
    if name in _MASKS:
        return "mask"
    if scalar_factor(node) is not None or state_factor(node) is not None:
        return "scale"
    if name in _CONTRACTED or (
        name == "expand" and node_shape(node) == node_shape(tensor_input(node))
    ):
        return "through"
    return None


def _tensor_operands(node: Node, module: GraphModule) -> list[Node]:
    """Tensor operands in order; einsum's operands may come as a list or as varargs; baddbmm's
    are its two batches (its `input` is a bias, read by `_baddbmm_terms`)."""
    name = op_name(node, module)
    if name == "baddbmm":
        return [a for a in node.args[1:3] if isinstance(a, Node)]
    if name == "einsum":
        rest = node.args[1:]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = rest[0]
        return [a for a in rest if isinstance(a, Node)]
    return [a for a in node.args if isinstance(a, Node) and node_shape(a) is not None]


@dataclass
class GraphView:
    """The contracted networkx view of an fx graph (see the module docstring)."""

    graph: nx.DiGraph
    representative: dict[Node, Node]  # every node → the node whose value it carries


def graph_view(module: GraphModule) -> GraphView:
    graph = nx.DiGraph()
    rep: dict[Node, Node] = {}
    for node in module.graph.nodes:  # topological order: inputs are resolved first
        kind = _kind(node, module)
        src = tensor_input(node)
        rep[node] = rep.get(src, src) if kind == "through" and src is not None else node
        if kind in (None, "through"):
            continue
        graph.add_node(node, kind=kind)
        for pos, operand in enumerate(_tensor_operands(node, module)):
            source = rep.get(operand, operand)
            if source in graph:
                graph.add_edge(source, node, pos=pos)
    return GraphView(graph, rep)


def _pattern(middle: tuple[str, ...], tail: tuple[str, ...]) -> nx.DiGraph:
    kinds = ("matmul", *middle, "softmax", *tail, "matmul")
    pattern = nx.DiGraph()
    for i, kind in enumerate(kinds):
        pattern.add_node(i, kind=kind)
    pattern.add_edges_from((i, i + 1) for i in range(len(kinds) - 1))
    return pattern


PATTERNS: tuple[nx.DiGraph, ...] = tuple(
    _pattern(m, t) for t, m in itertools.product(_TAILS, _MIDDLES)
)


def match_chains(view: GraphView) -> Iterator[list[Node]]:
    """Each unfused attention as its chain [QK, (scale|mask)*, softmax, (dropout), PV]."""
    matched: set[Node] = set()
    for pattern in sorted(PATTERNS, key=len, reverse=True):
        matcher = DiGraphMatcher(
            view.graph, pattern, node_match=lambda a, b: a["kind"] == b["kind"]
        )
        for mapping in matcher.subgraph_monomorphisms_iter():
            chain = [n for n, _ in sorted(mapping.items(), key=lambda item: item[1])]
            softmax = next(n for n in chain if view.graph.nodes[n]["kind"] == "softmax")
            if softmax in matched:
                continue
            matched.add(softmax)
            yield chain


def _consumers(node: Node, view: GraphView) -> set[Node]:
    """Users of node's value, looking through contracted ops (and ignoring dead users)."""
    out: set[Node] = set()
    for user in node.users:
        if view.representative.get(user) is node and user not in view.graph:
            out |= _consumers(user, view)
        elif user.users or user.op == "output":
            out.add(user)
    return out


def _equation(node: Node, module: GraphModule) -> tuple[list[Node], str] | None:
    """(operands, einsum equation) of a matrix product, or None for unsupported spellings."""
    operands = _tensor_operands(node, module)
    if len(operands) != 2:
        return None
    if op_name(node, module) == "einsum":
        equation = str(node.args[0]).replace(" ", "")
        if "..." in equation or "->" not in equation:
            return None
        return operands, equation
    ranks = [len(node_shape(o) or ()) for o in operands]
    if ranks[0] != ranks[1] or ranks[0] not in (3, 4):
        return None
    batch = "bh"[: ranks[0] - 2]
    return operands, f"{batch}xy,{batch}yz->{batch}xz"


def _perm(letters: str, canonical: str) -> tuple[int, ...] | None:
    if sorted(letters) != sorted(canonical) or len(set(letters)) != len(letters):
        return None
    return tuple(letters.index(c) for c in canonical)


def _read_qk(node: Node, module: GraphModule):
    """(q, k, perm_q, perm_k) from the score product, or None."""
    parsed = _equation(node, module)
    if parsed is None:
        return None
    (a, b), equation = parsed
    inputs, out = equation.split("->")
    x, y = inputs.split(",")
    if len(out) not in (3, 4):
        return None
    batch, lq, lk = out[:-2], out[-2], out[-1]
    (q, xq), (k, xk) = ((a, x), (b, y)) if lq in x else ((b, y), (a, x))
    contracted = (set(x) & set(y)) - set(out)
    if len(contracted) != 1:
        return None
    d = contracted.pop()
    perm_q, perm_k = _perm(xq, batch + lq + d), _perm(xk, batch + lk + d)
    if perm_q is None or perm_k is None:
        return None
    return q, k, perm_q, perm_k


def _read_pv(node: Node, probs: Node, view: GraphView, module: GraphModule):
    """(v, perm_v, output) from the value product whose probability operand is `probs`."""
    parsed = _equation(node, module)
    if parsed is None:
        return None
    operands, equation = parsed
    inputs, out = equation.split("->")
    letters = inputs.split(",")
    which = [i for i, o in enumerate(operands) if view.representative.get(o, o) is probs]
    if len(which) != 1:
        return None
    xp, xv = letters[which[0]], letters[1 - which[0]]
    v = operands[1 - which[0]]
    contracted = (set(xp) & set(xv)) - set(out)
    if len(contracted) != 1 or xp[-1] not in contracted or len(out) not in (3, 4):
        return None
    lk = xp[-1]
    batch = "".join(c for c in xp[:-1] if c in xv and c in out)
    rest_q = [c for c in xp[:-1] if c not in batch]
    rest_v = [c for c in xv if c not in batch and c != lk]
    if len(rest_q) != 1 or len(rest_v) != 1 or len(batch) != len(out) - 2:
        return None
    lq, dv = rest_q[0], rest_v[0]
    canonical = batch + lq + dv
    perm_v = _perm(xv, batch + lk + dv)
    if perm_v is None or _perm(out, canonical) is None:
        return None
    # The product's result is canonical.permute(p) with p[i] = canonical.index(out[i]).
    to_out = tuple(canonical.index(c) for c in out)
    return v, perm_v, Output(node, to_out, merged_heads=len(out) == 3)


def _softmax_dim_ok(node: Node, module: GraphModule) -> bool:
    rank = len(node_shape(node) or ())
    if node.op == "call_module":
        dim = module.get_submodule(str(node.target)).dim
    else:
        dim = arg(node, 1, "dim")
    return isinstance(dim, int) and rank > 0 and dim % rank == rank - 1


def _dropout_p(node: Node, module: GraphModule) -> float:
    if node.op == "call_module":
        sub = module.get_submodule(str(node.target))
        return sub.p if isinstance(sub, nn.Dropout) and sub.training else 0.0
    p, train = arg(node, 1, "p", 0.5), arg(node, 2, "train", arg(node, 2, "training", True))
    p = constant(p)
    return (float("nan") if p is None else p) if train else 0.0


def _baddbmm_terms(node: Node) -> tuple[float | None, Node | None]:
    """(alpha, the bias when beta is not 0) of a baddbmm: beta·input + alpha·(batch1 @ batch2)."""
    alpha, beta = constant(node.kwargs.get("alpha", 1)), constant(node.kwargs.get("beta", 1))
    return alpha, node.args[0] if beta != 0.0 else None


def _scale_factor(node: Node, q_shape: tuple[int, ...]) -> ScaleFactor | str:
    """The learned factor of a "scale" node that is not a constant, or why it cannot be one."""
    _, factor, exponent = state_factor(node)
    shape, scores = node_shape(factor), node_shape(node)
    if math.prod(shape) == 1:
        return ScaleFactor(factor, exponent, per_head=False)
    b, _, h, _ = q_shape
    aligned = (1,) * (len(scores) - len(shape)) + shape
    per_head = (
        len(scores) == 4
        and len(shape) <= 4
        and scores[:2] == (b, h)
        and aligned[:2] == (1, h)
        and aligned[2:] == (1, 1)
    )
    if per_head:
        return ScaleFactor(factor, exponent, per_head=True)
    return (
        f"the scores are scaled by a learned factor {factor.name} of shape {list(shape)}, "
        f"which is neither one value nor one per head of the {list(scores)} scores"
    )


def _unread(chain: list[Node], softmax: Node, why: str) -> AttentionSite:
    """A matched chain that cannot be rewritten: a plan row with the reason."""
    return make_site(
        "unfused", chain[-1], "?", f"softmax {softmax.name} between matrix products: {why}", None
    )


def _site(chain: list[Node], view: GraphView, module: GraphModule) -> AttentionSite:
    qk, pv = chain[0], chain[-1]
    kinds = [view.graph.nodes[n]["kind"] for n in chain]
    softmax = chain[kinds.index("softmax")]
    if not _softmax_dim_ok(softmax, module):
        return _unread(chain, softmax, "the softmax is not over the last dimension")
    if op_name(pv, module) == "baddbmm":
        return _unread(
            chain, softmax, "the value product is a baddbmm (it adds a bias to the output)"
        )
    read_qk = _read_qk(qk, module)
    read_pv = _read_pv(pv, chain[-2], view, module)
    if read_qk is None or read_pv is None:
        which = "score (q·kᵀ)" if read_qk is None else "value (p·v)"
        return _unread(chain, softmax, f"the {which} product does not read as attention")
    q, k, perm_q, perm_k = read_qk
    v, perm_v, output = read_pv
    scale, mask, dropout = 1.0, None, 0.0
    if op_name(qk, module) == "baddbmm":
        alpha, mask = _baddbmm_terms(qk)
        scale = float("nan") if alpha is None else alpha
    learned = []
    for node, kind in zip(chain[1:-1], kinds[1:-1], strict=True):
        if kind == "scale":
            if scalar_factor(node) is not None:
                scale *= scalar_factor(node)[1]
            else:
                learned.append(node)
        elif kind == "mask":
            if op_name(node) == "masked_fill":
                mask = arg(node, 1, "mask")
            else:
                mask = next(a for a in node.args[:2] if view.representative.get(a, a) not in chain)
        elif kind == "dropout":
            dropout = _dropout_p(node, module)
    leaks = [
        n.name for n, nxt in zip(chain, chain[1:], strict=False) if _consumers(n, view) != {nxt}
    ]
    unsupported = (
        f"intermediate attention values ({', '.join(leaks)}) are used outside the attention"
        if leaks
        else None
    )
    operands = trace_qkv(q, k, v, (perm_q, perm_k, perm_v))
    factors: list[ScaleFactor] = []
    if not isinstance(operands, str):
        qs, ks, vs = (o.blhd_shape() for o in operands[0])
        if qs[0] != ks[0] or qs[3] != ks[3] or ks[:3] != vs[:3]:
            operands = f"inconsistent q/k/v shapes {qs}, {ks}, {vs}"
        else:
            for node in learned:
                factor = _scale_factor(node, qs)
                if isinstance(factor, str):
                    unsupported = unsupported or factor
                else:
                    factors.append(factor)
    return make_site(
        "unfused", pv, layout_name(perm_q), operands, output,
        scale=scale, mask=mask, dropout=dropout, unsupported=unsupported,
        scale_factors=tuple(factors),
    )  # fmt: skip


_NEAR = 6  # ops between a softmax and the products around it, for it to look like attention


def _near_product(start: Node, module: GraphModule, forward: bool) -> Node | None:
    """A matrix product within `_NEAR` ops of `start` (its inputs, or with `forward` its users)."""
    frontier, seen = [start], {start}
    for _ in range(_NEAR):
        step = []
        for node in frontier:
            for nxt in node.users if forward else node.all_input_nodes:
                if nxt in seen:
                    continue
                seen.add(nxt)
                if nxt.op in ("call_function", "call_method") and op_name(nxt) in _PRODUCTS:
                    return nxt
                step.append(nxt)
        frontier = step
    return None


def _unmatched(module: GraphModule, view: GraphView, matched: set[Node]) -> Iterator[AttentionSite]:
    """Softmaxes that sit between two matrix products but matched no pattern: plan rows that
    name the ops which broke the match."""
    for node in module.graph.nodes:
        if node in matched or _kind(node, module) != "softmax":
            continue
        before = _near_product(node, module, forward=False)
        after = _near_product(node, module, forward=True)
        if before is None or after is None:
            continue
        between = [
            op_name(n, module)
            for n in (*_path(before, node), *_path(node, after))
            if view.representative.get(n, n) is n and _kind(n, module) is None
        ]
        found = f"{', '.join(dict.fromkeys(between))}" if between else "their layout"
        why = (
            f"looks like attention ({before.name} → softmax {node.name} → {after.name}) but is "
            f"not matched: the scores pass through {found}, which is not a constant scale, a "
            "learned temperature, a mask or a cast"
        )
        yield make_site("unfused", node, "?", why, None)


def _path(start: Node, end: Node) -> list[Node]:
    """The nodes strictly between start and end on one shortest data path."""
    parents: dict[Node, Node | None] = {start: None}
    frontier = [start]
    while frontier and end not in parents:
        step = []
        for node in frontier:
            for user in node.users:
                if user not in parents:
                    parents[user] = node
                    step.append(user)
        frontier = step
    out, node = [], parents.get(end)
    while node is not None and node is not start:
        out.append(node)
        node = parents[node]
    return out[::-1]


def find_unfused(module: GraphModule) -> Iterator[AttentionSite]:
    """Sites of the unfused form softmax(q·kᵀ·scale [+ mask]) · v, and a site with the reason
    for every softmax between matrix products that cannot be rewritten."""
    view = graph_view(module)
    matched: set[Node] = set()
    for chain in match_chains(view):
        matched.update(chain)
        yield _site(chain, view, module)
    yield from _unmatched(module, view, matched)
