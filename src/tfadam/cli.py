"""``python -m tfadam {compare,bench,convert}``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "compare": ("tfadam.compare", "main", "same gradients into tfadam, torch.optim.Adam and TF"),
    "bench": ("tfadam.bench", "main", "throughput against torch's fused Adam and TF"),
    "convert": ("tfadam.checkpoint.convert", "main", "TF checkpoint -> torch file"),
}


def usage() -> str:
    lines = ["usage: python -m tfadam COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines.append("\n'python -m tfadam COMMAND --help' describes a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[argv[0]]
    return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
