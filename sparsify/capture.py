"""Capture a model's forward as one fx `GraphModule`, trying the capture paths in order.

1. `torch.export.export(..., strict=False)` then `ExportedProgram.module()` (an aten-level graph
   whose parameters are attributes of the module);
2. Dynamo (`torch._dynamo.export`, whole graph, static shapes);
3. `torch.fx.symbolic_trace` (Python-level graph; shapes added by fake-tensor propagation).

Python ints among the inputs (e.g. `start_frame`) are turned into 0-dim int64 tensors first,
so they stay runtime inputs: the graph is captured once and reused for every chunk. Ints named
in `constants` are specialised into the graph instead (for ints the model uses as sizes). Capture
runs under `torch.no_grad()` (the graph serves inference; FlexAttention on CPU needs it).
Every placeholder and call of the result carries `meta["val"]` (a fake tensor or a Python
value), which the site finder reads for shapes. The result owns its module and parameter
objects but shares their storage with the model (no copy of the weights): moving it to
another device or re-registering its parameters leaves the model as it was; in-place writes
to the weights' data are seen by both.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

CAPTURE_METHODS = ("torch.export", "dynamo", "fx.symbolic_trace")


class CaptureError(RuntimeError):
    """Every capture path failed; the message lists what each attempt said."""


@dataclass
class Capture:
    """A captured forward: call `graph_module(*args, **kwargs)` like the original model.

    `args`/`kwargs` are the example inputs as captured (ints already tensors, except the
    `constants`: the positions or keywords of ints specialised into the graph, with their
    values); `failures` holds `(method, message)` for the paths tried before `method`
    succeeded.
    """

    graph_module: GraphModule
    method: str
    args: tuple
    kwargs: dict
    failures: list[tuple[str, str]] = field(default_factory=list)
    constants: dict[int | str, int] = field(default_factory=dict)


def int_inputs(args: tuple, kwargs: Mapping[str, Any]) -> dict[int | str, int]:
    """The Python ints (not bools) among the inputs, by position or keyword."""
    found: dict[int | str, int] = {}
    for key, value in [*enumerate(args), *kwargs.items()]:
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found


def runtime_inputs(
    args: tuple, kwargs: Mapping[str, Any], keep: Collection[int | str] = ()
) -> tuple[tuple, dict]:
    """Replace Python ints (not bools) by 0-dim int64 tensors, so they are graph inputs; the
    ints at the positions or keywords in `keep` stay Python constants."""
    ints = int_inputs(args, kwargs)

    def convert(key: int | str, value: Any) -> Any:
        if key in ints and key not in keep:
            return torch.tensor(value, dtype=torch.int64)
        return value

    return (
        tuple(convert(i, a) for i, a in enumerate(args)),
        {k: convert(k, v) for k, v in kwargs.items()},
    )


def _export(model: nn.Module, args: tuple, kwargs: dict) -> GraphModule:
    program = torch.export.export(model, args, kwargs, strict=False)
    return program.module()


def _dynamo(model: nn.Module, args: tuple, kwargs: dict) -> GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch._dynamo.export is deprecated in favour of (1)
        graph_module, _ = torch._dynamo.export(
            model, aten_graph=False, assume_static_by_default=True
        )(*args, **kwargs)
    torch._dynamo.reset()
    _propagate_shapes(graph_module, _placeholder_values(graph_module, model, args, kwargs))
    return graph_module


def _symbolic_trace(model: nn.Module, args: tuple, kwargs: dict) -> GraphModule:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    concrete = {k: v for k, v in bound.arguments.items() if not isinstance(v, Tensor)}
    graph_module = torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    _propagate_shapes(graph_module, _placeholder_values(graph_module, model, args, kwargs))
    return graph_module


def _placeholder_values(
    graph_module: GraphModule, model: nn.Module, args: tuple, kwargs: dict
) -> list[Any]:
    """The example value of each placeholder, in graph order (matched by parameter name when
    the graph keeps the forward's names, by position otherwise)."""
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    if len(placeholders) == len(flat):
        return flat
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return [bound.arguments.get(str(n.target).lstrip("*")) for n in placeholders]


class _ValueProp(FakeTensorProp):
    """FakeTensorProp that also records Python values (shape arithmetic such as `D ** -0.5`),
    which some torch versions leave out of `meta["val"]`."""

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if n.meta.get("val") is None and isinstance(result, (int, float, bool, tuple)):
            n.meta["val"] = result
        return result


def _propagate_shapes(graph_module: GraphModule, values: list[Any]) -> None:
    """Fill `meta["val"]` of nodes that lack it by running the graph on fake tensors."""
    if all("val" in n.meta for n in graph_module.graph.nodes if n.op != "output"):
        return
    mode = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(v) if isinstance(v, Tensor) else v for v in values]
    _ValueProp(graph_module, mode).propagate(*fake)


_PATHS: dict[str, Callable[[nn.Module, tuple, dict], GraphModule]] = {
    "torch.export": _export,
    "dynamo": _dynamo,
    "fx.symbolic_trace": _symbolic_trace,
}


def capture(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    methods: tuple[str, ...] = CAPTURE_METHODS,
    constants: Collection[int | str] = (),
) -> Capture:
    """Capture `model(*args, **kwargs)` by the first of `methods` that works; the int inputs
    at the positions or keywords in `constants` are specialised into the graph.

    Raises `CaptureError` naming each attempted path and its error when all fail. The model
    is left as it was (same parameters, same modules, same training flag).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    unknown = [m for m in methods if m not in _PATHS]
    if unknown or not methods:
        raise ValueError(
            f"methods: expected a non-empty subset of {CAPTURE_METHODS}, got {methods}"
        )
    ints = int_inputs(tuple(args), dict(kwargs or {}))
    unknown = sorted(map(str, set(constants) - set(ints)))
    if unknown:
        raise ValueError(f"constants: {unknown} are not int inputs")
    args, kwargs = runtime_inputs(tuple(args), dict(kwargs or {}), constants)
    failures: list[tuple[str, str]] = []
    for method in methods:
        try:
            with torch.no_grad():
                graph_module = _PATHS[method](model, args, kwargs)
        except Exception as error:  # every failure is reported below
            failures.append((method, f"{type(error).__name__}: {_first_lines(error)}"))
            continue
        _own_state(graph_module)
        kept = {key: ints[key] for key in constants}
        return Capture(graph_module, method, args, kwargs, failures, kept)
    report = "\n".join(f"  - {method}: {message}" for method, message in failures)
    raise CaptureError(
        f"could not capture {type(model).__name__}.forward as one graph; attempts:\n{report}"
    )


def _own_state(graph_module: GraphModule) -> None:
    """Give the graph module its own module and parameter objects (sharing storage with the
    model), so that `.to()`, `.train()` or re-registration on it never reach the model."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(graph_module.parameters(), graph_module.buffers()):
        if isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        else:
            memo[id(t)] = t.detach()
    for name, child in list(graph_module.named_children()):
        setattr(graph_module, name, copy.deepcopy(child, memo))
    for name, param in list(graph_module._parameters.items()):
        graph_module._parameters[name] = memo[id(param)]
    for name, buffer in list(graph_module._buffers.items()):
        if buffer is not None:
            graph_module._buffers[name] = memo[id(buffer)]


def _first_lines(error: Exception, limit: int = 3) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines[:limit]) or "(no message)"
