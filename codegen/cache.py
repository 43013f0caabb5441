"""On-disk cache of generated kernel sources, and `get_kernel(spec)` to import one.

Triton's @jit reads the kernel's source with inspect.getsource, so each kernel lives in a
real file: `<cache dir>/kernels/<spec.name>_<hash>.py` (`..._bwd_<hash>.py` for the backward
module), where the hash covers the spec, the templates (and renderer) and the Triton version.
Files are written to a temporary name and moved into place with os.replace, so concurrent
processes generating the same kernel are safe.

A cached file is trusted only after it is compared with a fresh render (cheap, once per file
and process): a file damaged after it was written (cut short, edited) would otherwise compile
into a kernel that returns garbage. A mismatch is rewritten with a warning. A cache dir that
cannot be written is replaced by a temporary directory for the rest of the process, with one
warning.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import triton

from codegen.render import (
    kernel_name,
    module_of,
    render,
    runtime_int_args,
    template_fingerprint,
)
from codegen.spec import KernelSpec

_modules: dict[Path, ModuleType] = {}
# Files checked against a fresh render in this process.
_verified: set[Path] = set()
# Unwritable kernel dirs -> the temporary dir used instead.
_fallbacks: dict[Path, Path] = {}


def cache_dir() -> Path:
    """$SPARSE_FORCING_CACHE_DIR, else $XDG_CACHE_HOME/sparse_forcing (~/.cache/...)."""
    override = os.environ.get("SPARSE_FORCING_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sparse_forcing"


def kernel_path(spec: KernelSpec, module: str = "fwd") -> Path:
    """Where the spec's source of `module` ("fwd" | "bwd") belongs (in the fallback dir if
    the cache dir is unwritable)."""
    digest = spec.digest(template_fingerprint(module), triton.__version__)
    folder = cache_dir() / "kernels"
    stem = spec.name if module == "fwd" else f"{spec.name}_{module}"
    return _fallbacks.get(folder, folder) / f"{stem}_{digest}.py"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same dir and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):  # missing, unreadable or not text: rewrite it
        return None


def _write(path: Path, text: str) -> Path:
    """Write the source, falling back (once per dir, with a warning) to a temporary dir."""
    try:
        atomic_write(path, text)
        return path
    except OSError as err:
        folder = path.parent
        if folder in _fallbacks.values():
            raise
        fallback = Path(tempfile.mkdtemp(prefix="sparse_forcing_kernels_"))
        warnings.warn(
            f"kernel cache {folder} is not writable ({err}); using {fallback} for this process",
            stacklevel=4,
        )
        _fallbacks[folder] = fallback
        return _write(fallback / path.name, text)


def kernel_source_path(spec: KernelSpec, module: str = "fwd") -> Path:
    """Path of the spec's generated source of `module`, verified against a fresh render
    (once per process) and written if missing or different."""
    path = kernel_path(spec, module)
    if path in _verified:
        return path
    text = render(spec, module)
    found = _read(path)
    if found != text:
        if found is not None:
            warnings.warn(
                f"kernel cache: {path} differs from its render (damaged); regenerating",
                stacklevel=3,
            )
        path = _write(path, text)
    _verified.add(path)
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


def get_kernel(spec: KernelSpec, *, interpret: bool | None = None, kernel: str = "fwd"):
    """The spec's kernel `kernel` ("fwd", or a backward one: "bwd_delta", "bwd_dq",
    "bwd_dkdv"): a triton JITFunction, or (interpret=True) an interpreted one.

    interpret=None follows TRITON_INTERPRET as Triton itself does at import time.
    """
    module = _import(kernel_source_path(spec, module_of(kernel)))
    fn = getattr(module, kernel_name(spec, kernel))
    is_interpreted = type(fn).__name__ == "InterpretedFunction"
    if interpret is None or interpret == is_interpreted:
        return fn
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn.fn, do_not_specialize=list(runtime_int_args(spec, kernel)))
    raise RuntimeError(
        "get_kernel: TRITON_INTERPRET=1 was set when the kernel was imported; "
        "the compiled kernel is unavailable in this process"
    )
