"""``python -m tfadam convert CKPT OUT``: a TF checkpoint as a ``torch.save`` file.

The file holds a plain dict (loadable with ``torch.load(OUT)``, the default
``weights_only=True`` included)::

    {"format": "tfadam.convert/1", "source": prefix, "naming": "tf1" | "tf2",
     "model": {tf_name: tensor},                       # every model variable
     "optimizer": {"flavour": "tf1" | "keras",
                   "slots": {tf_name: {"m": tensor, "v": tensor}},
                   "variables": {"beta1_power": tensor, ...}} or None,
     "keys": {tf_name: checkpoint_key},                # where each came from
     "unmapped": {checkpoint_key: reason}}

Model tensors are named by their TF name (``dense/kernel``); TF stores a Dense
kernel as (in, out), so ``torch.nn.Linear.weight`` is its transpose.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from ..cli import ArgumentParser, nonempty_text, output_file
from .errors import CheckpointError
from .formats import open_checkpoint

__all__ = ["ConvertResult", "cli_convert", "convert", "main", "save_exclusive"]

FORMAT = "tfadam.convert/1"
_PROGRESS_MIN_BYTES = 64 << 20


@dataclass
class ConvertResult:
    """What :func:`convert` wrote: the mapped names and the unmapped keys."""

    out: str
    model: dict[str, str] = field(default_factory=dict)  # tf name -> checkpoint key
    slots: dict[str, list[str]] = field(default_factory=dict)  # tf name -> slot names
    optimizer_variables: dict[str, str] = field(default_factory=dict)  # name -> key
    unmapped: dict[str, str] = field(default_factory=dict)  # key -> reason
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tf name -> shape
    flavour: str | None = None
    nbytes: int = 0


def _progress(total: int, enabled: bool | None, stream: TextIO) -> Any:
    if enabled is False or (enabled is None and total < _PROGRESS_MIN_BYTES):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="reading", file=stream, leave=False)


def convert(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    optimizer_name: str = "Adam",
    progress: bool | None = None,
    stream: TextIO | None = None,
) -> ConvertResult:
    """Convert a TF checkpoint to a ``torch.save`` file; returns what was mapped.

    Every tensor is read (checksums verified) before ``out`` is written.
    ``progress``: a tqdm bar on ``stream`` (default stderr) — None shows it
    for checkpoints over 64 MiB when tqdm is installed.

    Example:
        >>> import numpy as np, os, tempfile, torch
        >>> from tfadam.checkpoint.writer import write_bundle
        >>> d = tempfile.mkdtemp()
        >>> write_bundle(os.path.join(d, "ckpt"), {"w": np.ones(2, np.float32),
        ...     "w/Adam": np.zeros(2, np.float32), "w/Adam_1": np.zeros(2, np.float32),
        ...     "beta1_power": np.float32(0.9), "beta2_power": np.float32(0.999)})
        >>> result = convert(os.path.join(d, "ckpt"), os.path.join(d, "out.pt"))
        >>> state = torch.load(os.path.join(d, "out.pt"))
        >>> state["model"]["w"], sorted(state["optimizer"]["slots"]["w"])
        (tensor([1., 1.]), ['m', 'v'])
    """
    stream = sys.stderr if stream is None else stream
    out = os.fspath(out)
    reader, names = open_checkpoint(path, optimizer_name=optimizer_name)
    with reader:
        result = ConvertResult(out)
        bookkeeping = names.bookkeeping_keys()
        optimizer_vars = names.optimizer_variables()
        states = {}
        slot_keys: dict[str, str] = {}
        for var in names.variables:
            state = names.optimizer_state(var)
            if state is not None:
                states[var.key] = state
                for slot, key in state.slots.items():
                    slot_keys[key] = f"slot {slot!r} of {var.name!r}"
        # Prefer TF names; fall back to object paths where two share a name.
        counts: dict[str, int] = {}
        for var in names.variables:
            counts[var.name] = counts.get(var.name, 0) + 1
        label = {
            v.key: v.name if counts[v.name] == 1 else (v.path or v.key) for v in names.variables
        }

        todo = []  # (key, destination)
        for key in reader.keys():
            info = reader.info(key)
            if key in bookkeeping:
                result.unmapped[key] = "checkpoint bookkeeping"
            elif info.dtype == "string":
                result.unmapped[key] = "string tensor (torch has no strings)"
            elif key in slot_keys:
                todo.append((key, "slot"))
            elif key in optimizer_vars:
                todo.append((key, "optimizer"))
            elif key in label:
                todo.append((key, "model"))
            else:
                result.unmapped[key] = "not a variable of the object graph"
        flavours = {s.flavour for s in states.values()}
        if len(flavours) > 1:
            raise CheckpointError(
                f"mixed optimizer kinds {sorted(flavours)}", path=reader.index_path
            )
        result.flavour = next(iter(flavours), None)
        # every byte range read lies in the files, none shared: what is held
        # below is bounded by the size of the data files
        reader.check_layout([k for k, _ in todo])
        total = sum(reader.info(k).nbytes for k, _ in todo)
        bar = _progress(total, progress, stream)
        tensors: dict[str, torch.Tensor] = {}
        try:
            for key, _ in todo:
                tensors[key] = reader.read_torch(key)
                if bar is not None:
                    bar.update(reader.info(key).nbytes)
        finally:
            if bar is not None:
                bar.close()
        result.nbytes = total

        model = {}
        slots: dict[str, dict[str, torch.Tensor]] = {}
        opt_vars = {}
        keys = {}
        for key, kind in todo:
            if kind == "model":
                model[label[key]] = tensors[key]
                keys[label[key]] = key
                result.model[label[key]] = key
                result.shapes[label[key]] = tuple(tensors[key].shape)
                state = states.get(key)
                if state is not None:
                    slots[label[key]] = {s: tensors[k] for s, k in state.slots.items()}
                    result.slots[label[key]] = list(state.slots)
            elif kind == "optimizer":
                opt_vars[optimizer_vars[key]] = tensors[key]
                result.optimizer_variables[optimizer_vars[key]] = key
        optimizer = None
        if slots or opt_vars:
            optimizer = {"flavour": result.flavour, "slots": slots, "variables": opt_vars}
        payload = {
            "format": FORMAT,
            "source": reader.prefix,
            "naming": getattr(names, "naming", "tf2" if names.object_based else "tf1"),
            "model": model,
            "optimizer": optimizer,
            "keys": keys,
            "unmapped": dict(result.unmapped),
        }
    save_exclusive(payload, out)
    return result


def save_exclusive(obj: Any, out: str) -> None:
    """``torch.save(obj)`` to ``out`` through a fresh file renamed into place.

    The temporary file, ``.OUT.<random>.tmp`` beside ``out``, is created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``: whatever already lies at any name (a
    link planted at ``OUT.tmp`` included) is never opened, followed or
    overwritten. It is written, fsynced, then renamed over ``out`` (a link at
    ``out`` is replaced, not followed), so ``out`` is either the old file or
    the complete new one. Errors are ``OSError`` naming the file.

    >>> import os, tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> os.symlink(os.path.join(d, "victim"), os.path.join(d, "out.pt.tmp"))
    >>> save_exclusive({"x": 1}, os.path.join(d, "out.pt"))
    >>> sorted(os.listdir(d)), torch.load(os.path.join(d, "out.pt"))
    (['out.pt', 'out.pt.tmp'], {'x': 1})
    """
    directory, base = os.path.split(os.path.abspath(out))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise FileExistsError(f"cannot create a temporary file beside {out}")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)  # never leave a half-written OUT behind
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def format_report(result: ConvertResult) -> str:
    """A human-readable listing of what ``convert`` mapped and left unmapped."""
    lines = [f"model: {len(result.model)} tensors"]
    width = max((len(n) for n in result.model), default=0)
    for name in sorted(result.model):
        slots = result.slots.get(name)
        extra = f"  + Adam {', '.join(slots)}" if slots else ""
        lines.append(f"  {name:<{width}}  {list(result.shapes[name])}{extra}")
    if result.optimizer_variables:
        lines.append(
            f"optimizer ({result.flavour}): " + ", ".join(sorted(result.optimizer_variables))
        )
    if result.unmapped:
        lines.append(f"unmapped: {len(result.unmapped)}")
        for key, reason in sorted(result.unmapped.items()):
            lines.append(f"  {key}  ({reason})")
    return "\n".join(lines)


def _not_the_checkpoint(parser: argparse.ArgumentParser, checkpoint: str, out: Path) -> None:
    """Refuse an OUT that is one of the checkpoint's own files (it would be overwritten)."""
    prefix = checkpoint[: -len(".index")] if checkpoint.endswith(".index") else checkpoint
    own = Path(prefix).name
    name = out.name
    if os.path.abspath(out.parent) == os.path.abspath(Path(prefix).parent) and (
        name in (own, own + ".index") or name.startswith(own + ".data-")
    ):
        parser.error(
            f"OUT {str(out)!r} is a file of the checkpoint itself (its prefix, .index or "
            ".data- shard); write elsewhere"
        )


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m tfadam convert",
        description="Convert a TensorFlow checkpoint (model and Adam state) to a torch.save "
        "file, without TensorFlow.",
    )
    p.add_argument(
        "checkpoint", type=nonempty_text, help="checkpoint prefix, its .index file, or a directory"
    )
    p.add_argument(
        "out", nargs="?", type=output_file, help="output file (torch.save); omit with --list"
    )
    p.add_argument("--list", action="store_true", help="list the tensors and exit")
    p.add_argument(
        "--optimizer-name",
        type=nonempty_text,
        default="Adam",
        help="TF1 optimizer name in slot names (Adam)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line, checked whole before any work starts (exit status 2 if bad)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list and args.out is not None:
        parser.error("--list prints the tensors and writes nothing; drop OUT or --list")
    if not args.list and args.out is None:
        parser.error("OUT is required unless --list is given")
    if args.out is not None:
        _not_the_checkpoint(parser, args.checkpoint, args.out)
    return args


def cli_convert(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tfadam convert``; returns the exit status.

    ``argv`` excludes the program and subcommand names, e.g.
    ``cli_convert(["model.ckpt-100", "model.pt"])``. A bad command line exits
    with status 2 before anything is read; errors in the checkpoint print one
    line to stderr and return 1.
    """
    args = parse_args(argv)
    try:
        if args.list:
            reader, names = open_checkpoint(args.checkpoint, optimizer_name=args.optimizer_name)
            with reader:
                print(f"{reader.prefix}: {len(reader)} tensors")
                known = {v.key: v.name for v in names.variables if v.name != v.key}
                for key in reader.keys():
                    info = reader.info(key)
                    part = "  (partitioned)" if info.partitioned else ""
                    name = f"  = {known[key]}" if key in known else ""
                    print(f"  {key}  {info.dtype} {list(info.shape)}{part}{name}")
            return 0
        result = convert(
            args.checkpoint,
            args.out,
            optimizer_name=args.optimizer_name,
            progress=False if args.no_progress else None,
        )
        print(format_report(result))
        print(f"wrote {result.out} ({result.nbytes} bytes of tensors)")
        return 0
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # writing OUT (reading errors are CheckpointErrors)
        print(f"error: cannot write {err.filename or args.out}: {err.strerror}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tfadam convert`` (the name ``tfadam.cli`` dispatches to)."""
    return cli_convert(argv)
