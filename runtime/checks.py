"""Argument checks shared by the runtime's attention modules and runners."""

from __future__ import annotations

import torch

from codegen.api import BACKENDS
from patterns import Pattern, VideoGeometry
from patterns.checks import check_int

__all__ = ["check_backend", "check_layout", "check_max_frames", "check_reset_args"]


def check_backend(backend: object) -> str:
    """``backend`` if it is one of ``codegen.api.BACKENDS``, else a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_layout(
    pattern: object, geometry: object, num_heads: object, num_kv_heads: object, head_dim: object
) -> None:
    """TypeError/ValueError naming the first of the arguments of an attention layer that is
    not what it must be (a Pattern, a VideoGeometry, positive head counts with
    ``num_kv_heads | num_heads``, a positive head_dim)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a patterns.Pattern, got {type(pattern).__name__}")
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
    for name, value in (
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
    ):
        check_int(value, name)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")


def check_max_frames(max_frames: object) -> int | None:
    """``max_frames`` if it is None (no limit) or a positive int, else a ValueError."""
    return None if max_frames is None else check_int(max_frames, "max_frames")


def check_reset_args(
    batch_size: object,
    dtype: object,
    num_frames: object,
    frames_per_chunk: int,
    max_frames: int | None,
) -> None:
    """The checks of ``ChunkRunner.reset``'s arguments, before a runner touches its cache:
    positive ``batch_size``; ``num_frames`` a positive multiple of ``frames_per_chunk`` and
    at most ``max_frames`` (None: no limit); ``dtype`` a torch.dtype."""
    check_int(batch_size, "batch_size")
    check_int(num_frames, "num_frames")
    if num_frames % frames_per_chunk:
        raise ValueError(
            f"num_frames must be a multiple of frames_per_chunk={frames_per_chunk}, "
            f"got {num_frames}"
        )
    if max_frames is not None and num_frames > max_frames:
        raise ValueError(
            f"num_frames={num_frames} exceeds the runner's limit of max_frames={max_frames} "
            "frames (the positions its model can encode)"
        )
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
