"""The `sparsify` command line: one subcommand per module in `sparsify/commands/`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their command runs, so `sparsify --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "plan", "autotune", "bench", "generate")


def _load(name: str):
    return importlib.import_module(f"sparsify.commands.{name}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsify", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name in COMMANDS:
        if name == chosen:
            module = _load(name)
            module.add_arguments(sub.add_parser(name, help=module.HELP))
        else:
            sub.add_parser(name, help=f"see `sparsify {name} --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv or ["demo"])
    return int(_load(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
