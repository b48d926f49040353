"""``python -m tfadam {compare,bench,convert}``, and the argument checks they share.

Every command checks all of its arguments before it starts any work; a bad
one is a single line on stderr naming the argument and what it takes, and the
exit status 2 (argparse's convention for a usage error), never a traceback.

    >>> parser = ArgumentParser(prog="demo")
    >>> _ = parser.add_argument("--steps", type=positive_int, default=1)
    >>> parser.parse_args(["--steps", "3"]).steps
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be an integer >= 1, got '0'
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import struct
import sys
from pathlib import Path
from typing import NoReturn

COMMANDS = {
    "compare": (
        "tfadam.compare",
        "main",
        "same gradients into tfadam, torch.optim.Adam(fused=True) and TF",
    ),
    "bench": ("tfadam.bench", "main", "throughput against torch's fused Adam and TF"),
    "convert": ("tfadam.checkpoint.convert", "main", "TF checkpoint -> torch file"),
}

USAGE_ERROR = 2  # argparse's exit status for a bad command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (and exit status 2).

    argparse prints the whole usage block above the error; with many options
    that buries the one line that matters, so ``--help`` is pointed to instead.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a step count, a size, a period)."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (a seed, a warm-up count)."""
    return _integer(text, 0)


def learning_rate(text: str) -> float:
    """A number >= 0 that stays finite in float32 (hyperparameters become float32 first)."""
    try:
        value = float(text)
        # The learning rate is rounded to float32 before it is used: 1e39 is inf there.
        value = value if math.isfinite(struct.unpack("f", struct.pack("f", value))[0]) else math.inf
    except (ValueError, OverflowError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, finite in float32, got {text!r}")
    return value


def nonempty_text(text: str) -> str:
    """A string with something in it besides blanks."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def output_file(text: str) -> Path:
    """A file path that can be written: not a directory, in a writable directory.

    Checked when the arguments are parsed, so that a long run does not end in
    ``FileNotFoundError`` when it writes its result.
    """
    if not text:
        raise argparse.ArgumentTypeError("must be a file path, got ''")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is a directory; give a file name, e.g. {str(path / 'out')!r}"
        )
    parent = path.parent
    if not parent.exists():
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{str(parent)!r} is not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create files in {str(parent)!r}")
    return path


def usage() -> str:
    lines = ["usage: python -m tfadam COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines.append("\n'python -m tfadam COMMAND --help' describes a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(usage(), file=sys.stderr)
        return USAGE_ERROR
    if argv[0] not in COMMANDS:
        print(
            f"python -m tfadam: error: unknown command {argv[0]!r}; choose from "
            f"{', '.join(COMMANDS)} (see --help)",
            file=sys.stderr,
        )
        return USAGE_ERROR
    module, function, _ = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
