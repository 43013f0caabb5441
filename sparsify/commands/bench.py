"""`sparsify bench`: the GPU benchmarks of BENCHMARKS.md, kernel and rollout, in one command.

Arguments after `--` go to the chosen benchmark (`python -m bench.kernel --help`,
`python -m bench.rollout --help`); each writes its JSON into `--out`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run the kernel and/or rollout benchmarks (GPU) and write their JSON"
WHICH = ("kernel", "rollout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("which", nargs="?", default="all", choices=(*WHICH, "all"))
    parser.add_argument("--out", default="bench-results", help="folder for the JSON files")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="-- then benchmark arguments")


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("note: no CUDA device; timings on the CPU are not comparable (BENCHMARKS.md)")
    extra = [a for a in args.extra if a != "--"]
    out = Path(args.out)
    status = 0
    for name in WHICH if args.which == "all" else (args.which,):
        if name == "kernel":
            from bench.kernel import main
        else:
            from bench.rollout import main
        status |= main([*extra, "--json", str(out / f"{name}.json")])
    return status
