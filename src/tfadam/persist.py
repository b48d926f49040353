"""Crash-safe checkpoints of a model and its optimizer.

:func:`save_checkpoint` writes atomically: a temporary file in the target's
directory, flushed and fsynced, renamed over the target, then the directory
fsynced — so at every instant, even after a crash or ``SIGKILL``, the target
path holds either the previous complete checkpoint or the new one. The file
carries a SHA-256 of its payload; :func:`load_checkpoint` verifies it and
raises :class:`tfadam.CorruptCheckpointError` for a torn, truncated or altered
file before anything is read into a model or optimizer. Loading is all or
nothing: everything is checked first, then applied.

File layout (little-endian)::

    b"TFADAMCK" | uint32 format version (1) | uint64 payload length
    | 32-byte SHA-256 of the payload | payload (torch.save of a dict)

Example:
    >>> import os, tempfile, torch, tfadam
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = tfadam.Adam(model.parameters(), lr=0.1)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> save_checkpoint(path, model=model, optimizer=opt, step=1)
    >>> twin = torch.nn.Linear(2, 1)
    >>> twin_opt = tfadam.Adam(twin.parameters(), lr=0.1)
    >>> load_checkpoint(path, model=twin, optimizer=twin_opt)
    {'step': 1}
    >>> torch.equal(twin.weight, model.weight)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError, StateDictError
from .tf1 import AdamOptimizer

__all__ = ["load_checkpoint", "read_checkpoint", "save_checkpoint"]

MAGIC = b"TFADAMCK"
VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256
_CHUNK = 1 << 24  # os.write may write less than asked; large writes go in pieces

PathLike = str | os.PathLike


def save_checkpoint(
    path: PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    **extra: Any,
) -> None:
    """Write ``model``'s and ``optimizer``'s state and ``extra`` to ``path``, atomically.

    ``optimizer`` is anything with ``state_dict()`` (``tfadam.Adam``, any torch
    optimizer) or a :class:`tfadam.AdamOptimizer`, whose slots are stored under
    the names of ``model``'s parameters (so ``model`` is required then).
    ``extra`` holds whatever else a resume needs (step counter, RNG state, a
    scheduler's ``state_dict()``); keep it to tensors, numbers, strings and
    containers of them so that :func:`load_checkpoint` can read it with
    ``weights_only=True``.

    The state is streamed into the temporary file (no in-memory copy of it)
    and hashed on the way; the header is written last. A failure leaves the
    previous checkpoint in place and removes the temporary file; temporary
    files of a saver that was killed are removed by the next save.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "extra-only.ckpt")
        >>> save_checkpoint(path, step=7, note="warm-up done")
        >>> read_checkpoint(path)["extra"]
        {'step': 7, 'note': 'warm-up done'}
    """
    content = {
        "model": None if model is None else model.state_dict(),
        "optimizer": None if optimizer is None else _optimizer_state(optimizer, model),
        "extra": extra,
    }
    target = Path(path)

    def write(descriptor: int) -> None:
        _write_all(descriptor, bytes(_HEADER.size))  # the header's place, filled in last
        payload = _HashingWriter(descriptor)
        torch.save(content, payload)
        os.lseek(descriptor, 0, os.SEEK_SET)
        header = _HEADER.pack(MAGIC, VERSION, payload.length, payload.hash.digest())
        _write_all(descriptor, header)

    _write_atomically(target, write)
    _remove_stale_temporaries(target)


def read_checkpoint(
    path: PathLike, *, map_location: Any = "cpu", weights_only: bool = True
) -> dict[str, Any]:
    """The verified content of a checkpoint: ``{"model", "optimizer", "extra"}``.

    Raises :class:`tfadam.CorruptCheckpointError` if the file is not a whole,
    unaltered tfadam checkpoint. ``weights_only=False`` lets ``torch.load``
    unpickle arbitrary objects in ``extra``: only for files you trust.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "a.ckpt")
        >>> save_checkpoint(path, epoch=3)
        >>> with open(path, "r+b") as f:  # a torn write: the end is missing
        ...     _ = f.truncate(os.path.getsize(path) - 10)
        >>> read_checkpoint(path)
        Traceback (most recent call last):
        ...
        tfadam.errors.CorruptCheckpointError: ...: truncated ...
    """
    with open(path, "rb") as f:
        data = f.read()
    payload = _verified_payload(memoryview(data), str(path))
    # Read in place: wrapping the payload in a BytesIO would copy it.
    return torch.load(_ReadOnlyView(payload), map_location=map_location, weights_only=weights_only)


def load_checkpoint(
    path: PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    map_location: Any = "cpu",
    weights_only: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` from ``path``; return the ``extra`` it was saved with.

    All or nothing: the checksum, then the model state (keys and shapes, as
    ``strict`` asks) and the optimizer state are checked before either is
    modified; on any error both are left as they were. Tensors go to
    ``map_location`` first, then to each parameter's device, as torch's
    ``load_state_dict`` does.

    Raises:
        CorruptCheckpointError: the file is torn, truncated or altered.
        StateDictError: the state does not fit ``model`` or ``optimizer``.

    Example:
        >>> import os, tempfile, torch, tfadam
        >>> path = os.path.join(tempfile.mkdtemp(), "small.ckpt")
        >>> save_checkpoint(path, model=torch.nn.Linear(2, 3), epoch=4)
        >>> other = torch.nn.Linear(2, 2)  # another shape: refused, left untouched
        >>> before = other.weight.detach().clone()
        >>> load_checkpoint(path, model=other)
        Traceback (most recent call last):
        ...
        tfadam.errors.StateDictError: ...: model entry 'bias' has shape (3,) in the checkpoint \
but (2,) in the model. Load it into the model it was saved from.
        >>> torch.equal(other.weight, before)
        True
        >>> load_checkpoint(path, model=torch.nn.Linear(2, 3))
        {'epoch': 4}
    """
    content = read_checkpoint(path, map_location=map_location, weights_only=weights_only)
    where = str(path)
    if model is not None:
        if content.get("model") is None:
            raise StateDictError(f"{where} holds no model state; save it with model=...")
        _check_model_state(model, content["model"], strict, where)
    if optimizer is not None:
        if content.get("optimizer") is None:
            raise StateDictError(f"{where} holds no optimizer state; save it with optimizer=...")
        # The optimizer's own load is all or nothing and leaves its old tensors
        # intact, so it can be undone cheaply if the model's load then fails.
        previous = _optimizer_state(optimizer, model)
        _load_optimizer_state(optimizer, content["optimizer"], model, where)
    if model is not None:
        try:
            model.load_state_dict(content["model"], strict=strict)
        except BaseException:
            if optimizer is not None:
                _load_optimizer_state(optimizer, previous, model, where)
            raise
    return dict(content.get("extra") or {})


