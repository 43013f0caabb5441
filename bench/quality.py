"""Quality benchmark on the GPU: every pattern on held-out world scenes at 1x, 4x and 10x.

    python -m bench.quality --json out.json --png out.png [--seeds 16] [--train-scorers]

Loads the committed world model, optionally (re)trains its block scorer on training scenes
(`world.scorers.train_world_scorer`, written to `--scorers`), then runs `world.quality.evaluate`
on held-out seeds and writes the records (`{"device": ..., "records": [...]}`), an
error-vs-horizon plot and a table. See the quality section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import device_record
from sparsify.commands.quality import evaluate_world, write_report
from world.quality import horizons_for, world_geometry
from world.scenes import heldout_seeds
from world.scorers import DEFAULT_SCORERS, train_world_scorer
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
    if args.train_scorers:
        model = load_world_model(device=device)
        start = time.perf_counter()
        report = train_world_scorer(
            model,
            list(range(1000, 1016)),
            heldout_seeds(args.seeds + 8)[args.seeds :],
            world_geometry(model),
            args.scorers,
            steps=args.scorer_steps,
            device=device,
        )
        print(
            f"scorer: recall@25% {report['mean_recall_before']:.3f} (identity) -> "
            f"{report['mean_recall_after']:.3f} (learned) in {time.perf_counter() - start:.0f} s"
        )
    records = evaluate_world(
        seeds=args.seeds,
        horizons=horizons_for([float(m) for m in args.multiples.split(",")]),
        device=device,
        scorer_path=args.scorers,
        only=args.only.split(",") if args.only else None,
        progress=lambda name: print(f"  running {name}", flush=True),
    )
    print(write_report(records, device=device_record(), json_path=args.json, png_path=args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
