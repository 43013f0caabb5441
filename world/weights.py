"""The trained world model's weights: export from a training checkpoint, verified loading.

`world/weights/world.safetensors` holds the EMA weights (float32) and
`world/weights/manifest.json` what produced them: the model config, the training recipe and
data seed, steps, final train and held-out losses, the card, the date, the command lines,
the torch/triton versions and the sha256 of the weights file. `load_world_model` refuses a
file that does not match its manifest.

`WORLD_SCHEDULE` samples the world model: Self-Forcing's 4 steps (t = 1000, 750, 500, 250,
shift 5), the schedule the model was trained for (noise levels drawn with the same shift).
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from runtime.model import CausalWanModel
from runtime.model_config import WanConfig
from runtime.rollout import SelfForcingSchedule
from world.checkpoint import load_checkpoint
from world.files import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "world.safetensors"
MANIFEST_FILE = "manifest.json"
WORLD_SCHEDULE = SelfForcingSchedule()

_MANIFEST_KEYS = ("config", "preset", "data_seed", "steps", "sha256", "weights")


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def export_weights(checkpoint: Path, out_dir: Path = WEIGHTS_DIR) -> dict:
    """Write the EMA weights of `checkpoint` (a run folder or its `checkpoint/`) as
    `out_dir/world.safetensors` and `out_dir/manifest.json`; returns the manifest."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "checkpoint").is_dir():
        checkpoint = checkpoint / "checkpoint"
    step, tensors, meta = load_checkpoint(checkpoint)
    weights = {
        k[len("ema/") :]: v.float().contiguous() for k, v in tensors.items() if k.startswith("ema/")
    }
    if not weights:
        raise ValueError(f"{checkpoint}: the checkpoint holds no EMA weights")
    data = save_safetensors(weights)
    records = meta.get("records", [])
    recipe = meta["recipe"]
    manifest = {
        "weights": WEIGHTS_FILE,
        "sha256": sha256_bytes(data),
        "config": meta["model_config"],
        "preset": recipe["preset"],
        "recipe": recipe,
        "data_seed": recipe["seed"],
        "steps": step,
        "final_train_loss": _last(records, "loss"),
        "final_eval_loss": _last(records, "eval_loss_ema"),
        "final_eval_loss_raw": _last(records, "eval_loss"),
        "card": meta.get("card"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": meta.get("commands", []),
        "versions": meta.get("versions", {}),
        "parameters": sum(v.numel() for v in weights.values()),
    }
    out_dir = Path(out_dir)
    # Weights first: a manifest never names a file that is not (yet) there.
    atomic_write_bytes(out_dir / WEIGHTS_FILE, data)
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def _config_from(manifest: dict, where: Path) -> WanConfig:
    """The manifest's model config; the `world` preset's must equal the code's preset."""
    try:
        config = WanConfig(**manifest["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: config is not a valid WanConfig ({error})") from None
    if manifest["preset"] == "world":
        preset = dataclasses.replace(WanConfig.preset("world"), seed=config.seed)
        if config != preset:
            raise ValueError(
                f"{where}: config differs from the 'world' preset of runtime/model_config.py "
                f"({config} vs {preset})"
            )
    return config


def load_world_model(
    path: Path | None = None, *, device="cpu", dtype: torch.dtype = torch.float32
) -> CausalWanModel:
    """The trained world model (eval mode) from `path` (a folder with world.safetensors and
    manifest.json, default the package's `world/weights/`), verified: the sha256 of the
    weights, the config, every key and shape strictly, every tensor finite. Errors name the
    file and the key."""
    folder = WEIGHTS_DIR if path is None else Path(path)
    if folder.suffix == ".safetensors":
        folder = folder.parent
    manifest_path = folder / MANIFEST_FILE
    manifest = read_json(manifest_path)
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{manifest_path}: missing keys {missing}")
    weights_path = folder / str(manifest["weights"])
    data = weights_path.read_bytes()
    if sha256_bytes(data) != manifest["sha256"]:
        raise ValueError(
            f"{weights_path}: sha256 {sha256_bytes(data)} does not match {manifest_path} "
            f"({manifest['sha256']})"
        )
    config = _config_from(manifest, manifest_path)
    try:
        tensors = load_safetensors(data)
    except SafetensorError as error:
        raise ValueError(f"{weights_path}: not a safetensors file ({error})") from None
    with torch.device("meta"):
        model = CausalWanModel(config)
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    absent = sorted(set(expected) - set(tensors))
    if unexpected or absent:
        raise ValueError(f"{weights_path}: missing keys {absent}, unexpected keys {unexpected}")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise ValueError(
                f"{weights_path}: {key} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
            )
        if not got.dtype.is_floating_point or not torch.isfinite(got).all():
            raise ValueError(f"{weights_path}: {key} holds non-finite or non-float values")
    model.load_state_dict(tensors, strict=True, assign=True)
    # RoPE tables are derived buffers (not in the file): rebuild them off the meta device.
    model.rope = type(model.rope)(config.head_dim, config.rope_positions, config.rope_theta)
    return model.to(device=device, dtype=dtype).eval()


__all__ = ["WORLD_SCHEDULE", "WEIGHTS_DIR", "export_weights", "load_world_model"]