# -- the file ------------------------------------------------------------------------------------


def _verified_payload(data: memoryview, where: str) -> memoryview:
    if len(data) < _HEADER.size:
        raise CorruptCheckpointError(
            f"{where}: truncated to {len(data)} bytes, shorter than the {_HEADER.size}-byte "
            "header (a torn write?). Use an earlier checkpoint."
        )
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic == bytes(len(MAGIC)):
        raise CorruptCheckpointError(
            f"{where}: the header was never written (an interrupted save). Use an earlier "
            "checkpoint."
        )
    if magic != MAGIC:
        raise CorruptCheckpointError(
            f"{where}: not a tfadam checkpoint (starts with {bytes(magic)!r}, not {MAGIC!r}). "
            "A file written by torch.save is read with torch.load."
        )
    if version != VERSION:
        raise CorruptCheckpointError(
            f"{where}: checkpoint format version {version}; this tfadam reads version {VERSION}."
        )
    payload = data[_HEADER.size :]
    if len(payload) != length:
        raise CorruptCheckpointError(
            f"{where}: truncated or extended: the header announces {length} payload bytes, "
            f"the file holds {len(payload)} (a torn write?). Use an earlier checkpoint."
        )
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch: the content was altered or torn after it was "
            "written. Use an earlier checkpoint."
        )
    return payload


def _write_atomically(target: Path, write: Callable[[int], None]) -> None:
    """Call ``write(descriptor)`` on a temporary file, then make it ``target`` atomically."""
    directory = target.parent
    # Same directory: a rename is atomic only within one file system.
    temporary = directory / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temporary, flags, 0o666)
    try:
        try:
            write(descriptor)
            # The data must be on disk before the rename makes it the checkpoint;
            # otherwise a power loss can leave the new name on unwritten blocks.
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _write_all(descriptor: int, data: Any) -> int:
    view = memoryview(data).cast("B")
    size = len(view)
    while view:
        # os.write may write less than asked (and large writes go in pieces).
        written = os.write(descriptor, view[:_CHUNK])
        view = view[written:]
    return size


