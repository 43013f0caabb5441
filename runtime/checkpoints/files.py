"""Reading checkpoint files: `.pt`/`.pth`/`.bin`, `.safetensors` and model folders.

Tensors are opened without a second copy: `torch.load(..., mmap=True, weights_only=True)`
maps a zip-format pickle and `safetensors.safe_open` maps the file and places each tensor on
the target device as it is read. A folder is a diffusers model folder (`config.json` and
`diffusion_pytorch_model.safetensors`, or shards listed by a `*.safetensors.index.json`) or
a Wan2.1 release folder (`config.json` of `WanModel` with the same file names); a diffusers
pipeline folder is read through its `transformer/` subfolder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
)
INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or key at fault."""


@dataclass
class RawCheckpoint:
    """What a checkpoint file or folder holds, before any renaming.

    content: the loaded object (a flat mapping of tensors for safetensors and folders; for
        `.pt` files whatever the pickle holds, e.g. Self-Forcing's {"generator": ...}).
    config: the folder's config.json (None for a single file); config_path: where it was.
    """

    source: Path
    content: Any
    config: dict | None = None
    config_path: Path | None = None


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_torch(path: Path) -> Any:
    """A `.pt` file's content, tensors on the CPU (memory-mapped where the format allows)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # legacy (non-zip) pickles cannot be mapped
            raise CheckpointError(f"{path}: cannot be read by torch.load ({exc})") from exc
    except Exception as exc:  # unpickling errors, truncated zips, non-tensor objects
        raise CheckpointError(
            f"{path}: cannot be read by torch.load(weights_only=True) ({exc}); a checkpoint "
            "must hold tensors (and dicts of them) only"
        ) from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read by torch.load ({exc})") from exc


def read_safetensors(path: Path, device: torch.device) -> dict[str, Tensor]:
    """Every tensor of a `.safetensors` file, read straight onto `device`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_sharded(index_path: Path, device: torch.device) -> dict[str, Tensor]:
    """Shards listed by a diffusers/transformers `*.safetensors.index.json`, checked against
    the index: every listed key must be in the shard the index names, and nothing more."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: has no 'weight_map' of key -> shard file")
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(
                f"{index_path}: lists shard {shard}, missing in {index_path.parent}"
            )
        part = read_safetensors(shard_path, device)
        listed = {k for k, v in weight_map.items() if v == shard}
        if listed - part.keys():
            missing = sorted(listed - part.keys())
            raise CheckpointError(
                f"{shard_path}: lacks {len(missing)} key(s) its index lists, e.g. {missing[:3]}"
            )
        if part.keys() - listed:
            extra = sorted(part.keys() - listed)
            raise CheckpointError(
                f"{shard_path}: holds {len(extra)} key(s) its index does not list, e.g. {extra[:3]}"
            )
        tensors.update(part)
    return tensors


def _folder_weights(folder: Path, device: torch.device) -> dict[str, Tensor]:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: more than one shard index ({[p.name for p in indexes]})")
    if indexes:
        return _read_sharded(indexes[0], device)
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return read_file_tensors(folder / name, device)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return read_safetensors(files[0], device)
    raise CheckpointError(
        f"{folder}: no weights found (looked for a *{INDEX_SUFFIX} index, "
        f"{', '.join(WEIGHT_NAMES)} or a single *.safetensors file)"
    )


def read_file_tensors(path: Path, device: torch.device) -> Any:
    """A single weights file: a safetensors mapping or a `.pt` file's content."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, device)
    if path.suffix in TORCH_SUFFIXES:
        return read_torch(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint suffix {path.suffix!r}; expected .safetensors, "
        f"{', '.join(TORCH_SUFFIXES)} or a model folder"
    )


def read_checkpoint(path: str | Path, device: torch.device) -> RawCheckpoint:
    """Open `path` (a file or a model folder) without interpreting its names."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        return RawCheckpoint(path, read_file_tensors(path, device))
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"  # a diffusers pipeline folder
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path}: a checkpoint folder needs a config.json (none found)")
    return RawCheckpoint(path, _folder_weights(path, device), read_json(config_path), config_path)


def flat_tensors(content: Any, where: str) -> dict[str, Tensor]:
    """`content` as a flat {name: tensor} mapping; anything else is an error naming the key."""
    if not isinstance(content, Mapping):
        raise CheckpointError(
            f"{where}: expected a mapping of names to tensors, got {type(content).__name__}"
        )
    bad = [
        str(k) for k, v in content.items() if not isinstance(k, str) or not isinstance(v, Tensor)
    ]
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} entr(y/ies) are not tensors, e.g. {bad[:3]}; expected a flat "
            "state dict"
        )
    return dict(content)
