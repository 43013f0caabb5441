"""Quality benchmark on the GPU: every pattern on held-out world scenes at 1x, 4x and 10x.

    python -m bench.quality --json out.json --png out.png [--seeds 16] [--train-scorers]
    python -m bench.quality --weights dense=world/weights --weights sparse_ft=runs/ft/weights \
        --only dense,persistent_local --json out.json      # a `model` column per weights folder

Loads the committed world model (or each `--weights [NAME=]DIR`, an exported folder of
world.safetensors + manifest.json; the floors run with the first one only), optionally
(re)trains its block scorer on training scenes (`world.scorers.train_world_scorer`, written to
`--scorers`), then evaluates and reports as `sparsify quality` does
(`sparsify.commands.quality.evaluate_world` and `write_report`): the records
(`{"device": ..., "records": [...]}`, each with its `model`), an error-vs-horizon plot and a
table. See the quality section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import device_record
from sparsify.commands.quality import evaluate_world, write_report
from world.quality import horizons_for, world_geometry
from world.scenes import heldout_seeds
from world.scorers import DEFAULT_SCORERS, SCORER_TRAIN_SEED, SCORER_VAL_SEED, train_world_scorer
from world.weights import WEIGHTS_DIR, load_world_model


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
    records = []
    for i, (name, folder) in enumerate(models):
        if i:
            model = load_world_model(Path(folder), device=device)
        print(f"model {name}: {folder}", flush=True)
        records += evaluate_world(
            seeds=args.seeds,
            horizons=horizons,
            device=device,
            scorer_path=args.scorers,
            only=only,
            progress=lambda label: print(f"  running {label}", flush=True),
            model=model,
            name=name,
            floors=i == 0,
        )
    print(write_report(records, device=device_record(), json_path=args.json, png_path=args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