class _HashingWriter:
    """The file object torch.save writes to: hashes and counts on the way to the file."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        self.hash = hashlib.sha256()
        self.length = 0

    def write(self, data: Any) -> int:
        self.hash.update(data)
        size = _write_all(self.descriptor, data)
        self.length += size
        return size

    def flush(self) -> None:
        pass


class _ReadOnlyView(io.RawIOBase):
    """A seekable binary file over a memoryview, for torch.load without a copy."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}
        self._position = max(0, base[whence] + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._position : self._position + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. POSIX only: Windows cannot open a
    # directory this way (and its MoveFileEx is durable on its own terms).
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left by savers that no longer run."""
    if os.name != "posix":
        return
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        pid_text = leftover.name[len(target.name) + 2 :].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                leftover.unlink()
        except PermissionError:
            pass  # alive, owned by someone else


# -- model and optimizer states ------------------------------------------------------------------


def _check_model_state(model: torch.nn.Module, state: Any, strict: bool, where: str) -> None:
    # torch's Module.load_state_dict copies each tensor as it goes and reports
    # shape mismatches and missing keys at the end — after the others were
    # overwritten. So everything it would refuse is checked first.
    if not isinstance(state, Mapping):
        raise StateDictError(f"{where}: the model state is a {type(state).__name__}, not a dict.")
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if strict and (missing or unexpected):
        raise StateDictError(
            f"{where}: the model state does not match {type(model).__name__}: missing keys "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}. Load it into the model "
            "it was saved from, or pass strict=False."
        )
    for key in sorted(own.keys() & state.keys()):
        mine, saved = own[key], state[key]
        if isinstance(mine, torch.Tensor) and (
            not isinstance(saved, torch.Tensor) or saved.shape != mine.shape
        ):
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise StateDictError(
                f"{where}: model entry {key!r} has shape {shape} in the checkpoint but "
                f"{tuple(mine.shape)} in the model. Load it into the model it was saved from."
            )
        if not isinstance(mine, torch.Tensor):
            continue
        # torch copies each entry in turn and reports a failed copy only at the
        # end, after the others were overwritten: refuse what copy_ would.
        if saved.is_meta and not mine.is_meta:
            raise StateDictError(
                f"{where}: model entry {key!r} is on the meta device in the checkpoint (it has "
                "no values). Save the checkpoint from a materialised model."
            )
        if saved.layout != mine.layout:
            raise StateDictError(
                f"{where}: model entry {key!r} has layout {saved.layout} in the checkpoint but "
                f"{mine.layout} in the model. Save it dense (tensor.to_dense())."
            )
        if saved.is_complex() and not mine.is_complex():
            raise StateDictError(
                f"{where}: model entry {key!r} is {saved.dtype} in the checkpoint but "
                f"{mine.dtype} in the model: copying would drop the imaginary part."
            )


def _parameter_names(model: torch.nn.Module | None) -> dict[int, str]:
    if model is None:
        raise TypeError(
            "a tfadam.AdamOptimizer keys its slots by variable; pass model=... so that they "
            "are saved and restored under the names of the model's parameters."
        )
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def _optimizer_state(optimizer: Any, model: torch.nn.Module | None) -> Any:
    if isinstance(optimizer, AdamOptimizer):
        names = _parameter_names(model)
        exported = optimizer.export_state()
        unnamed = [var for var in exported["slots"] if id(var) not in names]
        if unnamed:
            raise ValueError(
                "the tfadam.AdamOptimizer has slots for variables that are not parameters of "
                f"the model ({len(names)} parameters); pass the model that owns every variable."
            )
        return {
            "kind": "tfadam.AdamOptimizer",
            "beta1_power": exported["beta1_power"],
            "beta2_power": exported["beta2_power"],
            "slots": {names[id(var)]: slots for var, slots in exported["slots"].items()},
        }
    if not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(
            f"optimizer is a {type(optimizer).__name__}; expected a torch optimizer (with "
            "state_dict/load_state_dict) or a tfadam.AdamOptimizer."
        )
    return optimizer.state_dict()


def _load_optimizer_state(
    optimizer: Any, state: Any, model: torch.nn.Module | None, where: str
) -> None:
    if not isinstance(optimizer, AdamOptimizer):
        optimizer.load_state_dict(state)
        return
    if not isinstance(state, Mapping) or state.get("kind") != "tfadam.AdamOptimizer":
        raise StateDictError(
            f"{where}: the optimizer state was not saved from a tfadam.AdamOptimizer."
        )
    _parameter_names(model)
    assert model is not None
    params = dict(model.named_parameters())
    slots: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    if not isinstance(state.get("slots"), Mapping):
        raise StateDictError(f"{where}: the optimizer state has no slots mapping.")
    for name, named in state["slots"].items():
        param = params.get(name)
        if param is None:
            raise StateDictError(
                f"{where}: optimizer slots for {name!r}, not a parameter of the model."
            )
        if not isinstance(named, Mapping):
            raise StateDictError(f"{where}: the slots of {name!r} are not a dict.")
        for slot, tensor in named.items():
            if not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
                raise StateDictError(
                    f"{where}: slot {slot!r} of {name!r} does not match the parameter's shape "
                    f"{tuple(param.shape)}."
                )
            if tensor.is_meta and not param.is_meta:
                raise StateDictError(
                    f"{where}: slot {slot!r} of {name!r} is on the meta device (it has no "
                    "values). Save the checkpoint from a materialised optimizer."
                )
        slots[param] = {
            slot: tensor.to(param.device, param.dtype) for slot, tensor in named.items()
        }
    # import_state checks everything as a step does, then replaces the whole
    # state, or raises having replaced nothing.
    try:
        optimizer.import_state(
            {
                "beta1_power": state.get("beta1_power"),
                "beta2_power": state.get("beta2_power"),
                "slots": slots,
            }
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, StateDictError):
            raise
        raise StateDictError(f"{where}: {error}") from error
