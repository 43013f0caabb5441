"""The `sparsify` command line.

Make a video diffusion transformer's self-attention persistent-plus-local block-sparse and
see what it changes. Without a command, `sparsify` runs `demo`. `sparsify COMMAND --help`
lists a command's options and their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sparsify.commands.args import FlagError, HelpFormatter, Parser, report

# One line per command for `sparsify --help`; a command's module (sparsify/commands/<name>.py)
# defines `add_arguments(parser)` and `run(args) -> int` and is imported only when its command
# runs, so `sparsify --help` starts without torch.
COMMANDS = {
    "demo": "the trained world model, dense vs sparse: error, KV, GIF",
    "plan": "which attention ops sparsify rewrites in a model, and why",
    "autotune": "tune the PBSA kernel on this GPU and keep the winners",
    "quality": "each pattern scored on the reference world (--quick on a CPU)",
    "bench": "run the kernel / rollout benchmarks into JSON (from a checkout)",
    "generate": "prompt -> MP4 from your own causal Wan checkpoint ([wan] extra)",
}


def _load(name: str):
    return importlib.import_module(f"sparsify.commands.{name}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from sparsify import __version__

    parser = Parser(
        prog="sparsify",
        description=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, summary in COMMANDS.items():
        command = sub.add_parser(
            name, help=summary, description=summary, formatter_class=HelpFormatter
        )
        if name == chosen:
            _load(name).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["demo"]
    args = build_parser(argv).parse_args(argv)
    try:
        return int(_load(args.command).run(args) or 0)
    except FlagError as err:
        return report(args.command, err)


if __name__ == "__main__":
    sys.exit(main())
