"""`render(spec) -> str`: the Triton source of one PBSA kernel, from the Jinja2 template."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2

from codegen.spec import KernelSpec

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "pbsa_fwd.py.jinja"


@dataclass(frozen=True)
class KernelArg:
    """One argument of the generated kernel.

    kind: "tensor" (a pointer, or a TMA descriptor for K/V), "int" (changes with sequence
    lengths or pool sizes), "stride" (an int the launcher keeps a multiple of 16), "float".
    Ints and strides are never specialised on (value 1, divisibility by 16): a growing cache
    would recompile otherwise.
    """

    name: str
    kind: str


def _args(kind: str, *names: str) -> tuple[KernelArg, ...]:
    return tuple(KernelArg(n, kind) for n in names)


@cache
def kernel_args(spec: KernelSpec) -> tuple[KernelArg, ...]:
    """The kernel's runtime arguments in order: the one list that the template renders as
    the signature and the launcher fills by name (`call_args`)."""
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


def runtime_int_args(spec: KernelSpec) -> tuple[str, ...]:
    """Names of the int arguments Triton must not specialise on."""
    return tuple(a.name for a in kernel_args(spec) if a.kind in ("int", "stride"))


def call_args(spec: KernelSpec, values: Mapping[str, object]) -> list[object]:
    """`values` (argument name -> value) in the kernel's argument order."""
    names = [a.name for a in kernel_args(spec)]
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
def template_fingerprint() -> str:
    """Hash of everything besides the spec that shapes the generated source."""
    h = hashlib.sha256((TEMPLATE_DIR / TEMPLATE).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def render(spec: KernelSpec) -> str:
    """Complete Python module source defining `@triton.jit def <spec.name>(...)`."""
    if not isinstance(spec, KernelSpec):
        raise TypeError(f"spec: expected a KernelSpec, got {type(spec).__name__}")
    # fp32 inputs keep fp32 accuracy (Triton would otherwise use tf32 on tensor cores).
    precision = ', input_precision="ieee"' if spec.dtype == "float32" else ""
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            spec=spec,
            spec_key=spec.key(),
            name=spec.name,
            args=kernel_args(spec),
            dot_precision=precision,
        )
    )
