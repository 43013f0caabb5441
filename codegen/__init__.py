"""How to compute block-sparse attention: kernel specs, generated Triton kernels, fallbacks.

Public API: `pbsa_attention`, `merge_partials`, `KernelSpec`, `render`, `get_kernel`,
`autotune`, `LaunchConfig`; the float64 oracle lives in `codegen.reference`.
"""

from codegen.api import pbsa_attention
from codegen.cache import get_kernel
from codegen.config import LaunchConfig
from codegen.merge import merge_partials
from codegen.render import render
from codegen.spec import KernelSpec
from codegen.tuning import autotune

__all__ = [
    "KernelSpec",
    "LaunchConfig",
    "autotune",
    "get_kernel",
    "merge_partials",
    "pbsa_attention",
    "render",
]
