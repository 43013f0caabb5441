"""Symbolic KV-cache footprint of a pattern: what the page pool holds, in sympy.

What is counted: **K and V page slots** — every page a layer holds (full pages and the
partial last page of each frame count as whole slots, since that is what the pool
allocates), plus the shared scratch pages of one chunk. ``page_lens`` and ``key_reps`` are
per-page metadata (one int and D floats per page, ≤ 1/(2·page_size) of the page's K/V
bytes) and are *not* counted as cache.

How the runtime moves pages (``runtime.AttentionState``): during a chunk's passes its K/V sit
in the scratch pages. In the commit pass each layer attends first, then (1) if the pattern
keeps persistent pages and some of the chunk's own frames leave the window at once, it
allocates those frames' pages so they can compete for persistence; (2) evicts the frames
that leave the window, keeps the top-C of persistent ∪ evicted and frees the rest; (3)
allocates the pages of the chunk's retained frames and copies them from scratch. So a layer
holds ``layer(t-1) + transient`` at most during its commit and ``layer(t)`` after it, and
with the layers committing in turn the pool's peak during chunk t's commit is::

    Max((L-1)·layer(t) + layer(t-1) + transient, L·layer(t)) + F·P        (scratch: F·P)

Every per-layer size is non-decreasing in t, so the peak over a run of T chunks is the peak
during chunk T's commit, and a bounded pattern's peak is its value at t → ∞.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from patterns.geometry import VideoGeometry

__all__ = [
    "Footprint",
    "evaluate",
    "window_history",
    "t",
    "frames_per_chunk",
    "pages_per_frame",
    "page_size",
    "num_kv_heads",
    "head_dim",
    "dtype_bytes",
    "layers",
    "batch",
]

# t: committed chunks; the rest describe the model and the geometry.
t = sp.Symbol("t", integer=True, nonnegative=True)
frames_per_chunk = sp.Symbol("F", integer=True, positive=True)
pages_per_frame = sp.Symbol("P", integer=True, positive=True)
page_size = sp.Symbol("page", integer=True, positive=True)
num_kv_heads = sp.Symbol("Hkv", integer=True, positive=True)
head_dim = sp.Symbol("D", integer=True, positive=True)
dtype_bytes = sp.Symbol("bytes", integer=True, positive=True)
layers = sp.Symbol("L", integer=True, positive=True)
batch = sp.Symbol("B", integer=True, positive=True)

#: Bytes of one page slot of K and V over the batch and the kv heads.
PAGE_BYTES = 2 * batch * num_kv_heads * page_size * head_dim * dtype_bytes


@dataclass(frozen=True)
class Footprint:
    """Per-layer cache sizes as functions of the committed chunk count ``t``.

    history_frames: frames a layer holds after t commits (each ``P`` pages).
    persistent_pages: persistent pages a layer holds after t commits.
    transient_pages: extra pages a layer holds during its commit (see module docstring).
    """

    history_frames: sp.Expr
    persistent_pages: sp.Expr
    transient_pages: sp.Expr = sp.Integer(0)

    def layer_pages(self) -> sp.Expr:
        """Pages one layer holds after t commits."""
        return pages_per_frame * self.history_frames + self.persistent_pages

    def held_pages(self) -> sp.Expr:
        """Pages the pool holds after t commits: every layer plus one chunk of scratch."""
        return layers * self.layer_pages() + frames_per_chunk * pages_per_frame

    def peak_pages(self) -> sp.Expr:
        """Most pages the pool holds up to and including the commit of chunk t (t ≥ 1)."""
        now = self.layer_pages()
        before = now.subs(t, t - 1)
        return (
            sp.Max((layers - 1) * now + before + self.transient_pages, layers * now)
            + frames_per_chunk * pages_per_frame
        )

    def peak_bound_pages(self) -> sp.Expr | None:
        """The peak over any number of chunks, or None when the cache grows without bound."""
        bound = sp.simplify(self.peak_pages().subs(t, sp.oo))
        return None if bound.has(sp.oo, sp.zoo, sp.nan) else bound

    def held_bytes(self) -> sp.Expr:
        return self.held_pages() * PAGE_BYTES

    def peak_bytes(self) -> sp.Expr:
        return self.peak_pages() * PAGE_BYTES

    def peak_bound_bytes(self) -> sp.Expr | None:
        pages = self.peak_bound_pages()
        return None if pages is None else pages * PAGE_BYTES

    def __str__(self) -> str:
        return f"KV pages per layer after t chunks: {self.layer_pages()}"


def window_history(window_frames: int | None) -> sp.Expr:
    """Frames a layer holds after t commits when a chunk attends to at most ``window_frames``
    frames, itself included (sinks count inside the window); None keeps every frame."""
    committed = t * frames_per_chunk
    if window_frames is None:
        return committed
    return sp.Min(committed, window_frames - frames_per_chunk)


def evaluate(
    expr: sp.Expr,
    geometry: VideoGeometry,
    *,
    num_layers: int,
    chunks: int | None = None,
    batch_size: int | None = None,
    kv_heads: int | None = None,
    dim: int | None = None,
    element_bytes: int | None = None,
) -> int:
    """Integer value of a footprint expression for a geometry and a model.

    ``chunks`` binds t; the byte sizes (batch_size, kv_heads, dim, element_bytes) are needed
    by the ``*_bytes`` expressions only. Raises ValueError when a symbol stays unbound.
    """
    values = {
        frames_per_chunk: geometry.frames_per_chunk,
        pages_per_frame: geometry.pages_per_frame,
        page_size: geometry.page_size,
        layers: num_layers,
        t: chunks,
        batch: batch_size,
        num_kv_heads: kv_heads,
        head_dim: dim,
        dtype_bytes: element_bytes,
    }
    symbols, fn = _compiled(sp.sympify(expr))
    missing = sorted(str(s) for s in symbols if values.get(s) is None)
    if missing:
        raise ValueError(f"footprint expression still depends on {missing}: pass them")
    value = fn(*(values[s] for s in symbols))
    if value != int(value):
        raise ValueError(f"footprint expression is not an integer here: {value}")
    return int(value)


@functools.lru_cache(maxsize=256)
def _compiled(expr: sp.Expr) -> tuple[tuple[sp.Symbol, ...], Callable[..., int]]:
    """expr as a plain Python function of its free symbols (sympy's subs is ~30 ms a call)."""
    symbols = tuple(sorted(expr.free_symbols, key=str))
    return symbols, sp.lambdify(symbols, expr, modules="math")
