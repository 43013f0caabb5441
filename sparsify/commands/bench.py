"""`sparsify bench`: the GPU benchmarks of BENCHMARKS.md, kernel and rollout, in one command.

`--bench-args "..."` go to the chosen benchmark(s) (`python -m bench.kernel --help`,
`python -m bench.rollout --help`); each writes its JSON into `--out`.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

HELP = "run the kernel and/or rollout benchmarks (GPU) and write their JSON"
WHICH = ("kernel", "rollout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", nargs="?", default="all", choices=(*WHICH, "all"))
    parser.add_argument("--out", default="bench-results", help="folder for the JSON files")
    parser.add_argument(
        "--bench-args", default="", help='arguments for the benchmark, e.g. "--horizons 5s"'
    )


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("note: no CUDA device; timings on the CPU are not comparable (BENCHMARKS.md)")
    extra = shlex.split(args.bench_args)
    out = Path(args.out)
    status = 0
    for name in WHICH if args.which == "all" else (args.which,):
        if name == "kernel":
            from bench.kernel import main
        else:
            from bench.rollout import main
        status |= main([*extra, "--json", str(out / f"{name}.json")])
    return status
