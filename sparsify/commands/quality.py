"""`sparsify quality`: how well each attention pattern continues held-out world scenes.

The trained world model (`world/weights/`) continues held-out scenes from a clean prefix and
every contender is scored against the ground truth (`world.quality.evaluate`). Both modes
write the JSON of `python -m bench.quality` (``{"device": ..., "records": [...]}``, floors
as patterns ``copy_last`` and ``random_model``) atomically and print a table:

* ``--quick`` (CPU, a few minutes): a few scenes at the training horizon, the floors, dense
  and the default `PersistentLocal` with the committed learned scorer
  (`world/weights/scorers.safetensors`, never retrained here) and the identity scorer;
* without it: every contender of the library at 1x, 4x and 10x the training clip on 16
  scenes — a GPU run (hours on a CPU: refused there without `--force`); retraining the
  scorer is `python -m bench.quality --train-scorers` from a checkout.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sparsify.commands.args import FlagError, positive_int, torch_device

FLOORS = ("copy_last", "random_model")
QUICK_PATTERNS = (*FLOORS, "dense", "persistent_local")
QUICK_SEEDS = 4
FULL_SEEDS = 16
FULL_MULTIPLES = (1.0, 4.0, 10.0)
RECALL_CHUNKS = 2  # chunks of dense attention captured for the scorer recall (quick)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="a few scenes at the training horizon (CPU)"
    )
    parser.add_argument("--json", type=Path, help="write the records here (atomically)")
    parser.add_argument("--png", type=Path, help="write the error-vs-horizon plot here")
    parser.add_argument(
        "--seeds",
        type=positive_int,
        help=f"held-out scenes (default {QUICK_SEEDS} with --quick, else {FULL_SEEDS})",
    )
    parser.add_argument(
        "--frames",
        type=positive_int,
        help="generated frames after the prefix, a multiple of 3 (default with --quick: "
        "one training clip, 18)",
    )
    parser.add_argument(
        "--device", type=torch_device, help="cpu, cuda or cuda:N (default: cuda if present)"
    )
    parser.add_argument(
        "--force", action="store_true", help="run the full evaluation even on a CPU (hours)"
    )


def evaluate_world(
    *,
    seeds: int,
    horizons: Sequence[int],
    device,
    scorer_path=None,
    only: Sequence[str] | None = None,
    recall_chunks: int = 4,
    progress: Callable[[str], None] | None = None,
    model=None,
    name: str | None = None,
    floors: bool = True,
) -> list[dict]:
    """`world.quality.evaluate` of `model` (a `CausalWanModel`; default: the committed world
    model) on `seeds` held-out scenes. With `floors`, the floors too: copy_last and the
    random-weight model of the same preset. `name` tags every record as its ``"model"``
    (`bench.quality` compares several weights this way, the floors with the first only:
    they do not depend on the weights)."""
    from runtime import CausalWanModel
    from world.quality import contenders, evaluate, world_geometry
    from world.scenes import heldout_seeds
    from world.weights import load_world_model

    if model is None:
        model = load_world_model(device=device)
    random_model = None
    if floors:
        random_model = CausalWanModel(model.config).to(device).eval()
    else:
        names = [c.name for c in contenders(world_geometry(model), learned=True)]
        only = [n for n in (only or names) if n not in FLOORS]
    records = evaluate(
        model,
        seeds=heldout_seeds(seeds),
        horizons=horizons,
        scorer_path=scorer_path,
        device=device,
        random_model=random_model,
        only=only,
        recall_chunks=recall_chunks,
        progress=progress,
    )
    return records if name is None else [{"model": name, **r} for r in records]


def write_report(records: list[dict], *, device: dict, json_path=None, png_path=None) -> str:
    """Write the records as ``{"device": device, "records": records}`` to `json_path` and
    the error-vs-horizon plot to `png_path` (each if given); returns the summary table."""
    import json

    from patterns.files import write_text_atomic
    from sparsify.tables import format_table
    from world.quality import curves, summary_rows
    from world.video import plot_error_vs_horizon

    if json_path is not None:
        payload = {"device": device, "records": records}
        write_text_atomic(json_path, json.dumps(payload, indent=1, default=str))
    if png_path is not None:
        # the same pattern of several models is one curve per model
        drawn = [
            {**r, "pattern": f"{r['model']}:{r['pattern']}"} if "model" in r else r for r in records
        ]
        plot_error_vs_horizon(curves(drawn, "mse"), png_path, metric="mse")
    rows = summary_rows(records)
    return format_table(rows, list(rows[0]))


def _device_record(device) -> dict:
    import torch
    import triton

    cuda = device.type == "cuda"
    return dict(
        card=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        torch=torch.__version__,
        triton=triton.__version__,
        threads=torch.get_num_threads(),
    )


def _say(message: str) -> None:
    print(f"[quality] {message}", file=sys.stderr, flush=True)


def _check_writable(path: Path | None, flag: str) -> None:
    """A typo in a folder is an error before minutes of work, not after."""
    if path is not None and not path.parent.is_dir():
        raise FlagError(flag, f"folder {str(path.parent)!r} does not exist")
    if path is not None and path.is_dir():
        raise FlagError(flag, f"{str(path)!r} is a folder, expected a file path")


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from world.quality import horizons_for
    from world.scenes import TRAIN_FRAMES
    from world.scorers import DEFAULT_SCORERS

    _check_writable(args.json, "--json")
    _check_writable(args.png, "--png")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.frames is not None and args.frames % 3:
        raise FlagError("--frames", f"expected a multiple of 3 (a chunk), got {args.frames}")
    if device.type == "cpu":
        # Every core: the world model's attention (768 queries over up to 5k keys) is big
        # enough to gain from threads, unlike the tiny test shapes.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.quick:
        seeds = args.seeds or QUICK_SEEDS
        horizons = [args.frames or TRAIN_FRAMES]
        only, recall_chunks = QUICK_PATTERNS, min(RECALL_CHUNKS, horizons[0] // 3)
    else:
        if device.type == "cpu" and not args.force:
            raise FlagError(
                "--quick",
                "the full evaluation (every pattern, 1x/4x/10x, 16 scenes) takes hours on a "
                "CPU; pass --quick, run it on a GPU, or pass --force",
            )
        seeds = args.seeds or FULL_SEEDS
        horizons = [args.frames] if args.frames else horizons_for(FULL_MULTIPLES)
        only, recall_chunks = None, 4
    step = iter(range(1, 100))
    # copy_last costs nothing and reports no progress; the learned and identity scorers of
    # persistent_local are one rollout each.
    total = f"/{len(only)}" if only else ""

    def progress(label: str) -> None:
        _say(f"({next(step)}{total}) rolling out {label}, {time.perf_counter() - start:.0f} s in")

    start = time.perf_counter()
    _say(
        f"world model on {device}: {seeds} held-out scenes, horizons {horizons} frames; "
        "measuring scorer recall on dense attention first"
    )
    records = evaluate_world(
        seeds=seeds,
        horizons=horizons,
        device=device,
        scorer_path=DEFAULT_SCORERS,
        only=only,
        recall_chunks=max(1, recall_chunks),
        progress=progress,
    )
    table = write_report(
        records, device=_device_record(device), json_path=args.json, png_path=args.png
    )
    print(table)
    h = horizons[0]
    at = {r["pattern"]: r["mse"] for r in records if r["horizon_frames"] == h and not r["scorer"]}
    if "dense" in at and "copy_last" in at:
        print(
            f"\ndense / copy_last mse at {h} frames: {at['dense'] / at['copy_last']:.2f} "
            "(under 0.5: the model has learned the motion, not just to copy)"
        )
    wrote = [str(p) for p in (args.json, args.png) if p is not None]
    print(f"{time.perf_counter() - start:.0f} s" + (f"; wrote {', '.join(wrote)}" if wrote else ""))
    return 0
