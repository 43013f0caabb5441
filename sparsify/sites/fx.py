"""Reading fx nodes: example values, spelling-independent op names, arguments, module paths
and in-place writes. Every finder and the classifier read the graph through these."""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node


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
    "concat": "cat",
    "concatenate": "cat",
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
