"""Scorer weights files: the projections of every ``BlockScorer`` of a model, in safetensors.

Keys are module paths (``"blocks.3.attn.scorer.wq"``), so a file loads into any module of the
same structure. A file is written atomically (``patterns.files.atomic_path``) and checked in
full when read back: every key the module expects, no other, each a finite floating-point
tensor of the shape of the projection it is loaded into. A rejected file changes nothing.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from patterns.files import atomic_path
from patterns.scoring import iter_scorers

__all__ = ["save_scorers", "load_scorers"]


def _projections(module: nn.Module) -> dict[str, Tensor]:
    """Every scorer projection of ``module`` by its state_dict key."""
    tensors = {}
    for name, scorer in iter_scorers(module):
        prefix = f"{name}." if name else ""
        for pname, param in scorer.named_parameters(recurse=False):
            tensors[prefix + pname] = param
    return tensors


def _check_values(tensors: dict[str, Tensor], where: str) -> None:
    """ValueError naming the first key whose tensor is not finite floating point."""
    for key, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            raise ValueError(
                f"{where}: {key!r} is {tensor.dtype}, expected a floating-point tensor"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{where}: {key!r} holds NaN or inf")


def save_scorers(module: nn.Module, path: str | os.PathLike) -> None:
    """Write the projections of every ``BlockScorer`` in ``module`` to the safetensors file
    ``path`` (atomically: a failed save leaves any previous file as it was)."""
    from safetensors.torch import save

    tensors = {k: t.detach().to("cpu").contiguous() for k, t in _projections(module).items()}
    if not tensors:
        raise ValueError(f"module contains no BlockScorer ({type(module).__name__})")
    _check_values(tensors, f"module {type(module).__name__}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(save(tensors))


def load_scorers(module: nn.Module, path: str | os.PathLike) -> None:
    """Load a scorer weights file written by ``save_scorers`` into ``module``'s
    ``BlockScorer``s.

    Raises ``ValueError`` naming the file (and changes nothing) when it is not a safetensors
    file, when keys are missing or unexpected, when a tensor is not floating point or holds
    NaN/inf (naming the key), or when a shape differs from the projection it is loaded into.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"scorer weights file {os.fspath(path)!r}"
    params = _projections(module)
    try:
        loaded = load_file(os.fspath(path))
    except SafetensorError as error:
        raise ValueError(f"{where} is not a readable safetensors file: {error}") from None
    missing = sorted(params.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - params.keys())
    mismatched = [
        f"{key}: file {tuple(loaded[key].shape)} vs module {tuple(params[key].shape)}"
        for key in sorted(params.keys() & loaded.keys())
        if loaded[key].shape != params[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{where} does not match the module: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}"
        )
    _check_values(loaded, where)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(loaded[key])
