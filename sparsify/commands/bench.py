"""`sparsify bench`: the GPU benchmarks of BENCHMARKS.md, kernel and rollout, in one command.

Each benchmark runs as `python -m bench.<name>` from the repository checkout (`bench/` is not
installed with the package); `--bench-args "..."` go to it (`python -m bench.kernel --help`,
`python -m bench.rollout --help`) and it writes its JSON into `--out`. On a CPU the rollout
benchmark's 1.3B model takes days: it is refused without `--force`, with the estimate.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from sparsify.commands.args import FlagError, out_dir

WHICH = ("kernel", "rollout")
ROLLOUT_PRESET = "wan2.1-1.3b"  # bench.rollout's default --preset
# The smallest rollout benchmark: one implementation, the 5 s horizon (7 chunks) after its
# warm-up of as many; every other choice runs more.
MIN_ROLLOUT_CHUNKS = 14


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "which", nargs="?", default="all", choices=(*WHICH, "all"), help="benchmark(s) to run"
    )
    parser.add_argument("--out", type=out_dir, default="bench-results", help="folder for JSON")
    parser.add_argument(
        "--bench-args", default="", help='arguments for the benchmark, e.g. "--horizons 5s"'
    )
    parser.add_argument(
        "--force", action="store_true", help="run the rollout benchmark on a CPU even if slow"
    )


def checkout() -> Path:
    """The repository checkout holding `bench/`, or a FlagError saying it is missing."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__init__.py").is_file():
        raise FlagError(
            "bench/",
            f"not found next to the installed package (looked in {root}); the benchmarks "
            "run from a repository checkout (pip install -e .)",
        )
    return root


def _check_cpu_rollout(extra: list[str], force: bool) -> None:
    """Say how long the rollout benchmark takes on this CPU; refuse hours without --force."""
    from runtime import WanConfig
    from sparsify.commands.cost import check_cpu_run

    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default=ROLLOUT_PRESET)
    with_preset = preset.parse_known_args(extra)[0].preset
    try:
        config = WanConfig.preset(with_preset)
    except ValueError as err:
        raise FlagError("--bench-args", str(err)) from err
    what = f"bench rollout of {with_preset}, its smallest run"
    message = check_cpu_run(
        config, MIN_ROLLOUT_CHUNKS, what, force=force, flag="--force", advice="run it on a GPU"
    )
    print(f"sparsify bench: {message}", flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    root = checkout()
    extra = shlex.split(args.bench_args)
    names = WHICH if args.which == "all" else (args.which,)
    if not torch.cuda.is_available():
        print("note: no CUDA device; timings on the CPU are not comparable (BENCHMARKS.md)")
        if "rollout" in names:
            _check_cpu_rollout(extra, args.force)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))),
    }
    status = 0
    for name in names:
        json_path = (args.out / f"{name}.json").resolve()
        command = [sys.executable, "-u", "-m", f"bench.{name}", *extra, "--json", str(json_path)]
        print(f"sparsify bench: {shlex.join(command)}", flush=True)
        status |= subprocess.run(command, env=env, check=False).returncode
    return status
