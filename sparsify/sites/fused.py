"""The fused forms of ATTENTION_FORMS: SDPA in every graph spelling, flex_attention and the
flash-attn custom ops, each normalised to an `AttentionSite`."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.fx import GraphModule, Node

from sparsify.sites.fx import arg, constant, node_shape, op_name, schema_args
from sparsify.sites.operands import trace_qkv
from sparsify.sites.records import BHLD, BLHD_TO_BHLD, AttentionSite, Output, layout_name, make_site

SDPA_FUNCTIONS = {
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
}
SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
POST_DISPATCH = {
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
}
FLASH_NAMESPACES = ("flash_attn", "flashattn", "flash_attn_3")
_FLASH_KNOWN = {
    "q", "k", "v", "query", "key", "value", "dropout_p", "softmax_scale", "scale", "causal",
    "is_causal", "window_size_left", "window_size_right", "window_size", "softcap",
    "return_softmax", "return_attn_probs", "deterministic", "out", "alibi_slopes",
}  # fmt: skip


def _used_outputs(node: Node) -> dict[int, Node]:
    """Used `getitem` users of a tuple-returning op, by index."""
    return {
        u.args[1]: u
        for u in node.users
        if u.op == "call_function" and u.target is operator.getitem and u.users
    }


def _tuple_output(node: Node) -> tuple[Node | None, str | None]:
    """(the used getitem 0, a reason when another output such as the log-sum-exp is used)."""
    used = _used_outputs(node)
    extra = sorted(i for i in used if i != 0)
    reason = f"uses output(s) {extra} of the attention op (e.g. its log-sum-exp)" if extra else None
    return used.get(0), reason


def _fused_output(node: Node | None, perm: tuple[int, ...]) -> Output | None:
    """Output of a fused op whose result has q's layout (`perm`: canonical → result)."""
    if node is None:
        return None
    if len(node_shape(node) or ()) == 3:
        return Output(node, (0, 1, 2), merged_heads=True)
    return Output(node, perm)


def _rank_perm(node: Node, perm: tuple[int, ...]) -> tuple[int, ...]:
    """`perm` for 4-D inputs; identity for 3-D [B·H, L, D] inputs."""
    return perm if len(node_shape(node) or ()) == 4 else (0, 1, 2)


def _fused_site(
    form: str, anchor: Node, out: Node | None, qkv: tuple[Node, Node, Node],
    perm: tuple[int, ...], **fields: Any,
) -> AttentionSite:  # fmt: skip
    perms = tuple(_rank_perm(n, perm) for n in qkv)
    # perm is its own inverse for BHLD and BLHD, so it also maps canonical → output.
    return make_site(
        form, anchor, layout_name(perms[0]), trace_qkv(*qkv, perms), _fused_output(out, perm),
        **fields,
    )  # fmt: skip


def _float_or_nan(value: Any) -> float:
    number = constant(value) if value is not None else 0.0
    return float("nan") if number is None else number


def _sdpa(node: Node, module: GraphModule) -> AttentionSite | None:
    target = node.target
    if node.op != "call_function":
        return None
    if target in SDPA_FUNCTIONS:
        a = {n: arg(node, i, n) for i, n in enumerate(SDPA_NAMES)}
        form, out, reason = "sdpa", node, None
    elif isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        name = target._schema.name.split("::")[1]
        if name == "scaled_dot_product_attention":
            form, out, reason = "sdpa", node, None
        elif name in POST_DISPATCH:
            form = "sdpa_post_dispatch"
            out, reason = _tuple_output(node)
        else:
            return None
        a = schema_args(node)
    else:
        return None
    scale = a.get("scale")
    return _fused_site(
        form, node, out, (a["query"], a["key"], a["value"]), BHLD,
        scale=None if scale is None else constant(scale),
        mask=a.get("attn_mask", a.get("attn_bias")),
        causal=bool(a.get("is_causal")),
        dropout=_float_or_nan(a.get("dropout_p")),
        unsupported=reason,
    )  # fmt: skip


