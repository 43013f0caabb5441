"""LoRA adapters (LongLive, PEFT, diffusers) merged into the base weights.

A LoRA file holds, per adapted Linear `m`, `m.lora_A.weight` [r, in] and `m.lora_B.weight`
[out, r] (PEFT's names; `m.lora_A.default.weight` straight from a model's state_dict is
accepted). LongLive saves `{"generator_lora": get_peft_model_state_dict(...)}` of its Wan
model (names under `base_model.model.`) with rank and alpha in its YAML config, not in the
file; a PEFT folder has `adapter_model.safetensors` and `adapter_config.json` (`r`,
`lora_alpha`, `use_rslora`). Merging is W += (alpha / r) · B @ A (alpha / √r with rsLoRA),
computed in float32. alpha: the caller's, else adapter_config.json's, else r (LongLive's own
fallback when its config sets none), which makes the scale 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from runtime.checkpoints.files import CheckpointError, flat_tensors, read_file_tensors, read_json
from runtime.checkpoints.naming import PREFIXES, to_wan_names

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
LORA_PREFIXES = ("transformer.", *PREFIXES)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.default)?\.weight$")


@dataclass
class LoraAdapter:
    """Low-rank updates per target weight (Wan naming): {"blocks.0.self_attn.q.weight":
    (A [r, in], B [out, r])}, with the scale alpha / r (or alpha / √r) already chosen."""

    pairs: dict[str, tuple[Tensor, Tensor]]
    scale: dict[str, float]
    source: Path


def _adapter_config(folder: Path) -> dict | None:
    path = folder / "adapter_config.json"
    return read_json(path) if path.is_file() else None


def read_lora(path: str | Path, alpha: float | None, device: torch.device) -> LoraAdapter:
    """A LoRA file or PEFT folder, its keys in Wan naming, with scales decided."""
    if alpha is not None and (
        not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0
    ):
        raise ValueError(f"lora_alpha must be a positive number or None, got {alpha!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"LoRA {path} does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        found = [path / name for name in ADAPTER_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: no {' or '.join(ADAPTER_FILES)} in the LoRA folder")
        path = found[0]
    content = read_file_tensors(path, device)
    if isinstance(content, dict) and "generator_lora" in content:
        content = content["generator_lora"]  # LongLive's {"generator_lora", "critic_lora"}
    tensors = flat_tensors(content, str(path))
    settings = _adapter_config(folder) or {}
    if settings.get("use_dora"):
        raise CheckpointError(f"{folder / 'adapter_config.json'}: DoRA adapters are not supported")

    halves: dict[str, dict[str, Tensor]] = {}
    bad = []
    for name, tensor in tensors.items():
        match = _KEY.match(name)
        if match is None or tensor.ndim != 2:
            bad.append(name)
            continue
        halves.setdefault(match["module"], {})[match["side"]] = tensor
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} key(s) are not 2-D lora_A/lora_B weights, e.g. {sorted(bad)[:3]}"
        )
    lonely = sorted(m for m, h in halves.items() if len(h) != 2)
    if lonely:
        raise CheckpointError(f"{path}: lora_A without lora_B (or the reverse) for {lonely[:3]}")

    modules = {m: f"{m}.weight" for m in halves}
    renamed = to_wan_names(
        {w: halves[m]["A"] for m, w in modules.items()}, str(path), LORA_PREFIXES
    )
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    scale: dict[str, float] = {}
    for module, target in zip(modules, renamed, strict=True):
        down, up = halves[module]["A"], halves[module]["B"]
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise CheckpointError(
                f"{path}: {module}: lora_B {tuple(up.shape)} does not match lora_A "
                f"{tuple(down.shape)} (rank {rank})"
            )
        if "r" in settings and settings["r"] != rank and not settings.get("rank_pattern"):
            raise CheckpointError(
                f"{path}: {module} has rank {rank}, adapter_config.json says r={settings['r']}"
            )
        value = alpha if alpha is not None else settings.get("lora_alpha", rank)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise CheckpointError(f"{folder}: adapter_config.json lora_alpha={value!r} is invalid")
        pairs[target] = (down, up)
        scale[target] = value / (math.sqrt(rank) if settings.get("use_rslora") else rank)
    return LoraAdapter(pairs, scale, path)


def merge_lora(tensors: dict[str, Tensor], adapter: LoraAdapter) -> dict[str, Tensor]:
    """New weights W + scale · B @ A for every adapted key (a new dict; `tensors` untouched).
    A target missing from the base or of another shape is an error listing them."""
    missing = sorted(set(adapter.pairs) - tensors.keys())
    if missing:
        raise CheckpointError(
            f"{adapter.source}: {len(missing)} LoRA target(s) are not weights of the base "
            f"checkpoint, e.g. {missing[:3]}"
        )
    merged = dict(tensors)
    for name, (down, up) in adapter.pairs.items():
        base = tensors[name]
        shape = (up.shape[0], down.shape[1])
        if tuple(base.shape) != shape:
            raise CheckpointError(
                f"{adapter.source}: LoRA for {name} is {shape}, the base weight is "
                f"{tuple(base.shape)}"
            )
        delta = up.to(base.device, torch.float32) @ down.to(base.device, torch.float32)
        merged[name] = (base.float() + adapter.scale[name] * delta).to(base.dtype)
    return merged
