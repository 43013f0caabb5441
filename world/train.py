"""`python -m world.train`: train the world model by teacher forcing, resume it, export it.

    python -m world.train --out runs/world --time-budget 480 --compile     # first run
    python -m world.train --out runs/world --time-budget 480 --compile --resume
    python -m world.train --export runs/world                               # -> world/weights

Fine-tuning with a sparse pattern in the loop (Sparse Forcing's "train and infer alike"):

    python -m world.train --out runs/ft --init-from world/weights --pattern persistent_local \
        --scorer learned --clip-frames 36 --steps 1000 --lr 1e-4 --warmup 50
    python -m world.train --export runs/ft --weights-out runs/ft/weights

`--pattern` names a contender of `world.quality` (default `dense`): each layer then attends,
block-causally over the clip, exactly as the cached rollout of that pattern would
(`world.teacher_forcing`, attention "pbsa"). `--clip-frames` lengthens the clips so that
frames leave the pattern's window inside one (the world's patterns hold 6-9 frames).
`--context self` trains on the history inference has (Self-Forcing's point): every step
first rolls the clip out from its first chunk with the current weights and the same
attention (no gradient), and the noisy chunks attend to that rollout instead of the clip;
the target stays the clip.

A run writes `OUT/checkpoint/` (index + size-capped shards: model, EMA, optimizer, schedule,
step, loss log), `OUT/loss_log.jsonl` and `OUT/loss_curve.png` every `--checkpoint-every`
steps and when it stops. `--resume` continues exactly: the recipe (preset, steps, batch,
lr, seed, intervals) is the checkpoint's; options that would change it are refused.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from runtime.model_config import WanConfig
from world.checkpoint import has_checkpoint, load_checkpoint_meta
from world.scenes import DEFAULT_WORLD, TRAIN_FRAMES, WorldConfig
from world.trainer import CONTEXTS, SCORERS, Recipe, Trainer, TrainPreset
from world.weights import WEIGHTS_DIR, export_weights

TRAIN_PRESETS: dict[str, TrainPreset] = {
    "world": TrainPreset(WanConfig.preset("world"), DEFAULT_WORLD, TRAIN_FRAMES),
    # CPU tests: 32x32 frames (64 tokens per frame), 6-frame clips, a 2-layer model.
    "tiny-test": TrainPreset(
        WanConfig.preset(
            "world",
            dim=32,
            num_heads=2,
            num_kv_heads=2,
            num_layers=2,
            ffn_dim=64,
            latent_height=16,
            latent_width=16,
            text_dim=8,
        ),
        WorldConfig(
            height=32,
            width=32,
            max_objects=3,
            size_range=(1.5, 2.5),
            speed_range=(0.5, 1.2),
            occluder_width=5.0,
            world_margin=6.0,
        ),
        6,
    ),
}

# Defaults per preset. "world": ~6-10 steps/s expected on one H200 at batch 32 with
# --compile, so 8000 steps take a few resumed 8-minute runs.
DEFAULTS: dict[str, dict] = {
    "world": dict(steps=8000, batch=32, lr=3e-4, warmup=300),
    "tiny-test": dict(
        steps=20,
        batch=2,
        lr=2e-3,
        warmup=2,
        log_every=5,
        eval_every=10,
        checkpoint_every=10,
        eval_clips=2,
    ),
}
RECIPE_FLAGS = (
    "steps",
    "batch",
    "lr",
    "warmup",
    "weight_decay",
    "grad_clip",
    "ema_decay",
    "seed",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "eval_clips",
    "pattern",
    "scorer",
    "clip_frames",
    "context",
)


def make_recipe(preset: str, **overrides) -> Recipe:
    """The preset's default recipe with `overrides` (None values ignored)."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"preset must be one of {sorted(TRAIN_PRESETS)}, got {preset!r}")
    values = {**DEFAULTS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return Recipe(preset=preset, **values)


def check_recipe(recipe: Recipe) -> None:
    """ValueError naming the first field out of range."""
    for name in ("steps", "batch", "log_every", "eval_every", "checkpoint_every", "eval_clips"):
        value = getattr(recipe, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value!r}")
    if recipe.warmup < 0 or recipe.seed < 0:
        raise ValueError("--warmup and --seed must be >= 0")
    for name in ("lr", "grad_clip"):
        if not getattr(recipe, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= recipe.ema_decay < 1 or recipe.weight_decay < 0:
        raise ValueError("--ema-decay must be in [0, 1) and --weight-decay >= 0")
    clip = recipe.clip_frames
    if clip is not None and (not isinstance(clip, int) or clip < 1):
        raise ValueError(f"--clip-frames must be a positive int, got {clip!r}")
    if recipe.scorer not in SCORERS:
        raise ValueError(f"--scorer must be one of {SCORERS}, got {recipe.scorer!r}")
    if recipe.context not in CONTEXTS:
        raise ValueError(f"--context must be one of {CONTEXTS}, got {recipe.context!r}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m world.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="run folder (checkpoint, loss log, loss curve)")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default=None)
    for flag, kind in (
        ("steps", int),
        ("batch", int),
        ("lr", float),
        ("warmup", int),
        ("weight-decay", float),
        ("grad-clip", float),
        ("ema-decay", float),
        ("seed", int),
        ("log-every", int),
        ("eval-every", int),
        ("checkpoint-every", int),
        ("eval-clips", int),
        ("clip-frames", int),
    ):
        p.add_argument(f"--{flag}", type=kind, default=None, help="recipe (default: preset's)")
    p.add_argument(
        "--pattern",
        default=None,
        help="recipe: train with this attention pattern in the loop, a contender of "
        "world.quality (e.g. persistent_local; default dense)",
    )
    p.add_argument(
        "--scorer",
        choices=SCORERS,
        default=None,
        help="recipe: the pattern's block scorer (learned: world/weights/scorers.safetensors, "
        "frozen); default identity",
    )
    p.add_argument(
        "--context",
        choices=CONTEXTS,
        default=None,
        help="recipe: what the noisy chunks attend to: the clip (teacher, the default) or, "
        "after its first chunk, the model's own rollout of it with the same attention (self)",
    )
    p.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="pbsa backend of a sparse pattern (auto: triton on CUDA, torch elsewhere)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop (with a checkpoint) after this many seconds",
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop after N steps of this run")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--compile", action="store_true", help="torch.compile the training pass")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start a new run (fine-tuning) from the weights of an exported folder "
        "(world.safetensors + manifest.json)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--export",
        type=Path,
        metavar="RUN",
        help="export the EMA weights of RUN's checkpoint and exit",
    )
    p.add_argument(
        "--weights-out",
        type=Path,
        default=WEIGHTS_DIR,
        help="folder of the exported world.safetensors + manifest.json",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = shlex.join(["python", "-m", "world.train", *(sys.argv[1:] if argv is None else argv)])
    if args.export is not None:
        manifest = export_weights(args.export, args.weights_out)
        print(
            f"exported {args.weights_out}/world.safetensors (step {manifest['steps']}, "
            f"eval loss {manifest['final_eval_loss']:.4f})"
        )
        return 0
    if args.out is None:
        raise SystemExit("world.train: --out is required (or --export RUN)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flags = {name: getattr(args, name) for name in RECIPE_FLAGS}
    checkpoint = args.out / "checkpoint"
    if args.resume:
        if not has_checkpoint(checkpoint):
            raise SystemExit(f"world.train: --resume but {checkpoint} holds no checkpoint")
        try:
            saved = Recipe(**load_checkpoint_meta(checkpoint)["recipe"])
        except (KeyError, TypeError) as error:
            raise SystemExit(
                f"world.train: {checkpoint} holds no usable recipe ({error})"
            ) from None
        changed = [
            f"--{k.replace('_', '-')}"
            for k, v in flags.items()
            if v is not None and v != getattr(saved, k)
        ]
        if args.preset not in (None, saved.preset):
            changed.append("--preset")
        if changed:
            raise SystemExit(
                f"world.train: --resume keeps the checkpoint's recipe; "
                f"{', '.join(changed)} differ from it"
            )
        recipe = saved
    else:
        if has_checkpoint(checkpoint):
            raise SystemExit(f"world.train: {checkpoint} exists; pass --resume or another --out")
        recipe = make_recipe(args.preset or "world", **flags)
    check_recipe(recipe)
    trainer = Trainer(
        recipe,
        TRAIN_PRESETS[recipe.preset],
        device,
        compile=args.compile,
        attention_backend=args.attention_backend,
    )
    if args.resume:
        trainer.load(checkpoint)
    elif args.init_from is not None:
        trainer.commands.append(trainer.init_from(args.init_from))
    trainer.commands.append(command)
    reason = trainer.run(
        args.out,
        time_budget=args.time_budget,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )
    if reason == "done":
        print(
            f"done: {recipe.steps} steps; checkpoint in {checkpoint}; export with: "
            f"python -m world.train --export {args.out}"
        )
    else:
        print(
            f"stopped ({reason}) at step {trainer.step}/{recipe.steps}; checkpoint in "
            f"{checkpoint}; resume with: python -m world.train --out {args.out} --resume"
            + (" --compile" if args.compile else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
