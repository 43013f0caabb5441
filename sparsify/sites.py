"""Attention sites: every attention op of a captured graph as one normalised record.

Each form of DESIGN.md's ATTENTION_FORMS has a normaliser here (the unfused form is matched in
`sparsify.matching`); all produce an `AttentionSite` whose q/k/v are `Operand`s: the tensor
the model computed plus the permutation that brings it to the canonical [B, H, L, D]. Operands
are traced back through layout ops (transpose/permute/casts/no-op expands), merges of (B, H)
into one dimension, GQA head repeats (so k/v keep their Hkv heads) and, for q and k,
multiplications by constants (folded into the site's scale).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

BHLD = (0, 1, 2, 3)
BLHD_TO_BHLD = (0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Reading nodes


def node_value(node: Any) -> Any:
    """The example value of a node (fake tensor or Python value); constants pass through."""
    if isinstance(node, Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def node_shape(node: Any) -> tuple[int, ...] | None:
    value = node_value(node)
    if isinstance(value, torch.Tensor):
        try:
            return tuple(int(s) for s in value.shape)
        except (TypeError, ValueError):  # unbacked symbolic sizes
            return None
    return None


def node_dtype(node: Any) -> torch.dtype | None:
    value = node_value(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def constant(value: Any) -> float | None:
    """A Python number, or a node whose example value is one (e.g. a folded `D ** -0.5`)."""
    value = node_value(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return None


_ALIASES = {
    "_softmax": "softmax",
    "_safe_softmax": "softmax",
    "special_softmax": "softmax",
    "_to_copy": "cast",
    "to": "cast",
    "type": "cast",
    "type_as": "cast",
    "float": "cast",
    "half": "cast",
    "bfloat16": "cast",
    "double": "cast",
    "_unsafe_view": "view",
    "reshape": "view",
    "truediv": "div",
    "true_divide": "div",
    "__matmul__": "matmul",
    "__mul__": "mul",
    "__rmul__": "mul",
    "__truediv__": "div",
    "__add__": "add",
    "__radd__": "add",
    "feature_dropout": "dropout",
    "swapaxes": "transpose",
    "swapdims": "transpose",
}


def op_name(node: Node, module: GraphModule | None = None) -> str:
    """A spelling-independent name for what a node computes ("transpose", "softmax", ...).

    aten overloads, torch functions, `operator` functions and Tensor methods of the same
    operation get the same name; ops outside aten keep their qualified "namespace::name".
    """
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif node.op == "call_module" and module is not None:
        sub = module.get_submodule(str(target))
        name = {nn.Dropout: "dropout", nn.Softmax: "softmax"}.get(type(sub), type(sub).__name__)
    elif node.op != "call_function":
        return node.op
    elif isinstance(target, torch._ops.OpOverload):
        namespace, _, name = target._schema.name.partition("::")
        if namespace not in ("aten", "prims"):
            return target._schema.name
    elif target is getattr:
        attribute = node.args[1]
        return "mT" if attribute in ("mT", "mH") else f"getattr.{attribute}"
    else:
        name = getattr(target, "__name__", str(target))
    name = name.removesuffix("_") if name.endswith("_") and not name.startswith("_") else name
    return _ALIASES.get(name, name)


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call given positionally at `index` (after self for methods) or by
    keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def schema_args(node: Node) -> dict[str, Any]:
    """Arguments of an OpOverload call by schema name (defaults filled in)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, spec in enumerate(schema.arguments):
        if i < len(node.args):
            out[spec.name] = node.args[i]
        elif spec.name in node.kwargs:
            out[spec.name] = node.kwargs[spec.name]
        elif spec.has_default_value():
            out[spec.name] = spec.default_value
        else:
            out[spec.name] = None
    return out


def module_path(node: Node) -> str | None:
    """Dotted path of the innermost module that ran the node, in the model's own naming."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)  # Dynamo's "L['self']." prefix
    path = re.sub(r"(?:^|\.)_modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"\[['\"]?([^]'\"]*)['\"]?\]", r".\1", path)
    return path.strip(".") or None


def layer_of(path: str | None) -> int | None:
    """The first integer component of a module path ("blocks.3.attn1" → 3)."""
    if path is None:
        return None
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def tensor_input(node: Node) -> Node | None:
    """The first Node argument (the tensor a unary/layout op acts on)."""
    for a in node.args:
        if isinstance(a, Node):
            return a
    return None


_VIEWS = {
    "slice", "select", "view", "as_strided", "transpose", "permute", "unsqueeze", "squeeze",
    "expand", "narrow", "unflatten", "alias", "diagonal", "mT", "t", "unfold",
}  # fmt: skip


def written_input(node: Node) -> Node | None:
    """The tensor an in-place op writes (its first argument), or None for other ops."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        first = target._schema.arguments[:1]
        writes = bool(first) and first[0].alias_info is not None and first[0].alias_info.is_write
    else:
        writes = target is operator.setitem or (
            node.op == "call_method"
            and str(target).endswith("_")
            and not str(target).startswith("_")
        )
    written = node.args[0] if writes and node.args else None
    return written if isinstance(written, Node) else None


def view_chain(node: Node) -> list[Node]:
    """node, then the tensors it is a view of, back to the base."""
    chain = [node]
    while op_name(chain[-1]) in _VIEWS and tensor_input(chain[-1]) is not None:
        chain.append(tensor_input(chain[-1]))
    return chain


def is_written(node: Node) -> bool:
    """Whether the graph writes into node's storage in place (directly or through a view)."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        for user in current.users:
            if written_input(user) is current:
                return True
            if user not in seen and op_name(user) in _VIEWS and tensor_input(user) is current:
                seen.add(user)
                stack.append(user)
    return False


# ---------------------------------------------------------------------------------------------
# Records


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


@dataclass
class AttentionSite:
    """One attention op, normalised. `scale` multiplies q·kᵀ (None: the op's 1/√D default)."""

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


# ---------------------------------------------------------------------------------------------
# Tracing operands back


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


def scalar_factor(node: Node) -> tuple[Node, float] | None:
    """(tensor, c) when node is tensor·c or tensor/c with a constant c."""
    name = op_name(node)
    if name not in ("mul", "div") or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if name == "mul" and node_shape(a) is None:
        a, b = b, a
    value = constant(b)
    if node_shape(a) is None or value is None or value == 0:
        return None
    return a, value if name == "mul" else 1.0 / value


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


# ---------------------------------------------------------------------------------------------
# Fused forms

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
