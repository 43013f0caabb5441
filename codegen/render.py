"""`render(spec) -> str`: the Triton source of one PBSA kernel, from the Jinja2 template."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import jinja2

from codegen.spec import KernelSpec

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE = "pbsa_fwd.py.jinja"

# Integer arguments that change with sequence lengths, pool sizes or strides: Triton must not
# specialise on them (value 1, divisibility by 16), or a growing cache would recompile.
RUNTIME_INTS = {
    "common": (
        "stride_qb",
        "stride_qh",
        "stride_ql",
        "stride_ob",
        "stride_oh",
        "stride_ol",
        "num_heads",
        "q_len",
        "kv_len",
        "num_pages",
        "num_q_blocks",
        "max_blocks",
        "num_m_tiles",
    ),
    "tma": ("kv_row_b", "kv_row_h", "kv_col_h"),
    "pointer": (
        "stride_kb",
        "stride_kh",
        "stride_kp",
        "stride_kt",
        "stride_vb",
        "stride_vh",
        "stride_vp",
        "stride_vt",
    ),
}


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


def runtime_int_args(spec: KernelSpec) -> tuple[str, ...]:
    return RUNTIME_INTS["common"] + RUNTIME_INTS["tma" if spec.tma else "pointer"]


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
            runtime_ints=runtime_int_args(spec),
            stride_args=[a for a in runtime_int_args(spec) if a.startswith("stride_")],
            dot_precision=precision,
        )
    )
