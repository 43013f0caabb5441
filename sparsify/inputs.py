"""Example inputs: capture with every failure pinned on an input, not left as the torch error
some capture path hit deep inside the model.

`check_inputs` knows the video models this project targets (the reference `CausalWanModel`
and diffusers' `WanTransformer3DModel`): their video input is [B, C, F, H, W] with the
config's channels and F, H, W multiples of the patch size, their text input [B, L, text_dim].
`eager_failure` runs any model's forward on fake tensors (no compute) to tell a capture
failure from inputs the model itself rejects. `capture_inputs` uses both around
`sparsify.capture.capture` and specialises int inputs that the graph uses as sizes;
`graph_inputs` prepares a later call's inputs for that graph.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import (
    GuardOnDataDependentSymNode,
    free_unbacked_symbols,
)

from runtime import CausalWanModel
from runtime.model_config import PATCH_SIZE
from sparsify.capture import Capture, CaptureError, capture, int_inputs, runtime_inputs

# forward's parameter names: (video, text) per model class name
_KNOWN = {
    "CausalWanModel": ("x", "context"),
    "WanTransformer3DModel": ("hidden_states", "encoder_hidden_states"),
}


def describe(value: Any) -> str:
    """A short description of an input: dtype[shape] for tensors, the value otherwise."""
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return (
        repr(value)
        if isinstance(value, (int, float, bool, str, type(None)))
        else type(value).__name__
    )


def bound_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """forward's arguments by name, or None when they do not bind to its signature."""
    try:
        return dict(inspect.signature(model.forward).bind(*args, **kwargs).arguments)
    except TypeError:
        return None


def check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise ValueError naming the example input when a known model cannot take it."""
    names = _KNOWN.get(type(model).__name__)
    config = getattr(model, "config", None)
    if names is None or config is None:
        return
    bound = bound_inputs(model, args, kwargs)
    if bound is None:
        return  # capture reports the signature mismatch
    video, text = (bound.get(n) for n in names)
    patch = PATCH_SIZE if isinstance(model, CausalWanModel) else tuple(config.patch_size)
    channels = config.in_channels
    if isinstance(video, Tensor):
        expected = f"[B, {channels}, F, H, W] with F, H, W multiples of the patch {patch}"
        if video.dim() != 5 or video.shape[1] != channels:
            raise ValueError(
                f"example_inputs: {names[0]} is {describe(video)}; expected {expected}"
            )
        if any(size % p for size, p in zip(video.shape[2:], patch, strict=True)):
            raise ValueError(
                f"example_inputs: {names[0]} is {describe(video)}; expected {expected}"
            )
    if isinstance(text, Tensor) and (text.dim() != 3 or text.shape[-1] != config.text_dim):
        raise ValueError(
            f"example_inputs: {names[1]} is {describe(text)}; expected [B, L, {config.text_dim}]"
        )


_UNKNOWABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    GuardOnDataDependentSymNode,
)


def eager_failure(model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """The error the model's own forward raises on fake copies of the inputs, or None (also
    when fake tensors cannot tell: the forward branches on tensor values)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = torch.utils._pytree.tree_map_only(Tensor, mode.from_tensor, (args, kwargs))
    try:
        with mode, torch.no_grad():
            model(*fake[0], **fake[1])
    except _UNKNOWABLE:
        return None
    except Exception as error:  # any other failure of the forward itself is the answer
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None


def input_name(model: nn.Module, key: int | str) -> str:
    """The forward parameter an input position or keyword binds to."""
    if isinstance(key, str):
        return key
    names = [p for p in inspect.signature(model.forward).parameters]
    return names[key] if key < len(names) else f"input {key}"


def data_dependent(graph_module: GraphModule) -> list[Node]:
    """Nodes whose sizes depend on tensor values (unbacked symbols): the site finder cannot
    read their shapes."""
    return [n for n in graph_module.graph.nodes if free_unbacked_symbols(n.meta.get("val"))]


def capture_inputs(
    model: nn.Module, args: tuple, kwargs: dict, methods: tuple[str, ...],
    runtime: Collection[int | str] = (),
) -> Capture:  # fmt: skip
    """`sparsify.capture.capture` with the failures pinned on the example inputs.

    Inputs a known model cannot take, and inputs the model's own forward rejects, raise
    ValueError naming them. Ints become runtime tensors; when that leaves sizes that depend
    on tensor values (an int used as a size), the capture is retried with the ints, except
    those in `runtime`, specialised as constants; a graph still data-dependent is a
    `CaptureError` naming the ints.
    """
    check_inputs(model, args, kwargs)
    try:
        captured = capture(model, args, kwargs, methods)
    except CaptureError as error:
        failure = eager_failure(model, *runtime_inputs(args, kwargs))
        if failure is None:
            raise
        listing = ", ".join(
            f"{name}: {describe(value)}"
            for name, value in (bound_inputs(model, args, kwargs) or {}).items()
        )
        raise ValueError(
            f"example_inputs: {type(model).__name__}.forward itself fails on them ({listing}): "
            f"{failure}; give inputs of the shapes the model expects"
        ) from error
    if not data_dependent(captured.graph_module):
        return captured
    ints = [k for k in int_inputs(args, kwargs) if k not in runtime]
    if ints:
        retried = capture(model, args, kwargs, methods, constants=ints)
        if not data_dependent(retried.graph_module):
            return retried
    names = [input_name(model, k) for k in int_inputs(args, kwargs)]
    nodes = ", ".join(n.name for n in data_dependent(captured.graph_module)[:3])
    tried = f" (also with {[input_name(model, k) for k in ints]} as constants)" if ints else ""
    raise CaptureError(
        f"example_inputs: the graph's sizes depend on tensor values ({nodes}){tried}: the int "
        f"inputs {names} are runtime tensors in the graph, so a size computed from them is "
        "unknown; compute sizes from tensor shapes, or make such ints attributes of the model"
    )


def graph_inputs(
    args: tuple, kwargs: dict, constants: Mapping[int | str, tuple[str, int]]
) -> tuple[tuple, dict]:
    """A call's inputs as the captured graph takes them: ints as 0-dim tensors, except the
    specialised `constants` (position or keyword → (name, captured value)), which must have
    their captured values."""
    for key, (name, value) in constants.items():
        given = args[key] if isinstance(key, int) and key < len(args) else kwargs.get(key)
        if given != value:
            raise ValueError(
                f"{name}: the graph was captured with it specialised to {value}, got "
                f"{given!r}; sparsify again with this value"
            )
    return runtime_inputs(args, kwargs, constants)
