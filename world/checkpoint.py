"""Training checkpoints: named tensors in size-capped safetensors shards plus a JSON index.

A checkpoint is a folder holding `checkpoint.json` (step, free-form metadata, and each
shard's file name, keys and sha256) and shards `state-<step>-<i>.safetensors` of at most
`SHARD_BYTES` each, so that every file stays small enough to copy around on its own.
Saving writes the new shards, then replaces `checkpoint.json` atomically (the commit point),
then deletes the shards no longer listed: an interrupted save leaves the previous
checkpoint intact. Loading verifies every shard's sha256 and key list.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from world.files import (
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    read_verified,
    sha256_bytes,
)

INDEX = "checkpoint.json"
SHARD_BYTES = 12 * 2**20
FORMAT = "sparse-forcing-world-checkpoint/1"


def _shards(tensors: dict[str, Tensor], limit: int) -> list[list[str]]:
    """Keys grouped greedily, in order, into groups of at most `limit` bytes (a tensor
    larger than the limit gets a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def save_checkpoint(folder: Path, step: int, tensors: dict[str, Tensor], meta: dict) -> None:
    """Write `tensors` (name -> tensor, any device) and JSON-able `meta` as the checkpoint
    of `step` in `folder`, replacing the one there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, keys in enumerate(_shards(tensors, SHARD_BYTES)):
        data = save_safetensors({k: tensors[k].detach().cpu().contiguous() for k in keys})
        name = f"state-{step:08d}-{i}.safetensors"
        atomic_write_bytes(folder / name, data)
        shards.append({"file": name, "keys": keys, "sha256": sha256_bytes(data)})
    atomic_write_json(
        folder / INDEX, {"format": FORMAT, "step": step, "meta": meta, "shards": shards}
    )
    listed = {s["file"] for s in shards}
    for stale in folder.glob("state-*.safetensors"):
        if stale.name not in listed:
            stale.unlink()


def has_checkpoint(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def _read_index(folder: Path) -> dict:
    index_path = Path(folder) / INDEX
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no checkpoint here")
    index = read_json(index_path)
    if index.get("format") != FORMAT or not isinstance(index.get("shards"), list):
        raise ValueError(f"{index_path}: not a {FORMAT} index")
    step, meta = index.get("step"), index.get("meta")
    if not isinstance(step, int) or step < 0 or not isinstance(meta, dict):
        raise ValueError(f"{index_path}: step must be an int >= 0 and meta an object")
    return index


def checkpoint_step(folder: Path) -> int:
    """The step of the checkpoint in `folder` (its index only; shards not read)."""
    return _read_index(folder)["step"]


def load_checkpoint_meta(folder: Path) -> dict:
    """The metadata of the checkpoint in `folder` (its index only; shards not read)."""
    return _read_index(folder)["meta"]


def load_checkpoint(folder: Path) -> tuple[int, dict[str, Tensor], dict]:
    """(step, tensors on the CPU, meta) of the checkpoint in `folder`, verified: the index's
    format, every shard's sha256 and exact key list. Errors name the file."""
    folder = Path(folder)
    index = _read_index(folder)
    tensors: dict[str, Tensor] = {}
    for shard in index["shards"]:
        path = folder / str(shard.get("file"))
        loaded = load_safetensors(read_verified(path, str(shard.get("sha256"))))
        if sorted(loaded) != sorted(shard.get("keys", [])):
            raise ValueError(f"{path}: keys differ from the ones listed in {INDEX}")
        tensors.update(loaded)
    return index["step"], tensors, index["meta"]
