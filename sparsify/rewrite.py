"""Rewrite attention sites of a captured graph into `sparse_forcing::pbsa_site` calls.

For each chosen site the pass inserts, before the attention op: q/k/v taken from the tensors
the model computed (see `sparsify.sites.operands.trace_operand`), cast to the dtype the op
consumed and permuted to BLHD — k/v keep their Hkv heads, GQA is not expanded — and q multiplied by
scale·√D when the site's softmax scale is not the kernel's default 1/√D, and by each learned
factor of the scores (a 0-dim or per-head parameter or buffer, reshaped to [1, 1, H, 1]); then
the op call; then the result brought back to the layout, (B·H merge,) and dtype of the site's
output, whose uses it takes over. The attention op and whatever only it used become dead code
and are removed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Mapping, Sequence

import torch
import torch._functorch.predispatch as predispatch
from torch.fx import Graph, GraphModule, Node

from sparsify.ops import PBSA_SITE
from sparsify.sites.fx import node_dtype, op_name, written_input
from sparsify.sites.operands import compose_perm
from sparsify.sites.records import BLHD_TO_BHLD, AttentionSite, Operand

aten = torch.ops.aten


_KEPT_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


class _Builder:
    """Creates aten calls before one node, carrying that node's module-stack metadata."""

    def __init__(self, graph: Graph, before: Node):
        self.graph, self.before = graph, before
        self.meta = {k: v for k, v in before.meta.items() if k in _KEPT_META}

    def call(self, target, args: tuple, kwargs: dict | None = None) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.call_function(target, args, kwargs or {})
        node.meta.update(self.meta)
        return node

    def permute(self, node: Node, perm: tuple[int, ...]) -> Node:
        if perm == tuple(range(len(perm))):
            return node
        return self.call(aten.permute.default, (node, list(perm)))

    def cast(self, node: Node, dtype: torch.dtype | None, current: torch.dtype | None) -> Node:
        if dtype is None or dtype == current:
            return node
        return self.call(aten._to_copy.default, (node,), {"dtype": dtype})


def _blhd(build: _Builder, operand: Operand) -> Node:
    """operand.node cast to the op's dtype and permuted to [B, L, H(kv), D]."""
    x = build.cast(operand.node, operand.dtype, node_dtype(operand.node))
    return build.permute(x, compose_perm(BLHD_TO_BHLD, operand.perm))


def _rewrite_site(graph: Graph, site: AttentionSite, site_id: int) -> None:
    # Everything goes before the attention op: it needs only the operands, which precede it,
    # and the op's output (at or after it) is what gets replaced.
    build = _Builder(graph, site.anchor)
    q, k, v = (_blhd(build, o) for o in (site.q, site.k, site.v))
    factor = site.effective_scale() * math.sqrt(site.head_dim)
    if not math.isclose(factor, 1.0, rel_tol=1e-12):
        q = build.call(aten.mul.Tensor, (q, factor))
    for learned in site.scale_factors:
        # Read at run time, so that a trained or reloaded temperature is honoured.
        shape = [1, 1, site.q_shape[2], 1] if learned.per_head else []
        t = build.cast(learned.node, site.q.dtype, node_dtype(learned.node))
        t = build.call(aten.reshape.default, (t, shape))
        q = build.call(aten.mul.Tensor if learned.exponent > 0 else aten.div.Tensor, (q, t))
    out = build.call(PBSA_SITE, (q, k, v, site_id))  # [B, Lq, H, Dv]
    if site.output.merged_heads:
        b, lq, h, dv = (*site.q_shape[:3], site.v_shape[3])
        out = build.permute(out, BLHD_TO_BHLD)
        out = build.call(aten.reshape.default, (out, [b * h, lq, dv]))
        out = build.permute(out, site.output.perm)
    else:
        out = build.permute(out, compose_perm(site.output.perm, BLHD_TO_BHLD))
    out = build.cast(out, node_dtype(site.output.node), site.q.dtype)
    site.output.node.replace_all_uses_with(out)


