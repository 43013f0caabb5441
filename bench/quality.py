"""Quality benchmark on the GPU: every pattern on held-out world scenes at 1x, 4x and 10x.

    python -m bench.quality --json out.json --png out.png [--seeds 16] [--train-scorers]
    python -m bench.quality --weights dense=world/weights --weights sparse_ft=runs/ft/weights \
        --only dense,persistent_local --json out.json      # a `model` column per weights folder

Loads the committed world model (or each `--weights [NAME=]DIR`, an exported folder of
world.safetensors + manifest.json; the floors run with the first one only), optionally
(re)trains its block scorer on training scenes (`world.scorers.train_world_scorer`, written to
`--scorers`), then runs `world.quality.evaluate` on held-out seeds and writes the records
(`{"device": ..., "records": [...]}`, each with its `model`), an error-vs-horizon plot and a
table. See the quality section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import device_record, write_json
from runtime import CausalWanModel
from sparsify.tables import format_table
from world.quality import (
    contenders,
    curves,
    evaluate,
    horizons_for,
    summary_rows,
    world_geometry,
)
from world.scenes import heldout_seeds
from world.scorers import DEFAULT_SCORERS, SCORER_TRAIN_SEED, SCORER_VAL_SEED, train_world_scorer
from world.video import plot_error_vs_horizon
from world.weights import WEIGHTS_DIR, load_world_model

FLOORS = ("copy_last", "random_model")


def weights_arg(text: str) -> tuple[str, str]:
    """`NAME=DIR` or `DIR` (named after the folder) -> (name, dir)."""
    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = Path(text).name or text, text
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR or DIR, got {text!r}")
    return name, folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--png", help="write the error-vs-horizon plot here")
    parser.add_argument("--seeds", type=int, default=16, help="held-out scenes")
    parser.add_argument("--multiples", default="1,4,10", help="horizons, in training clips")
    parser.add_argument("--train-scorers", action="store_true", help="retrain the scorer first")
    parser.add_argument("--scorers", default=str(DEFAULT_SCORERS), help="scorer weights file")
    parser.add_argument("--scorer-steps", type=int, default=400)
    parser.add_argument("--only", help="comma-separated contender names")
    parser.add_argument(
        "--weights",
        type=weights_arg,
        action="append",
        metavar="[NAME=]DIR",
        help="an exported world-model folder to evaluate (repeat to compare; default: the "
        "committed world/weights)",
    )
    args = parser.parse_args(argv)
    models = args.weights or [("dense", str(WEIGHTS_DIR))]
    if len({name for name, _ in models}) < len(models):
        parser.error("--weights: every NAME must differ")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_world_model(Path(models[0][1]), device=device)
    geometry = world_geometry(model)
    if args.train_scorers:
        provenance = train_world_scorer(
            model,
            list(range(SCORER_TRAIN_SEED, SCORER_TRAIN_SEED + 16)),
            list(range(SCORER_VAL_SEED, SCORER_VAL_SEED + 4)),
            heldout_seeds(args.seeds + 8)[args.seeds :],
            world_geometry(model),
            args.scorers,
            steps=args.scorer_steps,
            device=device,
            command="python -m bench.quality --train-scorers",
        )
        recall = provenance["recall"]
        print(
            "scorer: recall@25% "
            + ", ".join(f"{name} {row['0.25']:.3f}" for name, row in recall.items())
            + f" in {provenance['seconds']:.0f} s"
        )
    horizons = horizons_for([float(m) for m in args.multiples.split(",")])
    only = args.only.split(",") if args.only else None
    names = [c.name for c in contenders(geometry, learned=True)]
    records = []
    for i, (name, folder) in enumerate(models):
        if i:
            model = load_world_model(Path(folder), device=device)
        print(f"model {name}: {folder}", flush=True)
        first = i == 0
        for record in evaluate(
            model,
            seeds=heldout_seeds(args.seeds),
            horizons=horizons,
            scorer_path=args.scorers,
            device=device,
            random_model=CausalWanModel(model.config).to(device).eval() if first else None,
            # the floors do not depend on the weights: once
            only=only if first else [n for n in (only or names) if n not in FLOORS],
            progress=lambda label: print(f"  running {label}", flush=True),
        ):
            records.append({"model": name, **record})
    write_json(args.json, {"device": device_record(), "records": records})
    if args.png:
        labelled = [{**r, "pattern": f"{r['model']}:{r['pattern']}"} for r in records]
        plot_error_vs_horizon(curves(labelled, "mse"), args.png, metric="mse")
    rows = summary_rows(records)
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
