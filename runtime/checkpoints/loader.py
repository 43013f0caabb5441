"""`load_causal_wan`: a real checkpoint into the reference `CausalWanModel`, strictly.

Nothing is half-loaded: the file is read, renamed, merged with its LoRA, checked (keys,
shapes, finite values) and only then assigned to a model built on the meta device, so the
weights are held once (no random init to overwrite) and an error leaves no model behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from runtime.checkpoints.files import CheckpointError, read_checkpoint
from runtime.checkpoints.infer import infer_config
from runtime.checkpoints.lora import merge_lora, read_lora
from runtime.checkpoints.naming import generator_tensors
from runtime.model import CausalWanModel
from runtime.model_config import WanConfig
from runtime.rope import Rope3d

SHOWN = 5  # keys listed per kind of mismatch


def _listing(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")
    return f"{len(names)} {kind} ({shown})"


def check_keys(tensors: Mapping[str, Tensor], expected: Mapping[str, torch.Size], where: str):
    """Strict comparison with the model's state dict: missing, unexpected and mis-shaped keys
    are one error listing the first few of each and their counts."""
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    shaped = sorted(
        f"{k}: {tuple(tensors[k].shape)} vs model {tuple(expected[k])}"
        for k in expected.keys() & tensors.keys()
        if tensors[k].shape != expected[k]
    )
    problems = [
        _listing(kind, names)
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", shaped),
        )
        if names
    ]
    if problems:
        hint = ""
        if any("_img" in k or "img_emb" in k or "add_k_proj" in k for k in unexpected):
            hint = " (image-to-video weights: the reference model is text-to-video only)"
        raise CheckpointError(
            f"{where} does not match CausalWanModel: " + "; ".join(problems) + hint
        )


def check_finite(tensors: Mapping[str, Tensor], where: str) -> None:
    bad = sorted(
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    )
    if bad:
        raise CheckpointError(f"{where}: non-finite values in " + _listing("tensor(s)", bad))


def _target_dtype(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The requested dtype, else the checkpoint's own when every tensor shares it, else fp32."""
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        return dtype
    found = {t.dtype for t in tensors.values()}
    return found.pop() if len(found) == 1 and next(iter(found)).is_floating_point else torch.float32


def load_causal_wan(
    path: str | Path,
    config: WanConfig | str | Mapping | None = None,
    *,
    ema: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
) -> CausalWanModel:
    """A `CausalWanModel` (in eval mode) holding the weights of `path`.

    path: a `.pt`/`.pth` file (Self-Forcing / CausVid / LongLive training checkpoints with
        `generator`/`generator_ema`, or a plain state dict), a `.safetensors` file, or a
        folder with config.json (diffusers `WanTransformer3DModel`, sharded or not, or a
        Wan2.1 release). Wan's original and diffusers' names are both read.
    config: fields the weights do not decide (text_len, latent_height/width, attn_impl, ...)
        as a `WanConfig`, a preset name or a mapping of fields; a field that disagrees with
        the weights or the folder's config.json is an error naming it. Default: the
        `wan2.1-1.3b` preset's values for those fields.
    ema: prefer `generator_ema` over `generator` in a training checkpoint.
    device, dtype: where the weights go (safetensors are read straight onto `device`) and
        their dtype (default: the checkpoint's, if uniform, else float32).
    lora, lora_alpha: a LoRA file or PEFT folder merged into the weights (see
        `runtime.checkpoints.lora`).
    """
    if not isinstance(ema, bool):
        raise TypeError(f"ema must be a bool, got {type(ema).__name__}")
    device = torch.device(device)
    raw = read_checkpoint(path, device)
    where = str(raw.source)
    tensors = generator_tensors(raw.content, ema, where)
    if lora is not None:
        tensors = merge_lora(tensors, read_lora(lora, lora_alpha, device))
        where = f"{where} + LoRA {lora}"
    cfg = infer_config(tensors, config, raw.config, raw.config_path)
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    check_keys(tensors, {k: v.shape for k, v in model.state_dict().items()}, where)
    check_finite(tensors, where)
    target = _target_dtype(tensors, dtype)
    for name in list(tensors):  # one tensor at a time: the source copy is released as we go
        tensors[name] = tensors[name].to(device, target)
    model.load_state_dict(tensors, strict=True, assign=True)
    # Derived tables are in no checkpoint: rebuilt on the device (cast as `.to(device,
    # dtype)` casts them on a freshly built model), not left on meta.
    model.rope = Rope3d(cfg.head_dim, cfg.rope_positions, cfg.rope_theta).to(device, target)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: tensors the checkpoint does not set: {left[:SHOWN]}")
    return model.eval()
