"""Many tensors' data addresses (and layouts) in one C++ call (``addresses.cpp``), built once.

A step that reuses its plan (:func:`tfadam.engine.reuse`) re-reads the
address of every variable, slot and gradient: 8,000 ``data_ptr()`` calls for
2,000 parameters, at 0.1-0.4 us each from Python (more where the tensors'
metadata is cold in cache, as after another optimizer's step). One C++ call
reads them all, 4-5x faster (benchmarks/RESULTS.md, session 7).

Reading a tensor's address takes torch's C++ headers, so unlike the C
kernels this is built against the installed torch, on first use: by a
detached process of its own (about 10 s of one core), once per torch version
and machine, cached beside the kernels (:func:`tfadam.kernels.native.cache_dir`);
a thread of this process loads it when it is there. Until then, and wherever
it cannot be built (no C++ compiler, no Python headers), :func:`reader`
returns None and the addresses are read one Python call per tensor: the same
numbers, slower. :func:`status` says which, and why.

Environment:
    ``TFADAM_ADDRESSES``: ``auto`` (default) or ``python`` (never build it).
    ``TFADAM_CXX``, then ``CXX``: the C++ compiler (default: c++, g++, clang++).

>>> import torch
>>> from array import array
>>> read = reader(wait=True)
>>> t = torch.arange(4.0)
>>> out = array("Q", [0, 0])
>>> read is None or read([t, t[1:]], out, (torch.Tensor,)) is None
True
>>> read is None or list(out) == [t.data_ptr(), t.data_ptr() + 4]
True
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import sysconfig
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("addresses.cpp")
Reader = Callable[[Sequence[torch.Tensor], array, tuple[type, ...]], None]
Recorder = Callable[[Sequence[torch.Tensor], array, tuple[type, ...]], "bytes | None"]

_lock = threading.Lock()
_reader: Reader | None = None
_recorder: Recorder | None = None
_builder: threading.Thread | None = None
_status = "not asked for yet"


def compiler() -> str | None:
    """The C++ compiler: ``TFADAM_CXX``, ``CXX``, then c++ / g++ / clang++ on PATH."""
    return native.find_tool(("TFADAM_CXX", "CXX"), ("c++", "g++", "clang++"))


def _command(cxx: str, standard: str, target: str) -> list[str]:
    root = Path(torch.__file__).parent
    lib = root / "lib"
    command = [cxx, "-O2", "-shared", "-fPIC", f"-std={standard}", "-w"]
    command.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}")
    command += [f"-I{sysconfig.get_paths()['include']}", f"-I{root / 'include'}"]
    command += [f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}"]
    command += [str(SOURCE), "-o", target, f"-L{lib}", f"-Wl,-rpath,{lib}"]
    command += ["-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10"]
    if platform.system() == "Darwin":  # Python's symbols come from the process
        command += ["-undefined", "dynamic_lookup"]
    return command


def _target(cxx: str) -> Path:
    """Where this torch's build lives: keyed by the source, compiler, flags, torch and Python."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    stat = os.stat(cxx)
    digest.update(f"{os.path.realpath(cxx)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(f"{torch.__version__}|{torch.__file__}|{platform.python_version()}".encode())
    digest.update(" ".join(_command(cxx, "", "")).encode())
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return native.cache_dir() / f"tfadam_addresses_{digest.hexdigest()[:20]}{suffix}"


# The build runs in a process of its own, detached from this one (its own
# session), so that it finishes even if this process ends first: one build
# per machine and torch version, not one started and killed by every short
# script. It leaves the module at the target path, or a `.failed` file that
# says why (and stops later processes from trying again: delete it to retry).
_BUILDER = """
import json, os, subprocess, sys
job = json.loads(sys.argv[1])
errors = []
try:
    for command in job["commands"]:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        if done.returncode == 0:
            os.replace(job["built"], job["target"])  # atomic: a reader sees all or nothing
            break
        errors.append(done.stderr.strip()[-1500:] or "exit status %d" % done.returncode)
    else:
        with open(job["failed"], "w") as out:
            out.write("\\n\\n".join(errors))
except Exception as error:
    try:
        with open(job["failed"], "w") as out:
            out.write(repr(error))
    except OSError:
        pass
finally:
    for leftover in (job["built"], job["marker"]):
        try:
            os.unlink(leftover)
        except OSError:
            pass
"""
STALE_AFTER_S = 900  # a marker this old belongs to a builder that died


def _paths(target: Path) -> tuple[Path, Path]:
    """The build's marker (a build is under way) and its failure record."""
    return Path(f"{target}.building"), Path(f"{target}.failed")


def _claim(marker: Path) -> bool:
    """Whether this process should start the build (no other one is building)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        try:
            if time.time() - marker.stat().st_mtime < STALE_AFTER_S:
                return False
        except FileNotFoundError:  # that build just ended
            return False
        os.utime(marker)  # a builder that died: take over
        return True


def _spawn(cxx: str, target: Path) -> None:
    """Start the detached builder (see ``_BUILDER``)."""
    marker, failed = _paths(target)
    built = f"{target}.{os.getpid()}.tmp"
    # torch 2.15's headers need C++20 (2.6's build with either); an older compiler, C++17.
    commands = [_command(cxx, standard, built) for standard in ("c++20", "c++17")]
    job = dict(commands=commands, built=built, target=str(target), marker=str(marker))
    job["failed"] = str(failed)
    subprocess.Popen(
        [sys.executable, "-c", _BUILDER, json.dumps(job)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _await(target: Path) -> None:
    """(A thread) Wait for the build to leave the module or its failure, then load or say why."""
    marker, failed = _paths(target)
    deadline = time.monotonic() + STALE_AFTER_S
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    error = None
    if not (target.exists() and native.whole(target)):  # (a truncated one is being replaced)
        try:
            error = failed.read_text()[-1500:] or "no reason given"
        except OSError:
            error = f"no module at {target} after the build"
    with _lock:
        _finish(target, error)


def _load(target: Path) -> tuple[Reader, Recorder]:
    """Import the built module and check it against ``data_ptr()``; ``ImportError`` if it fails."""
    spec = importlib.util.spec_from_file_location("tfadam_addresses", target)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {target}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = torch.zeros(8)
    probes = [base, base[3:], torch.nn.Parameter(torch.ones(2, 3)), torch.zeros(0)]
    expected = [t.data_ptr() for t in probes]
    plain = (torch.Tensor, torch.nn.Parameter)
    for function in (module.addresses, module.records):
        out = array("Q", [0]) * len(probes)
        function(probes, out, plain)
        if list(out) != expected:
            raise ImportError(f"{target}: its addresses differ from data_ptr()'s")
    return module.addresses, module.records


def _start() -> None:
    """Load the cached build, or start it and a thread that awaits it (the caller holds _lock)."""
    global _reader, _builder, _status
    mode = os.environ.get("TFADAM_ADDRESSES", "auto").strip().lower() or "auto"
    if mode == "python":
        _status = "python (TFADAM_ADDRESSES=python)"
        return
    if mode != "auto":
        _status = f"python (TFADAM_ADDRESSES={mode!r} is none of auto, python)"
        return
    cxx = compiler()
    if cxx is None:
        _status = "python (no C++ compiler: set TFADAM_CXX or CXX)"
        return
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        _status = "python (no Python headers: install python3-dev)"
        return
    try:
        target = _target(cxx)
        # (exists() raises where the cache directory cannot be searched)
        cached = target.exists() and native.whole(target)
    except OSError as failed:
        _status = f"python (the cache directory cannot be read: {failed})"
        return
    if cached:
        _finish(target, None)
        return
    marker, failed = _paths(target)
    if failed.exists():
        _status = f"python (the build failed: {failed} says why; delete it to try again)"
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if _claim(marker):
            _spawn(cxx, target)
    except OSError as error:  # (an unwritable cache directory, say)
        _status = f"python (cannot build in {target.parent}: {error})"
        return
    _status = f"building {target}"
    _builder = threading.Thread(target=_await, args=(target,), name="tfadam addresses", daemon=True)
    _builder.start()


def _finish(target: Path, error: str | None) -> None:
    global _reader, _recorder, _status
    if error is not None:
        _status = f"python (the build failed: {error})"
        return
    try:
        _reader, _recorder = _load(target)
    except (ImportError, OSError, TypeError, RuntimeError) as failed:
        _status = f"python (loading failed: {failed})"
        return
    _status = f"C++ ({target})"


def _after_fork_in_child() -> None:
    # A fork while the builder held the lock would leave the child's copy held.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def reader(*, wait: bool = False) -> Reader | None:
    """The C++ reader, or None while it is built or where it cannot be (see :func:`status`).

    The first call starts the build; ``wait=True`` waits for it to finish.
    ``read(tensors, out, types)`` writes each tensor's ``data_ptr()`` into
    ``out`` (an ``array("Q")`` of the same length); it raises ``TypeError``
    for an object whose type is not in ``types``.
    """
    if _reader is not None:
        return _reader
    with _lock:
        if _builder is None and _status == "not asked for yet":
            _start()
        builder = _builder
    if wait and builder is not None:
        builder.join()
    return _reader


def recorder(*, wait: bool = False) -> Recorder | None:
    """The C++ recorder of addresses and layouts, or None, as :func:`reader`.

    ``record(tensors, out, types)`` writes each tensor's ``data_ptr()`` into
    ``out`` and returns each tensor's layout as bytes (the index of its type
    in ``types``, its dispatch keys, dtype, device index, ``requires_grad``,
    whether it is a leaf, sizes and strides): two records are equal iff the tensors are laid out
    alike. It returns None, and writes nothing, where a tensor's type is not
    in ``types`` or its sizes, strides or address cannot be read.
    """
    reader(wait=wait)
    return _recorder


def reset() -> None:
    """Forget the reader and the build's state (for tests); a loaded module stays mapped."""
    global _reader, _recorder, _builder, _status
    with _lock:
        _reader, _recorder, _builder, _status = None, None, None, "not asked for yet"


def status() -> str:
    """How addresses are read here: ``C++ (path)``, ``building ...`` or ``python (why)``."""
    return _status
