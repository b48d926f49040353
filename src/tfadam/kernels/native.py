"""Build and load the C kernels (``cpu_adam.c``) on first use.

The C source has no torch or Python headers, so it compiles in about a
second with the system C compiler. The shared library is cached in a per-user
directory, keyed by a hash of the source, the compiler, the flags and the CPU,
so a warm start only loads it. Where no compiler works, :func:`library`
returns ``None`` (and says why in :func:`unavailable_reason`); the dispatch
then uses the reference kernels, which give the same bits, slower.

Environment:
    ``TFADAM_KERNELS``: ``auto`` (default) or ``reference`` (never compile).
    ``TFADAM_CACHE_DIR``: where to keep compiled kernels (default
    ``$XDG_CACHE_HOME/tfadam`` or ``~/.cache/tfadam``).
    ``TFADAM_CC``, then ``CC``: the C compiler (default: ``cc``, ``gcc``, ``clang``).
    ``TFADAM_OPENMP``: ``auto`` (default: run on torch's OpenMP threads where
    torch uses GNU OpenMP and the compiler is GCC) or ``0`` (always use the
    kernels' own thread pool).

Example:
    >>> from tfadam.kernels import native
    >>> lib = native.library()
    >>> lib is None or lib.tfadam_abi_version() == native.ABI_VERSION
    True
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

ABI_VERSION = 3
SOURCE = Path(__file__).with_name("cpu_adam.c")

# -ffp-contract=off: an FMA would skip the rounding of a product (the rule
# rounds every operation). No -ffast-math: it reassociates, flushes
# subnormals and approximates sqrt/div. -fno-math-errno only lets sqrt()
# become the IEEE sqrtps/sqrtpd instruction (and so vectorise).
COMPILE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-pthread"]
LINK_FLAGS = ["-shared", "-pthread"]
NATIVE_FLAGS = ["-march=native"]
# GCC only: no second (narrower) vectorised epilogue per loop; at most 15
# elements per tensor run scalar instead, and the compile takes ~25% less.
# No memcpy calls made of loops: GCC split the kept copies of θ, m, v out of
# the update loop into three memcpy calls per NaN block (measured: the
# float32 step took 17.2 instead of 14.8 ms per core).
GCC_FLAGS = ["--param", "vect-epilogues-nomask=0", "-fno-tree-loop-distribute-patterns"]
# With torch's OpenMP runtime (see openmp_runtime): the kernels' threads are torch's.
OPENMP_FLAGS = ["-fopenmp", "-DTFADAM_OPENMP"]
PARTS = (1, 2)  # compiled in parallel, then linked (see TFADAM_PART in the C source)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_loaded = False
_reason: str | None = None

NAN_BLOCK = 256  # elements per NaN mark of the dense kernels (cpu_adam.c's NAN_BLOCK)

P = ctypes.c_void_p
I64 = ctypes.c_int64
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "tfadam_abi_version": (ctypes.c_int, []),
    "tfadam_nan_block": (ctypes.c_int, []),
    "tfadam_threading": (ctypes.c_int, []),
    "tfadam_f16_bits": (ctypes.c_uint16, [ctypes.c_float]),
    "tfadam_f16_load": (ctypes.c_float, [ctypes.c_uint16]),
    "tfadam_bf16_bits": (ctypes.c_uint16, [ctypes.c_float]),
}
for _name in ("f32", "u16", "f64"):
    _SIGNATURES[f"tfadam_floor_{_name}"] = (ctypes.c_int, [I64, P, P, P, P, P, ctypes.c_int])
for _name in ("f32", "f64", "f16", "bf16"):
    _SIGNATURES[f"tfadam_dense_{_name}"] = (
        ctypes.c_int,
        [I64, P, P, P, P, P, P, P, ctypes.c_int, ctypes.c_int, P],
    )
    _SIGNATURES[f"tfadam_sparse_{_name}"] = (
        ctypes.c_int,
        [I64, I64, P, P, P, I64, P, P, P, ctypes.c_int, ctypes.c_int, P],
    )


def cache_dir() -> Path:
    """Where compiled kernels are kept (``TFADAM_CACHE_DIR`` overrides)."""
    explicit = os.environ.get("TFADAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfadam"


def compiler() -> str | None:
    """The C compiler to use: ``TFADAM_CC``, ``CC``, then cc / gcc / clang on PATH."""
    for candidate in (os.environ.get("TFADAM_CC"), os.environ.get("CC")):
        if candidate:
            return shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_identity() -> str:
    # -march=native code is only valid on the CPU it was built for; a shared
    # home directory may be mounted on several kinds of machine.
    identity = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    identity.append(line.strip())
                if line.strip() == "":
                    break
    except OSError:
        identity.append(platform.processor())
    return "\n".join(identity)


def _loaded_openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (Linux), by path."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "/" in line}
    except OSError:
        return set()
    return {p for p in paths if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp"))}


def openmp_runtime() -> str | None:
    """The GNU OpenMP runtime torch threads with, if it does (a path), else ``None``.

    Kernels linked against it share torch's thread team: no second set of
    threads competes for the cores with torch's workers, which spin for a
    while after every parallel torch op.
    """
    import torch

    if os.environ.get("TFADAM_OPENMP", "auto").lower() in ("0", "off", "no", "false"):
        return None
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = [p for p in _loaded_openmp_runtimes() if "libgomp" in os.path.basename(p)]
    return runtimes[0] if len(runtimes) == 1 else None


def _key(cc: str, flags: list[str], link: Sequence[str] = ()) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    for tool in (cc, *link):
        stat = os.stat(tool)
        digest.update(f"{os.path.realpath(tool)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(" ".join(flags).encode())
    digest.update(_cpu_identity().encode())
    digest.update(str(ABI_VERSION).encode())
    return digest.hexdigest()[:20]


def _compile(cc: str, flags: list[str], target: Path, link: Sequence[str] = ()) -> str | None:
    """Compile into ``target`` atomically; returns an error text or None.

    The source is compiled as two halves at once (two cores: half the wait
    of the first step), then linked.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        objects = [os.path.join(work, f"part{part}.o") for part in PARTS]
        commands = [
            [cc, *flags, f"-DTFADAM_PART={part}", "-c", "-o", obj, str(SOURCE)]
            for part, obj in zip(PARTS, objects, strict=True)
        ]
        library = os.path.join(work, target.name)
        commands.append([cc, *LINK_FLAGS, "-o", library, *objects, *link, "-lm"])
        try:
            running = [
                subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for c in commands[:-1]
            ]
            results = [
                (c, *p.communicate(timeout=300), p.returncode)
                for c, p in zip(commands, running, strict=False)
            ]
            done = subprocess.run(commands[-1], capture_output=True, text=True, timeout=300)
            results.append((commands[-1], done.stdout, done.stderr, done.returncode))
        except (OSError, subprocess.SubprocessError) as error:
            return f"{cc}: {error}"
        for command, _, stderr, returncode in results:
            if returncode != 0:
                return f"{' '.join(command)} failed:\n{stderr.strip()[-2000:]}"
        # Concurrent builders write identical files; the rename is atomic.
        os.replace(library, target)
    return None


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    if lib.tfadam_abi_version() != ABI_VERSION:
        raise OSError(f"{path}: ABI version {lib.tfadam_abi_version()} != {ABI_VERSION}")
    if lib.tfadam_nan_block() != NAN_BLOCK:
        raise OSError(f"{path}: NaN blocks of {lib.tfadam_nan_block()} elements, not {NAN_BLOCK}")
    # The float16/bfloat16 conversions decide every bit of those dtypes:
    # refuse a library whose compiler got them wrong.
    probes = {1.0: (0x3C00, 0x3F80), 65520.0: (0x7C00, 0x4780), 2.0**-24: (0x0001, 0x3380)}
    for value, (half, brain) in probes.items():
        if lib.tfadam_f16_bits(value) != half or lib.tfadam_bf16_bits(value) != brain:
            raise OSError(f"{path}: float16/bfloat16 conversion self-test failed at {value}")
    return lib


