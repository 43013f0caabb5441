"""When `PersistentLocal` builds its table with the fused Triton kernels, decided without
importing triton: ``patterns`` imports torch and sympy only, and the kernels
(``patterns.select_kernel``) are imported on the CUDA selection path alone."""

from __future__ import annotations

import functools

from patterns.cache_view import CacheView
from patterns.scoring import BlockScorer

__all__ = ["MAX_COLUMNS", "MAX_POOL_PAGES", "fused_select_supported"]

# Widest candidate row (persistent + window pages) the table kernel holds in registers, and
# the largest pool whose page ids it can order by marking them in a bitmap.
MAX_COLUMNS = 4096
MAX_POOL_PAGES = 16384


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_select_supported(view: CacheView) -> bool:
    """Whether ``patterns.select_kernel.persistent_local_table`` can build this view's table:
    raw queries on a CUDA device, the identity or a `BlockScorer` scorer, a power-of-two
    head_dim in [16, 128], at most `MAX_COLUMNS` candidate pages, a pool of at most
    `MAX_POOL_PAGES` pages, and triton installed."""
    q = view.queries
    if q is None or not q.is_cuda:
        return False
    head_dim = q.shape[-1]
    g = view.geometry
    columns = view.num_persistent_slots + (len(view.history_frames) + g.frames_per_chunk) * (
        g.pages_per_frame
    )
    return (
        (view.scorer is None or type(view.scorer) is BlockScorer)
        and 16 <= head_dim <= 128
        and head_dim & (head_dim - 1) == 0
        and columns <= MAX_COLUMNS
        and view.key_reps.shape[2] <= MAX_POOL_PAGES
        and _triton_importable()
    )
