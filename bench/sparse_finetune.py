"""Does training with the sparse pattern in the loop beat sparsity at inference only?

    python -m bench.sparse_finetune --runs /tmp/ft --out results/ft [--budget 220] [--seeds 16]
        [--self-forcing]

Fine-tunes the committed world model twice from the same weights with the same recipe
(clip length, batch, learning-rate schedule, seed) and the same number of steps:

* `ft_sparse`: `--pattern persistent_local --scorer learned` (the attention the cached rollout
  of that pattern uses, `world.teacher_forcing` with attention "pbsa"), for `--budget`
  seconds or `--steps` steps, whichever ends first;
* `ft_dense`: the control, `--pattern dense`, stopped at the step `ft_sparse` reached, so that
  any gain of `ft_sparse` is not just more training or longer clips;
* with `--self-forcing`, `ft_self`: `ft_sparse`'s recipe with `--context self` (every step
  rolls the clip out from its first chunk with the current weights and the pattern, and the
  noisy chunks attend to that rollout), also stopped at `ft_sparse`'s step.

All are exported and judged with `bench.quality` beside the base model: (a) base dense,
(b) base with the pattern at inference only, (c) `ft_sparse` with the pattern, (d) `ft_self`
with the pattern, plus the fine-tunes dense and `ft_dense` sparse. Runs resume (`--runs`
keeps the checkpoints): a second call continues the sparse run, catches the others up, and
evaluates again. `--out` receives the exported weight folders, the loss logs, the quality
JSON and its plot.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from world.checkpoint import checkpoint_step, has_checkpoint
from world.weights import WEIGHTS_DIR


def _train(
    python: str,
    run: Path,
    recipe: list[str],
    *,
    backend: str,
    budget: float | None,
    upto: int | None,
) -> None:
    """Start or resume `run`; stop after `budget` seconds or at step `upto`."""
    checkpoint = run / "checkpoint"
    done = checkpoint_step(checkpoint) if has_checkpoint(checkpoint) else 0
    if upto is not None and done >= upto:
        return
    args = ["--out", str(run), "--no-progress", "--attention-backend", backend]
    args += ["--resume"] if done else ["--init-from", str(WEIGHTS_DIR), *recipe]
    if budget is not None:
        args += ["--time-budget", str(budget)]
    if upto is not None:
        args += ["--stop-after", str(upto - done)]
    subprocess.run([python, "-m", "world.train", *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="checkpoints (resumable)")
    parser.add_argument("--out", type=Path, required=True, help="weights, logs, JSON, plot")
    parser.add_argument("--pattern", default="persistent_local")
    parser.add_argument("--scorer", default="learned")
    parser.add_argument("--clip-frames", type=int, default=36)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400, help="schedule length of both runs")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-clips", type=int, default=64, help="held-out clips per eval")
    parser.add_argument("--budget", type=float, default=220, help="seconds for the sparse run")
    parser.add_argument("--seeds", type=int, default=16, help="held-out scenes judged")
    parser.add_argument(
        "--attention-backend", default="auto", help="world.train's pbsa backend (not a recipe)"
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--self-forcing", action="store_true", help="also ft_self: ft_sparse with --context self"
    )
    args = parser.parse_args(argv)
    if args.pattern == "dense":
        parser.error("--pattern: the sparse run needs a sparse pattern, got 'dense'")
    python = sys.executable
    common = [
        "--clip-frames",
        str(args.clip_frames),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--lr",
        str(args.lr),
        "--warmup",
        str(args.warmup),
        "--eval-clips",
        str(args.eval_clips),
    ]
    sparse_run, dense_run = args.runs / "ft_sparse", args.runs / "ft_dense"
    start = time.perf_counter()
    sparse_recipe = [*common, "--pattern", args.pattern, "--scorer", args.scorer]
    _train(
        python,
        sparse_run,
        sparse_recipe,
        backend=args.attention_backend,
        budget=args.budget,
        upto=None,
    )
    reached = checkpoint_step(sparse_run / "checkpoint")
    sparse_seconds = time.perf_counter() - start
    print(f"ft_sparse: step {reached} ({sparse_seconds:.0f} s this call)", flush=True)
    _train(
        python,
        dense_run,
        [*common, "--pattern", "dense"],
        backend=args.attention_backend,
        budget=None,
        upto=reached,
    )
    print(f"ft_dense: step {checkpoint_step(dense_run / 'checkpoint')}", flush=True)
    runs = {"ft_sparse": sparse_run, "ft_dense": dense_run}
    if args.self_forcing:
        runs["ft_self"] = args.runs / "ft_self"
        _train(
            python,
            runs["ft_self"],
            [*sparse_recipe, "--context", "self"],
            backend=args.attention_backend,
            budget=None,
            upto=reached,
        )
        print(f"ft_self: step {checkpoint_step(runs['ft_self'] / 'checkpoint')}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, run in runs.items():
        folder = args.out / name
        cmd = [python, "-m", "world.train", "--export", str(run), "--weights-out", str(folder)]
        subprocess.run(cmd, check=True)
        shutil.copyfile(run / "loss_log.jsonl", args.out / f"{name}-loss_log.jsonl")
        weights[name] = folder
    if args.skip_quality:
        return 0
    quality = [python, "-m", "bench.quality", "--seeds", str(args.seeds)]
    quality += ["--only", f"copy_last,dense,{args.pattern}", "--weights", f"base={WEIGHTS_DIR}"]
    for name, folder in weights.items():
        quality += ["--weights", f"{name}={folder}"]
    quality += ["--json", str(args.out / "quality.json"), "--png", str(args.out / "quality.png")]
    subprocess.run(quality, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
