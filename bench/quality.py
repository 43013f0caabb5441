"""Quality benchmark on the GPU: every pattern on held-out world scenes at 1x, 4x and 10x.

    python -m bench.quality --json out.json --png out.png [--seeds 16] [--train-scorers]

Loads the committed world model, optionally (re)trains its block scorer on training scenes
(`world.scorers.train_world_scorer`, written to `--scorers`), then runs `world.quality.evaluate`
on held-out seeds and writes the records (`{"device": ..., "records": [...]}`), an
error-vs-horizon plot and a table. See the quality section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import device_record, write_json
from runtime import CausalWanModel
from sparsify.tables import format_table
from world.quality import curves, evaluate, horizons_for, summary_rows, world_geometry
from world.scenes import heldout_seeds
from world.scorers import DEFAULT_SCORERS, SCORER_TRAIN_SEED, SCORER_VAL_SEED, train_world_scorer
from world.video import plot_error_vs_horizon
from world.weights import load_world_model


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
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_world_model(device=device)
    geometry = world_geometry(model)
    if args.train_scorers:
        provenance = train_world_scorer(
            model,
            list(range(SCORER_TRAIN_SEED, SCORER_TRAIN_SEED + 16)),
            list(range(SCORER_VAL_SEED, SCORER_VAL_SEED + 4)),
            heldout_seeds(args.seeds + 8)[args.seeds :],
            geometry,
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
    random_model = CausalWanModel(model.config).to(device).eval()
    horizons = horizons_for([float(m) for m in args.multiples.split(",")])
    records = evaluate(
        model,
        seeds=heldout_seeds(args.seeds),
        horizons=horizons,
        scorer_path=args.scorers,
        device=device,
        random_model=random_model,
        only=args.only.split(",") if args.only else None,
        progress=lambda name: print(f"  running {name}", flush=True),
    )
    write_json(args.json, {"device": device_record(), "records": records})
    if args.png:
        plot_error_vs_horizon(curves(records, "mse"), args.png, metric="mse")
    rows = summary_rows(records)
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