# Pre-dispatch export brackets vmap/jvp regions (e.g. FlexAttention's block-mask
# construction) with calls that have no outputs: a region lives or dies as a whole.
_OPENING = {
    getattr(predispatch, name)
    for name in ("_vmap_increment_nesting", "_jvp_increment_nesting", "_enter_dual_level")
    if hasattr(predispatch, name)  # the set differs between torch versions
}
_CLOSING = {
    getattr(predispatch, name)
    for name in ("_vmap_decrement_nesting", "_jvp_decrement_nesting", "_exit_dual_level")
    if hasattr(predispatch, name)
}
_LOADER = getattr(predispatch, "lazy_load_decompositions", None)
_FACTORIES = {
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones", "empty", "full",
    "zeros_like", "ones_like", "empty_like", "full_like", "clone", "arange",
}  # fmt: skip


def _fresh_mutated(node: Node) -> Node | None:
    """The tensor an in-place op writes when the graph itself created it, else None."""
    written = written_input(node)
    return written if written is not None and op_name(written) in _FACTORIES else None


def remove_dead_code(graph: Graph, removable: Collection[Node] = ()) -> None:
    """Dead-code elimination that also drops in-place writes into dead graph-created tensors
    and vmap/jvp regions with nothing live inside (fx's own pass keeps both), and the
    `removable` nodes once unused even if fx deems them impure (attention ops with a dropout
    seed are tagged nondeterministic)."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    live: set[Node] = set()
    for node in reversed(nodes):
        if node.op in ("output", "placeholder"):
            live.add(node)
        elif node.target in _OPENING or node.target in _CLOSING:
            continue  # decided with their region below
        elif _LOADER is not None and node.target is _LOADER:
            continue
        elif any(u in live for u in node.users):
            live.add(node)
        elif node.is_impure() and node not in removable:
            mutated = _fresh_mutated(node)
            if mutated is None or any(u in live and order[u] > order[node] for u in mutated.users):
                live.add(node)
    live_before = list(itertools.accumulate((n in live for n in nodes), initial=0))
    opened: list[Node] = []
    for node in nodes:
        if node.target in _OPENING:
            opened.append(node)
        elif node.target in _CLOSING and opened:
            start = opened.pop()
            if live_before[order[node]] > live_before[order[start] + 1]:
                live.update((start, node))
    for node in nodes:  # a decomposition loader serves the region that follows it
        if _LOADER is not None and node.target is _LOADER:
            following = next((n for n in nodes[order[node] :] if n.target in _OPENING), None)
            if following is None or following in live:
                live.add(node)
    for node in reversed(nodes):
        if node not in live:
            graph.erase_node(node)


def rewrite(
    module: GraphModule, sites: Sequence[AttentionSite], site_ids: Mapping[int, int]
) -> GraphModule:
    """Rewrite, in place, each site whose `index` is in `site_ids` to call `pbsa_site` with
    that id; returns `module` (recompiled). Other sites are left untouched."""
    graph = module.graph
    by_index = {s.index: s for s in sites}
    unknown = sorted(set(site_ids) - set(by_index))
    if unknown:
        raise ValueError(f"site_ids: no site with index {unknown}")
    for index, site_id in site_ids.items():
        site = by_index[index]
        if site.q is None or site.output is None:
            raise ValueError(f"site {index}: has no traced operands/output ({site.unsupported})")
        _rewrite_site(graph, site, site_id)
    remove_dead_code(graph, {by_index[i].anchor for i in site_ids})
    graph.lint()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def rebind(module: GraphModule, site_ids: Mapping[int, int]) -> None:
    """Point the graph's `pbsa_site` calls from old site ids to new ones (old → new)."""
    for node in module.graph.nodes:
        if node.target is PBSA_SITE and node.args[3] in site_ids:
            node.args = (*node.args[:3], site_ids[node.args[3]])
    module.recompile()
