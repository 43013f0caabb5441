"""Argument checking shared by the subcommands: argparse `type=` validators, the one-line
parser error, and `flag_errors`, which names the flag behind a ValueError raised while a
command builds objects from its arguments.

Every mistake in a command line is reported as one line, ``sparsify <cmd>: error: --flag:
message``, with exit code 2, before the command does any work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

MIN_TILE = 16  # the smallest page / query block the PBSA kernels take


class FlagError(Exception):
    """A value given on the command line that the command cannot use (exit code 2)."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block): ``prog: error: msg``."""

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --flag: ..."; the flag alone reads as the other errors do.
        message = message.removeprefix("argument ")
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def report(command: str, error: FlagError) -> int:
    """Print a FlagError as the parser would; returns the exit code (2)."""
    print(f"sparsify {command}: error: {error.flag}: {error}", file=sys.stderr)
    return 2


@contextmanager
def flag_errors(*flags: str) -> Iterator[None]:
    """Turn a ValueError raised inside into a `FlagError` naming the flags whose parameter
    name (``--page-size`` → ``page_size``) the message mentions, or all of them if none.

    Wrap only the construction of objects from these flags' values: a ValueError anywhere
    else is a bug and keeps its traceback.
    """
    try:
        yield
    except ValueError as err:
        message = str(err)
        named = [f for f in flags if f.removeprefix("--").replace("-", "_") in message]
        raise FlagError("/".join(named or flags), message) from err


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def tile(text: str) -> int:
    """A page size or query block: a power of two the kernels take."""
    value = _int(text)
    if value < MIN_TILE or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"expected a power of two >= {MIN_TILE} (a kernel tile), got {value}"
        )
    return value


def name_list(names: Sequence[str]) -> Callable[[str], list[str]]:
    """A validator of comma-separated names, each one of `names`."""

    def parse(text: str) -> list[str]:
        given = [n for n in text.split(",") if n]
        unknown = [n for n in given if n not in names]
        if unknown or not given:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'nothing given'}; expected comma-separated "
                f"names from {', '.join(names)}"
            )
        return given

    return parse


def torch_device(text: str):
    """`cpu`, `cuda` or `cuda:N`, present on this machine, as a torch.device."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r} asked for, but torch sees no CUDA device on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def out_dir(text: str) -> Path:
    """A folder that exists or can be created; probed by creating and removing a temporary
    folder in its nearest existing ancestor, so nothing is left behind."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, expected a folder")
    ancestor = next((p for p in (path, *path.parents) if p.exists()), Path.cwd())
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {ancestor} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sparsify-probe-", dir=ancestor))
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot write a folder {text!r} ({ancestor}: {err.strerror})"
        ) from None
    return path