def build(directory: Path | None = None, extra_flags: Sequence[str] = ()) -> ctypes.CDLL:
    """Compile (unless cached) and load the kernels; raise ``OSError`` if impossible.

    ``directory`` defaults to :func:`cache_dir`; ``extra_flags`` are added to
    the compiler's (the tests use it to prove that FMA contraction would be caught).
    """
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set TFADAM_CC or CC, or install gcc or clang)")
    directory = cache_dir() if directory is None else directory
    errors = []
    # -march=native first (AVX-512 where there is one); a compiler that does
    # not know it (or the GCC-only flags) gets a simpler build.
    is_gcc = "gcc" in os.path.basename(os.path.realpath(cc))
    attempts: list[tuple[list[str], list[str]]] = [
        (COMPILE_FLAGS + NATIVE_FLAGS, []),
        (COMPILE_FLAGS, []),
    ]
    if is_gcc:
        attempts.insert(0, (COMPILE_FLAGS + NATIVE_FLAGS + GCC_FLAGS, []))
        runtime = openmp_runtime()
        if runtime is not None:  # linked to torch's libgomp by path: the same library
            attempts.insert(0, (COMPILE_FLAGS + NATIVE_FLAGS + GCC_FLAGS + OPENMP_FLAGS, [runtime]))
    for flags, link in attempts:
        flags = flags + list(extra_flags)
        target = directory / f"tfadam_cpu_{_key(cc, flags, link)}.so"
        if not target.exists():
            error = _compile(cc, flags, target, link)
            if error is not None:
                errors.append(error)
                continue
        before = _loaded_openmp_runtimes()
        try:
            lib = _open(target)
        except OSError as error:
            errors.append(str(error))
            continue
        if link and _loaded_openmp_runtimes() != before:  # a second runtime: two thread teams
            errors.append(f"{target}: loading it brought a second OpenMP runtime")
            continue
        return lib
    raise OSError("\n".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernels, compiling them on first use; ``None`` if unavailable."""
    global _library, _loaded, _reason
    if _loaded:
        return _library
    with _lock:
        if _loaded:
            return _library
        if os.environ.get("TFADAM_KERNELS", "auto").lower() == "reference":
            _reason = "TFADAM_KERNELS=reference"
        else:
            try:
                _library = build()
            except OSError as error:
                _reason = str(error)
                warnings.warn(
                    "tfadam: the C kernels are unavailable, using the reference kernels "
                    f"(same bits, slower). Reason: {_reason}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _loaded = True
        return _library


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` if it did not, or not tried yet)."""
    return _reason


def reset() -> None:
    """Forget the loaded library, so that the next :func:`library` call loads again.

    For tests (e.g. of the no-compiler fallback); a library already loaded in
    this process stays mapped.
    """
    global _library, _loaded, _reason
    with _lock:
        _library, _loaded, _reason = None, False, None
