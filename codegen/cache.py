"""On-disk cache of generated kernel sources, and `get_kernel(spec)` to import one.

Triton's @jit reads the kernel's source with inspect.getsource, so each kernel lives in a
real file: `<cache dir>/kernels/<spec.name>_<hash>.py`, where the hash covers the spec, the
template (and renderer) and the Triton version. Files are written to a temporary name and
moved into place with os.replace, so concurrent processes generating the same kernel are safe.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import triton

from codegen.render import render, runtime_int_args, template_fingerprint
from codegen.spec import KernelSpec

_modules: dict[Path, ModuleType] = {}


def cache_dir() -> Path:
    """$SPARSE_FORCING_CACHE_DIR, else $XDG_CACHE_HOME/sparse_forcing (~/.cache/...)."""
    override = os.environ.get("SPARSE_FORCING_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse_forcing"


def kernel_path(spec: KernelSpec) -> Path:
    digest = spec.digest(template_fingerprint(), triton.__version__)
    return cache_dir() / "kernels" / f"{spec.name}_{digest}.py"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def kernel_source_path(spec: KernelSpec) -> Path:
    """Path of the spec's generated source, rendering and writing it only if missing."""
    path = kernel_path(spec)
    if not path.exists():
        _atomic_write(path, render(spec))
    return path


def _import(path: Path) -> ModuleType:
    module = _modules.get(path)
    if module is None:
        name = f"sparse_forcing_kernels.{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        _modules[path] = module
    return module


def get_kernel(spec: KernelSpec, *, interpret: bool | None = None):
    """The spec's kernel: a triton JITFunction, or (interpret=True) an interpreted one.

    interpret=None follows TRITON_INTERPRET as Triton itself does at import time.
    """
    kernel = getattr(_import(kernel_source_path(spec)), spec.name)
    is_interpreted = type(kernel).__name__ == "InterpretedFunction"
    if interpret is None or interpret == is_interpreted:
        return kernel
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(kernel.fn, do_not_specialize=list(runtime_int_args(spec)))
    raise RuntimeError(
        "get_kernel: TRITON_INTERPRET=1 was set when the kernel was imported; "
        "the compiled kernel is unavailable in this process"
    )