def _resolve(module: GraphModule, node: Any) -> Any:
    if isinstance(node, Node) and node.op == "get_attr":
        obj = module
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return node


def _graph_result(graph_module: Any) -> Any:
    if not isinstance(graph_module, GraphModule):
        return None
    out = next(n for n in graph_module.graph.nodes if n.op == "output")
    result = out.args[0]
    return result[0] if isinstance(result, (tuple, list)) else result


def _is_identity_score_mod(graph_module: Any) -> bool:
    placeholders = [n for n in getattr(graph_module, "graph", ()).nodes if n.op == "placeholder"]
    return bool(placeholders) and _graph_result(graph_module) is placeholders[0]


def _is_noop_mask_mod(graph_module: Any) -> bool:
    result = _graph_result(graph_module)
    return isinstance(result, Node) and op_name(result) in ("new_ones", "ones", "ones_like")


def _flex(node: Node, module: GraphModule) -> AttentionSite | None:
    if node.op != "call_function" or node.target is not torch.ops.higher_order.flex_attention:
        return None
    q, k, v, score_mod, block_mask = node.args[:5]
    scale = node.args[5] if len(node.args) > 5 else None
    out, reason = _tuple_output(node)
    mask_mod = _resolve(module, block_mask[-1]) if isinstance(block_mask, tuple) else None
    mask = None if _is_noop_mask_mod(mask_mod) else "flex block_mask"
    if not _is_identity_score_mod(_resolve(module, score_mod)):
        reason = reason or "flex_attention has a score_mod (an arbitrary dense mask or bias)"
    return _fused_site(
        "flex", node, out, (q, k, v), BHLD,
        scale=None if scale is None else constant(scale), mask=mask, unsupported=reason,
    )  # fmt: skip


def _flash_reason(name: str, a: dict[str, Any]) -> str | None:
    """Why a flash-attention call has semantics beyond plain softmax(q·kᵀ)·v, or None."""
    if "varlen" in name or any(n.startswith("cu_seqlens") and a[n] is not None for n in a):
        return "variable-length (packed) flash-attention"
    for n, value in a.items():
        if n.startswith("window_size"):
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(w not in (None, -1) for w in values):
                return "flash-attention with a sliding window"
    if a.get("softcap") not in (None, 0, 0.0):
        return "flash-attention with a logit soft-cap"
    if a.get("alibi_slopes") is not None:
        return "flash-attention with ALiBi slopes"
    extra = [n for n, value in a.items() if n not in _FLASH_KNOWN and isinstance(value, Node)]
    return f"flash-attention with extra tensor inputs {extra}" if extra else None


def _flash(node: Node, module: GraphModule) -> AttentionSite | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    namespace, _, name = target._schema.name.partition("::")
    if namespace not in FLASH_NAMESPACES or "bwd" in name or "backward" in name:
        return None
    a = schema_args(node)
    qkv = tuple(
        a.get(short, a.get(long, node.args[i] if len(node.args) > i else None))
        for i, (short, long) in enumerate((("q", "query"), ("k", "key"), ("v", "value")))
    )
    reason = _flash_reason(name, a)
    if len(target._schema.returns) == 1:
        out = node
    else:
        out, lse_reason = _tuple_output(node)
        reason = reason or lse_reason
    scale = a.get("softmax_scale", a.get("scale"))
    return _fused_site(
        "flash_attn", node, out, qkv, BLHD_TO_BHLD,
        scale=None if scale is None else constant(scale),
        causal=bool(a.get("causal", a.get("is_causal", False))),
        dropout=_float_or_nan(a.get("dropout_p")), unsupported=reason,
    )  # fmt: skip


FUSED_FINDERS: tuple[Callable[[Node, GraphModule], AttentionSite | None], ...] = (
    _sdpa,
    _flex,
    _flash,
)


def find_fused(module: GraphModule) -> Iterator[AttentionSite]:
    """Sites of the fused forms (SDPA in every spelling, flex_attention, flash-attn ops)."""
    for node in module.graph.nodes:
        for finder in FUSED_FINDERS:
            site = finder(node, module)
            if site is not None:
                yield site
                break
