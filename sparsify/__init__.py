"""The compiler entry: capture a model's graph, find its attention sites, rewrite them.

`sparsify(model, example_inputs, pattern, ...)` returns a `SparsifiedModule` whose `.plan`
lists every site. Names are imported lazily so that the `sparsify` command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "sparsify": "sparsify.api",
    "SparsifiedModule": "sparsify.api",
    "Plan": "sparsify.plan",
    "PlanRow": "sparsify.plan",
    "AttentionSite": "sparsify.sites",
    "find_sites": "sparsify.sites",
    "capture": "sparsify.capture",
    "Capture": "sparsify.capture",
    "CaptureError": "sparsify.capture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsify' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
