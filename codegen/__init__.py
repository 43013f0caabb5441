"""How to compute block-sparse attention: kernel specs, generated Triton kernels, fallbacks.

Public API: `pbsa_attention`, `merge_partials`, `KernelSpec`, `render`, `get_kernel`,
`autotune`; the float64 oracle lives in `codegen.reference`.
"""

from codegen.api import pbsa_attention
from codegen.merge import merge_partials

__all__ = ["merge_partials", "pbsa_attention"]
