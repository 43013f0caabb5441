"""Exported world weights: round trip through safetensors, manifest, tamper detection."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.model_config import WanConfig
from runtime.rollout import SelfForcingSchedule
from world.checkpoint import load_checkpoint
from world.files import sha256_bytes
from world.train import main
from world.weights import WORLD_SCHEDULE, export_weights, load_world_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    main(
        [
            "--out",
            str(run),
            "--preset",
            "tiny-test",
            "--no-progress",
            "--device",
            "cpu",
            "--steps",
            "3",
            "--eval-every",
            "3",
            "--checkpoint-every",
            "3",
            "--eval-clips",
            "1",
        ]
    )
    weights = run / "weights"
    main(["--export", str(run), "--weights-out", str(weights)])
    return run, weights


@pytest.fixture
def copy(exported, tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(exported[1], folder)
    return folder


def test_weights_round_trip_and_match_the_manifest(exported):
    run, weights = exported
    manifest = json.loads((weights / "manifest.json").read_text())
    data = (weights / "world.safetensors").read_bytes()
    assert manifest["sha256"] == sha256_bytes(data) and manifest["steps"] == 3
    assert manifest["preset"] == "tiny-test" and manifest["data_seed"] == 0
    assert manifest["card"] == "cpu" and manifest["final_eval_loss"] > 0
    assert manifest["command"][0].startswith("python -m world.train --out")
    assert {"torch", "triton"} <= set(manifest["versions"])
    model = load_world_model(weights, dtype=torch.float64)
    assert model.config == WanConfig(**manifest["config"])
    _, tensors, _ = load_checkpoint(run / "checkpoint")
    state = model.state_dict()
    assert set(state) == {k[len("ema/") :] for k in tensors if k.startswith("ema/")}
    for key, value in state.items():
        assert value.dtype == torch.float64
        assert torch.equal(value, tensors[f"ema/{key}"].double()), key
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 3, cfg.latent_height, cfg.latent_width).double()
    out = model(x, torch.zeros(1, 3), torch.zeros(1, 1, cfg.text_dim).double(), 0)
    assert torch.isfinite(out).all()


def test_world_schedule_is_self_forcing_four_steps():
    assert isinstance(WORLD_SCHEDULE, SelfForcingSchedule)
    assert WORLD_SCHEDULE.denoising_steps == (1000.0, 750.0, 500.0, 250.0)
    assert WORLD_SCHEDULE.shift == 5.0


def test_tampered_weights_file_is_detected(copy):
    path = copy / "world.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="world.safetensors: sha256 .* does not match"):
        load_world_model(copy)


def _rewrite(folder, tensors=None, **manifest_changes):
    """Rewrite the weights (with a matching sha256) and/or the manifest's fields."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if tensors is not None:
        save_file(tensors, folder / "world.safetensors")
        manifest["sha256"] = sha256_bytes((folder / "world.safetensors").read_bytes())
    manifest.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_tampered_manifest_is_detected(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    _rewrite(copy, sha256="0" * 64)
    with pytest.raises(ValueError, match="does not match"):
        load_world_model(copy)
    _rewrite(copy, sha256=manifest["sha256"], config={**manifest["config"], "dim": 48})
    with pytest.raises(ValueError, match=r"world.safetensors: .* has shape"):
        load_world_model(copy)
    _rewrite(copy, config={**manifest["config"], "colour": 1})
    with pytest.raises(ValueError, match="manifest.json: config is not a valid WanConfig"):
        load_world_model(copy)
    _rewrite(copy, config=manifest["config"], preset="world")
    with pytest.raises(ValueError, match="differs from the 'world' preset"):
        load_world_model(copy)
    (copy / "manifest.json").write_text("[]")
    with pytest.raises(ValueError, match="manifest.json: expected a JSON object"):
        load_world_model(copy)


def test_bad_tensors_are_named(copy):
    tensors = load_file(copy / "world.safetensors")
    key = "blocks.0.ffn.0.weight"
    _rewrite(copy, {**tensors, key: torch.full_like(tensors[key], float("nan"))})
    with pytest.raises(ValueError, match=f"{key} holds non-finite"):
        load_world_model(copy)
    _rewrite(copy, {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ValueError, match=f"missing keys \\['{key}'\\]"):
        load_world_model(copy)
    _rewrite(copy, {**tensors, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        load_world_model(copy)


def test_export_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        export_weights(tmp_path, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()
