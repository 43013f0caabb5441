"""The compiler entry: capture a model's graph, find its attention sites, rewrite them.

`sparsify(model, example_inputs, pattern, ...)` returns a `SparsifiedModule` whose `.plan`
lists every site. Names are imported lazily so that the `sparsify` command line starts fast.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from pathlib import Path
from typing import Any


def _version() -> str:
    """The installed distribution's version; in a checkout that is not installed, the
    version its pyproject.toml declares."""
    try:
        return metadata.version("sparse-forcing")
    except metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


__version__ = _version()

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
