"""The `WanConfig` of a checkpoint: from its tensor shapes, its config.json and the caller.

Every source states some fields; a field two sources state differently is an error naming
the field and both sources. The shapes give dim, num_layers, ffn_dim, text_dim, freq_dim,
in/out channels and the kv width; the head count is not in any shape, so it comes from a
config (diffusers' `num_attention_heads`, Wan's `num_heads`, the caller's) or, failing
those, from Wan's head_dim of 128. Fields no weight decides (text_len, latent size, RoPE
table, attention spelling) come from the caller or from the `wan2.1-1.3b` preset.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from runtime.checkpoints.files import CheckpointError
from runtime.model_config import PATCH_SIZE, WanConfig

DEFAULT_PRESET = "wan2.1-1.3b"
WAN_HEAD_DIM = 128
FIELDS = {f.name for f in dataclasses.fields(WanConfig)}
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _shape(tensors: Mapping[str, Tensor], name: str, ndim: int) -> tuple[int, ...]:
    if name not in tensors:
        raise CheckpointError(f"cannot infer the config: the checkpoint has no {name!r}")
    shape = tuple(tensors[name].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{name!r} has shape {shape}, expected {ndim} dimensions")
    return shape


def shape_fields(tensors: Mapping[str, Tensor]) -> dict[str, int]:
    """Fields the tensor shapes decide (Wan naming); `kv_dim` is num_kv_heads · head_dim."""
    out_dim, in_channels, *kernel = _shape(tensors, "patch_embedding.weight", 5)
    if tuple(kernel) != PATCH_SIZE:
        raise CheckpointError(
            f"patch_embedding.weight has kernel {tuple(kernel)}; the reference model's patch "
            f"is {PATCH_SIZE}"
        )
    layers = {int(m.group(1)) for name in tensors if (m := _LAYER.match(name))}
    if not layers:
        raise CheckpointError("cannot infer the config: the checkpoint has no blocks.N.* keys")
    head_out = _shape(tensors, "head.head.weight", 2)[0]
    patch = math.prod(PATCH_SIZE)
    if head_out % patch:
        raise CheckpointError(f"head.head.weight has {head_out} rows, not a multiple of {patch}")
    return {
        "dim": out_dim,
        "in_channels": in_channels,
        "num_layers": max(layers) + 1,
        "ffn_dim": _shape(tensors, "blocks.0.ffn.0.weight", 2)[0],
        "text_dim": _shape(tensors, "text_embedding.0.weight", 2)[1],
        "freq_dim": _shape(tensors, "time_embedding.0.weight", 2)[1],
        "out_channels": head_out // patch,
        "kv_dim": _shape(tensors, "blocks.0.self_attn.k.weight", 2)[0],
    }


def _require(config: Mapping, key: str, expected: object, where: str) -> None:
    value = config.get(key, expected)
    if isinstance(expected, tuple) and isinstance(value, list):
        value = tuple(value)
    if value != expected:
        raise CheckpointError(
            f"{where}: {key}={value!r} is not supported by the reference model (needs {expected!r})"
        )


def file_fields(config: Mapping, where: str) -> dict[str, object]:
    """WanConfig fields of a diffusers `WanTransformer3DModel` or a Wan2.1 `WanModel`
    config.json; variants the reference model does not have are errors naming the key."""
    if config.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in config:
        _require(config, "patch_size", PATCH_SIZE, where)
        _require(config, "cross_attn_norm", True, where)
        _require(config, "qk_norm", "rms_norm_across_heads", where)
        for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            _require(config, key, None, where)  # image-to-video inputs
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        names = {
            "in_channels": "in_channels", "out_channels": "out_channels", "text_dim": "text_dim",
            "freq_dim": "freq_dim", "ffn_dim": "ffn_dim", "num_layers": "num_layers",
            "eps": "eps", "rope_max_seq_len": "rope_positions",
        }  # fmt: skip
        fields = {"num_heads": heads, "dim": heads * head_dim}
    elif "dim" in config and "num_heads" in config:  # Wan2.1's own config.json
        _require(config, "model_type", "t2v", where)
        _require(config, "patch_size", PATCH_SIZE, where)
        _require(config, "qk_norm", True, where)
        _require(config, "cross_attn_norm", True, where)
        names = {
            "dim": "dim", "num_heads": "num_heads", "num_layers": "num_layers",
            "ffn_dim": "ffn_dim", "freq_dim": "freq_dim", "in_dim": "in_channels",
            "out_dim": "out_channels", "text_dim": "text_dim", "text_len": "text_len",
            "eps": "eps",
        }  # fmt: skip
        fields = {}
    else:
        raise CheckpointError(
            f"{where}: neither a diffusers WanTransformer3DModel nor a Wan2.1 WanModel config"
        )
    fields.update({field: config[key] for key, field in names.items() if key in config})
    return fields


def _caller_fields(config: WanConfig | str | Mapping | None) -> dict[str, object]:
    if config is None:
        return {}
    if isinstance(config, str):
        config = WanConfig.preset(config)
    if isinstance(config, WanConfig):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        unknown = set(config) - FIELDS
        if unknown:
            raise ValueError(f"config has unknown WanConfig fields {sorted(unknown)}")
        return dict(config)
    raise TypeError(
        f"config must be a WanConfig, a preset name, a mapping of WanConfig fields or None, "
        f"got {type(config).__name__}"
    )


def _merge(sources: list[tuple[str, dict[str, object]]]) -> dict[str, object]:
    merged: dict[str, tuple[str, object]] = {}
    for where, fields in sources:
        for field, value in fields.items():
            if field in merged and merged[field][1] != value:
                first, seen = merged[field]
                raise CheckpointError(
                    f"config conflict on {field}: {seen!r} from {first}, {value!r} from {where}"
                )
            merged.setdefault(field, (where, value))
    return {field: value for field, (_, value) in merged.items()}


def infer_config(
    tensors: Mapping[str, Tensor],
    config: WanConfig | str | Mapping | None = None,
    file_config: Mapping | None = None,
    file_path: Path | None = None,
) -> WanConfig:
    """The config of `tensors` (Wan naming), checked against config.json and `config`."""
    shapes = shape_fields(tensors)
    kv_dim = shapes.pop("kv_dim")
    sources = [("the weights", shapes)]
    if file_config is not None:
        sources.append((str(file_path or "config.json"), file_fields(file_config, str(file_path))))
    sources.append(("config", _caller_fields(config)))
    fields = _merge(sources)
    if "num_heads" not in fields:
        if fields["dim"] % WAN_HEAD_DIM:
            raise CheckpointError(
                f"cannot infer num_heads: dim {fields['dim']} is not a multiple of Wan's "
                f"head_dim {WAN_HEAD_DIM}; pass config={{'num_heads': ...}}"
            )
        fields["num_heads"] = fields["dim"] // WAN_HEAD_DIM
    head_dim = fields["dim"] // fields["num_heads"]
    if kv_dim % head_dim:
        raise CheckpointError(
            f"blocks.0.self_attn.k.weight has {kv_dim} rows, not a multiple of head_dim "
            f"{head_dim} (dim {fields['dim']} / num_heads {fields['num_heads']})"
        )
    fields = _merge(
        [("the weights and num_heads", {"num_kv_heads": kv_dim // head_dim}), ("config", fields)]
    )
    try:
        return WanConfig.preset(DEFAULT_PRESET, **fields)
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's config is invalid: {exc}") from exc
