"""Teacher-forcing training on the tiny world: it learns, it resumes exactly, it refuses
what would break a run, and its checkpoints survive interruption and detect tampering."""

import json

import pytest
import torch

import world.checkpoint as checkpoint_module
from world.checkpoint import load_checkpoint, save_checkpoint
from world.scenes import TRAIN_SEEDS
from world.train import TRAIN_PRESETS, main, make_recipe
from world.trainer import Trainer, step_seeds

TINY = ["--preset", "tiny-test", "--no-progress", "--device", "cpu"]


def _timeless(records):
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]


def test_step_seeds_are_a_pure_function_of_seed_and_step():
    a = step_seeds(0, 7, 16)
    assert a == step_seeds(0, 7, 16)
    assert a != step_seeds(0, 8, 16) and a != step_seeds(1, 7, 16)
    assert all(s in TRAIN_SEEDS for s in a)


@pytest.mark.slow
def test_a_few_steps_lower_the_heldout_loss(tmp_path):
    recipe = make_recipe("tiny-test", steps=12, eval_every=12, checkpoint_every=12)
    trainer = Trainer(recipe, TRAIN_PRESETS["tiny-test"], "cpu")
    assert trainer.run(tmp_path, progress=False) == "done"
    evals = [r for r in trainer.records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 12]
    assert evals[1]["eval_loss"] < 0.7 * evals[0]["eval_loss"]
    assert evals[1]["eval_loss_ema"] < evals[0]["eval_loss_ema"]
    log = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert log == trainer.records
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    recipe = ["--steps", "8", "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "4"]
    main(["--out", str(tmp_path / "a"), *TINY, *recipe, "--stop-after", "3"])
    assert "resume with: python -m world.train --out" in capsys.readouterr().out
    step, _, _ = load_checkpoint(tmp_path / "a" / "checkpoint")
    assert step == 3
    main(["--out", str(tmp_path / "a"), "--resume", "--no-progress", "--device", "cpu"])
    main(["--out", str(tmp_path / "b"), *TINY, *recipe])
    step_a, tensors_a, meta_a = load_checkpoint(tmp_path / "a" / "checkpoint")
    step_b, tensors_b, meta_b = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert step_a == step_b == 8 and sorted(tensors_a) == sorted(tensors_b)
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    assert _timeless(meta_a["records"]) == _timeless(meta_b["records"])
    assert meta_a["scheduler"] == meta_b["scheduler"]
    assert len(meta_a["commands"]) == 2


def test_cli_refuses_what_would_break_a_run(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="holds no checkpoint"):
        main(["--out", out, "--resume", *TINY])
    main(["--out", out, *TINY, "--steps", "2", "--eval-clips", "1"])
    with pytest.raises(SystemExit, match="pass --resume"):
        main(["--out", out, *TINY])
    with pytest.raises(SystemExit, match="--lr, --batch|--batch, --lr"):
        main(["--out", out, "--resume", "--lr", "1.0", "--batch", "7", *TINY])
    with pytest.raises(ValueError, match="--steps must be a positive int"):
        main(["--out", str(tmp_path / "other"), *TINY, "--steps", "0"])
    assert not (tmp_path / "other" / "checkpoint").exists()


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    save_checkpoint(tmp_path, 1, tensors, {"note": "first"})
    writes = []

    def failing_write(path, data):
        writes.append(path)
        if len(writes) == 2:
            raise OSError("disk full")
        real_write(path, data)

    real_write = checkpoint_module.atomic_write_bytes
    monkeypatch.setattr(checkpoint_module, "SHARD_BYTES", 8)  # one shard per tensor
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {k: v + 1 for k, v in tensors.items()}, {"note": "second"})
    step, loaded, meta = load_checkpoint(tmp_path)
    assert step == 1 and meta == {"note": "first"}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_tampered_checkpoint_is_detected(tmp_path):
    save_checkpoint(tmp_path, 3, {"a": torch.arange(4.0)}, {})
    shard = next(tmp_path.glob("state-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}: sha256"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint.json: not a readable JSON"):
        load_checkpoint(tmp_path)


def test_sparse_fine_tuning_runs_resumes_and_refuses_a_new_pattern(tmp_path):
    out = str(tmp_path / "sparse")
    sparse = ["--pattern", "persistent_local", "--clip-frames", "12", "--eval-clips", "1"]
    main(["--out", out, *TINY, *sparse, "--steps", "3", "--stop-after", "2"])
    _, _, meta = load_checkpoint(tmp_path / "sparse" / "checkpoint")
    recipe = meta["recipe"]
    assert (recipe["pattern"], recipe["clip_frames"], recipe["scorer"]) == (
        "persistent_local",
        12,
        "identity",
    )
    with pytest.raises(SystemExit, match="--pattern"):
        main(["--out", out, "--resume", "--pattern", "dense", *TINY])
    main(["--out", out, "--resume", "--no-progress", "--device", "cpu"])
    step, tensors, _ = load_checkpoint(tmp_path / "sparse" / "checkpoint")
    assert step == 3
    assert not any("scorer" in key for key in tensors)  # the model's state_dict is unchanged
    with pytest.raises(ValueError, match="--pattern must be one of"):
        main(["--out", str(tmp_path / "bad"), *TINY, "--pattern", "nope", "--steps", "1"])
    with pytest.raises(ValueError, match="clip_frames"):
        main(["--out", str(tmp_path / "bad2"), *TINY, "--clip-frames", "7", "--steps", "1"])


def test_sparse_teacher_forcing_follows_the_recipe():
    recipe = make_recipe("tiny-test", pattern="persistent_local", clip_frames=12)
    trainer = Trainer(recipe, TRAIN_PRESETS["tiny-test"], "cpu")
    assert trainer.teacher.attention == "pbsa" and trainer.ema_teacher.attention == "pbsa"
    attn = trainer.model.blocks[0].self_attn.attn
    assert attn.pattern.window_frames == 9 and attn.clip_frames == 12
    dense = Trainer(make_recipe("tiny-test"), TRAIN_PRESETS["tiny-test"], "cpu")
    assert dense.teacher.attention == "dense" and dense.clip_frames == 6


def test_self_forcing_trains_on_the_models_own_rollout(tmp_path):
    """`--context self`: the noisy chunks attend to the clip as the current weights roll it out
    with the recipe's attention (first chunk given, last one never attended so kept), and the
    run still resumes exactly."""
    from runtime import generate
    from world.quality import contender_runner, world_geometry
    from world.trainer import training_contender

    recipe = make_recipe(
        "tiny-test", context="self", pattern="persistent_local", clip_frames=12, eval_clips=1
    )
    trainer = Trainer(recipe, TRAIN_PRESETS["tiny-test"], "cpu")
    clean = trainer._clips(step_seeds(0, 0, recipe.batch))
    history = trainer._self_history(clean, seed=5)
    f = trainer.model.config.frames_per_chunk
    assert history.shape == clean.shape
    assert torch.equal(history[:, :, :f], clean[:, :, :f])
    assert torch.equal(history[:, :, -f:], clean[:, :, -f:])
    geometry = world_geometry(trainer.model)
    contender = training_contender("persistent_local", geometry, "identity")
    fresh = type(trainer.model)(trainer.model.config)
    fresh.load_state_dict(trainer.model.state_dict())
    runner = contender_runner(fresh.eval(), contender, geometry)
    with torch.no_grad():
        want = generate(
            runner,
            trainer.context[:1],
            2,
            latent_shape=tuple(clean.shape[i] for i in (1, 3, 4)),
            batch_size=recipe.batch,
            seed=5,
            progress=False,
            prefix=clean[:, :, :f],
        )
    torch.testing.assert_close(history[:, :, f:-f], want[:, :, f:])
    assert not torch.allclose(history[:, :, f:-f], clean[:, :, f:-f])
    trainer.train_step()
    assert not torch.equal(trainer._self_history(clean, seed=5), history)  # fresh weights

    out, flags = str(tmp_path / "self"), ["--context", "self", "--pattern", "persistent_local"]
    flags += ["--clip-frames", "12", "--eval-clips", "1", "--steps", "3"]
    main(["--out", out, *TINY, *flags, "--stop-after", "1"])
    main(["--out", out, "--resume", "--no-progress", "--device", "cpu"])
    main(["--out", str(tmp_path / "whole"), *TINY, *flags])
    _, resumed, meta = load_checkpoint(tmp_path / "self" / "checkpoint")
    _, whole, _ = load_checkpoint(tmp_path / "whole" / "checkpoint")
    assert meta["recipe"]["context"] == "self"
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    with pytest.raises(SystemExit, match="--context"):
        main(["--out", out, "--resume", "--context", "teacher", *TINY])
