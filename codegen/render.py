"""`render(spec, module) -> str`: the Triton source of a PBSA module, from a Jinja2 template.

Two modules per spec: "fwd" (the forward kernel, and `fwd_merge`, which combines the float32
partials of a split walk, `KernelSpec.kv_splits`) and "bwd" (the backward's kernels: delta =
rowsum(dO·O), dQ, dK/dV, and dK/dV with dQ). Both templates share the tile-load macros.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from codegen.spec import KernelSpec

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATES = {"fwd": "pbsa_fwd.py.jinja", "bwd": "pbsa_bwd.py.jinja"}
# Query rows per program of `fwd_merge`: 32 rows of float32 keep the partial tile and the
# accumulator in registers up to head_dim 256 at 4 warps (128 rows spill at head_dim 128).
MERGE_ROWS = 32
# The kernels of each module: the forward and its split merge; the backward's delta, dQ and
# dK/dV kernels, and the dK/dV kernel that computes dQ too (in place of the dQ kernel).
KERNELS = {
    "fwd": ("fwd", "fwd_merge"),
    "bwd": ("bwd_delta", "bwd_dq", "bwd_dkdv", "bwd_fused"),
}


@dataclass(frozen=True)
class KernelArg:
    """One argument of the generated kernel.

    kind: "tensor" (a pointer, or a TMA descriptor for K/V), "int" (changes with sequence
    lengths or pool sizes), "stride" (an int the launcher keeps a multiple of 16), "float".
    Ints are never specialised on (value 1, divisibility by 16): a growing cache would
    recompile otherwise. Strides are specialised on divisibility by 16, which the launcher
    guarantees (one key, no recompilation): it is what vectorises the pointer loads.
    """

    name: str
    kind: str


def _args(kind: str, *names: str) -> tuple[KernelArg, ...]:
    return tuple(KernelArg(n, kind) for n in names)


def module_of(kernel: str) -> str:
    """The module ("fwd" | "bwd") that defines `kernel`."""
    for module, kernels in KERNELS.items():
        if kernel in kernels:
            return module
    known = [k for ks in KERNELS.values() for k in ks]
    raise ValueError(f"kernel: expected one of {known}, got {kernel!r}")


def kernel_name(spec: KernelSpec, kernel: str = "fwd") -> str:
    """The generated function's name: the spec's name, suffixed for every kernel but "fwd"."""
    module_of(kernel)
    return spec.name if kernel == "fwd" else f"{spec.name}_{kernel}"


def _strides(t: str, dims: str = "bhl") -> tuple[str, ...]:
    return tuple(f"stride_{t}{d}" for d in dims)


def _backward_args(kernel: str) -> tuple[KernelArg, ...]:
    # K/V (and dK/dV) are addressed as (batch, kv head, page, token) like the forward's.
    kv = _args("stride", *(s for t in ("k", "v") for s in _strides(t, "bhpt")))
    if kernel == "bwd_delta":
        return (
            _args("tensor", "Out", "DOut", "Delta")
            + _args("stride", *_strides("o"), *_strides("do"))
            + _args("int", "num_heads", "q_len")
        )
    if kernel == "bwd_dq":
        return (
            _args("tensor", "Q", "K", "V", "DOut", "Lse", "Delta", "DQ")
            + _args("tensor", "NumBlocks", "Indices", "PageLens")
            + _args("stride", *_strides("q"), *_strides("do"), *_strides("dq"))
            + kv
            + _args("int", "num_heads", "q_len", "kv_len", "num_pages", "num_q_blocks")
            + _args("int", "max_blocks")
            + _args("float", "qk_scale")
        )
    fused = _args("tensor", "DQAcc") if kernel == "bwd_fused" else ()  # float32 [B·H, Lq, D]
    return (
        _args("tensor", "Q", "K", "V", "DOut", "Lse", "Delta", "DK", "DV")
        + _args("tensor", "Offsets", "Entries", "PageLens")
        + fused
        + _args("stride", *_strides("q"), *_strides("do"))
        + kv
        + _args("stride", *(s for t in ("dk", "dv") for s in _strides(t, "bhpt")))
        + _args("int", "num_heads", "q_len", "kv_len", "num_pages", "num_q_blocks")
        + _args("float", "qk_scale")
    )


@cache
def kernel_args(spec: KernelSpec, kernel: str = "fwd") -> tuple[KernelArg, ...]:
    """The kernel's runtime arguments in order: the one list that the template renders as
    the signature and the launcher fills by name (`call_args`)."""
    if module_of(kernel) == "bwd":
        return _backward_args(kernel)
    if kernel == "fwd_merge":  # partials [B·splits, ...] in q's layout -> out, LSE
        return (
            _args("tensor", "Part", "PartLse", "Out", "Lse")
            + _args("stride", "stride_pb", "stride_ph", "stride_pl")
            + _args("stride", "stride_ob", "stride_oh", "stride_ol")
            + _args("int", "num_heads", "q_len")
        )
    tensors = ("Q", "K", "V", "Out", "Lse", "NumBlocks", "Indices", "PageLens", "Schedule")
    qo = ("stride_qb", "stride_qh", "stride_ql", "stride_ob", "stride_oh", "stride_ol")
    if spec.tma:  # K/V rows of (batch, kv head) and the kv head's column in the 2-D views
        kv = _args("int", "kv_row_b", "kv_row_h", "kv_col_h")
    else:  # (batch, kv head, page, token) strides of K, then of V
        kv = _args("stride", *(f"stride_{t}{d}" for t in "kv" for d in "bhpt"))
    sizes = ("num_heads", "q_len", "kv_len", "num_pages", "num_q_blocks", "max_blocks")
    return (
        _args("tensor", *tensors)
        + _args("stride", *qo)
        + kv
        + _args("int", *sizes, "num_m_tiles")
        + _args("float", "qk_scale")
    )


def runtime_int_args(spec: KernelSpec, kernel: str = "fwd") -> tuple[str, ...]:
    """Names of the int arguments Triton must not specialise on: the sizes, not the strides
    (see `KernelArg`)."""
    return tuple(a.name for a in kernel_args(spec, kernel) if a.kind == "int")


def call_args(spec: KernelSpec, values: Mapping[str, object], kernel: str = "fwd") -> list[object]:
    """`values` (argument name -> value) in the kernel's argument order."""
    names = [a.name for a in kernel_args(spec, kernel)]
    if len(values) != len(names) or any(n not in values for n in names):
        raise ValueError(f"call_args: expected values for exactly {names}, got {sorted(values)}")
    return [values[n] for n in names]


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@cache
def template_fingerprint(module: str = "fwd") -> str:
    """Hash of everything besides the spec that shapes the module's generated source (its
    template, the shared macros, this renderer)."""
    h = hashlib.sha256(module.encode())
    for path in sorted(TEMPLATE_DIR.glob("*.jinja")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def render(spec: KernelSpec, module: str = "fwd") -> str:
    """Complete Python module source: "fwd" defines `@triton.jit def <spec.name>(...)` and
    its merge, "bwd" the four backward kernels, each named by `kernel_name`."""
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"spec: expected a KernelSpec, got {type(spec).__name__}")
    if module not in TEMPLATES:
        raise ValueError(f"module: expected one of {sorted(TEMPLATES)}, got {module!r}")
    # fp32 inputs keep fp32 accuracy (Triton would otherwise use tf32 on tensor cores).
    precision = ', input_precision="ieee"' if spec.dtype == "float32" else ""
    return (
        _environment()
        .get_template(TEMPLATES[module])
        .render(
            spec=spec,
            spec_key=spec.key(),
            name=spec.name,
            names={k: kernel_name(spec, k) for k in KERNELS[module]},
            args={k: kernel_args(spec, k) for k in KERNELS[module]},
            dot_precision=precision,
            merge_rows=MERGE_ROWS,
        )
    )
