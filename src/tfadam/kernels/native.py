"""Load the C kernels (``cpu_adam.c``): built on first use, or prebuilt at install time.

The C source has no torch or Python headers. Where a C compiler works, it
compiles on first use with ``-march=native`` (about a second), linked to
torch's OpenMP runtime where torch uses GNU OpenMP, cached in a per-user
directory keyed by a hash of the source, the compiler, the flags and the
CPU. Where none does (slim containers), the kernels ``pip install``
(``setup.py``) compiled once per x86-64 level (:data:`PREBUILT_LEVELS`:
baseline, v3 = AVX2, v4 = AVX-512) into ``tfadam/kernels/prebuilt/`` run:
the best level this CPU runs (portable flags, their own thread pool, the
same bits). Where neither works, :func:`library` returns ``None``
(and says why in :func:`unavailable_reason`); the dispatch then uses the
reference kernels, which give the same bits, slower. :func:`selection` says
which kernels were chosen.

Environment:
    ``TFADAM_KERNELS``: ``auto`` (default), ``prebuilt`` (never compile;
    ``prebuilt:x86-64-v3`` pins a level), ``compiled`` (never the prebuilt
    ones) or ``reference`` (no C kernels).
    ``TFADAM_CACHE_DIR``: where to keep compiled kernels (default
    ``$XDG_CACHE_HOME/tfadam`` or ``~/.cache/tfadam``).
    ``TFADAM_CC``, then ``CC``: the C compiler (default: ``cc``, ``gcc``, ``clang``).
    ``TFADAM_OPENMP``: ``auto`` (default: run on torch's OpenMP threads where
    torch uses GNU OpenMP and the compiler is GCC) or ``0`` (always use the
    kernels' own thread pool).

This module imports nothing outside the standard library at its top:
``setup.py`` loads it by path to build the prebuilt kernels, where torch may
not be importable.

Example:
    >>> from tfadam.kernels import native
    >>> lib = native.library()
    >>> lib is None or lib.tfadam_abi_version() == native.ABI_VERSION
    True
    >>> native.selection().source in ("prebuilt", "compiled", "reference")
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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

# The prebuilt kernels: one library per x86-64 microarchitecture level (the
# psABI's, as GCC >= 11 and clang >= 12 name them), best first, with the
# /proc/cpuinfo flags a CPU needs to run it. A wheel must run on any x86-64,
# so no -march=native there. AVX512-BF16 (not in v4) is left to the run-time
# build: it only makes bfloat16 rounding an instruction.
PREBUILT_LEVELS: dict[str, tuple[str, ...]] = {
    "x86-64-v4": (
        *("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
        *("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
        *("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    ),
    "x86-64-v3": (
        *("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
        *("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
    ),
    "x86-64": (),
}
PREBUILT_DIR = Path(__file__).with_name("prebuilt")
# Where setup.py builds them (the C source needs x86-64; ctypes loads ELF .so files).
PREBUILT_PLATFORM = platform.system() == "Linux" and platform.machine().lower() in (
    "x86_64",
    "amd64",
)


@dataclass(frozen=True)
class Selection:
    """Which kernels :func:`library` chose, and why.

    ``source`` is ``"prebuilt"`` (built at install time), ``"compiled"`` (at
    run time, on this machine) or ``"reference"`` (no C kernels: the
    reference kernels, same bits, slower); ``detail`` the level and threads,
    or the reason; ``path`` the shared library loaded.
    """

    source: Literal["prebuilt", "compiled", "reference"]
    detail: str
    path: str | None = None

    def __str__(self) -> str:
        where = f": {self.path}" if self.path else ""
        return f"{self.source} ({self.detail}){where}"


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_loaded = False
_selection: Selection | None = None

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


def whole(path: Path) -> bool:
    """Whether a cached ELF library holds every byte its headers place (else rebuild it).

    A truncated file (a crash before the build's bytes reached the disk, a
    copied cache cut short) passes ``dlopen``'s checks and then kills the
    process with SIGBUS where the loader touches the missing pages. Other
    formats (Mach-O) are not inspected.

    >>> whole(Path(__file__))  # not ELF: not inspected
    True
    """
    try:
        with open(path, "rb") as file:
            header = file.read(64)
            size = os.fstat(file.fileno()).st_size
            if header[:4] != b"\x7fELF":
                return True  # (an empty or foreign file: dlopen refuses it, an OSError)
            wide, order = header[4] == 2, "little" if header[5] == 1 else "big"
            # ELF64 / ELF32 offsets of e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum
            places = ((32, 8), (40, 8), (54, 2), (56, 2), (58, 2), (60, 2))
            if not wide:
                places = ((28, 4), (32, 4), (42, 2), (44, 2), (46, 2), (48, 2))
            phoff, shoff, phsize, phnum, shsize, shnum = (
                int.from_bytes(header[at : at + width], order) for at, width in places
            )
            if len(header) < 52 or max(phoff + phsize * phnum, shoff + shsize * shnum) > size:
                return False
            file.seek(phoff)
            table = file.read(phsize * phnum)
    except OSError:
        return False
    # Each segment's p_offset and p_filesz: its bytes must be in the file.
    (offset_at, filesz_at), width = ((8, 32), 8) if wide else ((4, 16), 4)
    for entry in (table[i : i + phsize] for i in range(0, len(table), max(phsize, 1))):
        offset = int.from_bytes(entry[offset_at : offset_at + width], order)
        if offset + int.from_bytes(entry[filesz_at : filesz_at + width], order) > size:
            return False
    return True


def cache_dir() -> Path:
    """Where compiled kernels are kept (``TFADAM_CACHE_DIR`` overrides)."""
    explicit = os.environ.get("TFADAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfadam"


def find_tool(variables: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of these environment variables that is set (a path or a name on PATH),
    else the first of these names on PATH; None if there is none."""
    for candidate in map(os.environ.get, variables):
        if candidate:
            return shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def compiler() -> str | None:
    """The C compiler to use: ``TFADAM_CC``, ``CC``, then cc / gcc / clang on PATH."""
    return find_tool(("TFADAM_CC", "CC"), ("cc", "gcc", "clang"))


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


def _is_gcc(cc: str) -> bool:
    return "gcc" in os.path.basename(os.path.realpath(cc))


def _build(directory: Path | None, extra_flags: Sequence[str]) -> tuple[ctypes.CDLL, Selection]:
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set TFADAM_CC or CC, or install gcc or clang)")
    directory = cache_dir() if directory is None else directory
    errors = []
    # -march=native first (AVX-512 where there is one); a compiler that does
    # not know it (or the GCC-only flags) gets a simpler build.
    attempts: list[tuple[list[str], list[str]]] = [
        (COMPILE_FLAGS + NATIVE_FLAGS, []),
        (COMPILE_FLAGS, []),
    ]
    if _is_gcc(cc):
        attempts.insert(0, (COMPILE_FLAGS + NATIVE_FLAGS + GCC_FLAGS, []))
        runtime = openmp_runtime()
        if runtime is not None:  # linked to torch's libgomp by path: the same library
            attempts.insert(0, (COMPILE_FLAGS + NATIVE_FLAGS + GCC_FLAGS + OPENMP_FLAGS, [runtime]))
    for flags, link in attempts:
        flags = flags + list(extra_flags)
        target = directory / f"tfadam_cpu_{_key(cc, flags, link)}.so"
        if not (target.exists() and whole(target)):
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
        march = "-march=native" if NATIVE_FLAGS[0] in flags else "no -march"
        detail = f"{march}, {_threads(lib)}, by {os.path.basename(cc)}"
        return lib, Selection("compiled", detail, str(target))
    raise OSError("\n".join(errors))


def build(directory: Path | None = None, extra_flags: Sequence[str] = ()) -> ctypes.CDLL:
    """Compile (unless cached) and load the kernels; raise ``OSError`` if impossible.

    ``directory`` defaults to :func:`cache_dir`; ``extra_flags`` are added to
    the compiler's (the tests use it to prove that FMA contraction would be caught).
    """
    return _build(directory, extra_flags)[0]


def _threads(lib: ctypes.CDLL) -> str:
    return "torch's OpenMP threads" if lib.tfadam_threading() else "own thread pool"


def cpu_levels() -> list[str]:
    """The :data:`PREBUILT_LEVELS` this CPU runs, best first (none off x86-64 Linux)."""
    if not PREBUILT_PLATFORM:
        return []
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    # The kernel lists a flag only where the OS saves its registers too (XSAVE).
    have = set(flags.partition(":")[2].split())
    return [level for level, needed in PREBUILT_LEVELS.items() if have.issuperset(needed)]


def prebuilt_path(level: str, directory: Path = PREBUILT_DIR) -> Path:
    """Where the kernels prebuilt for ``level`` are installed."""
    return directory / f"tfadam_cpu_{level.replace('-', '_')}.so"


def portable_flags(cc: str, level: str) -> list[str]:
    """The flags of the prebuilt kernels for ``level``: as at run time, but no -march=native."""
    flags = [*COMPILE_FLAGS, f"-march={level}", "-mtune=generic"]
    return flags + GCC_FLAGS if _is_gcc(cc) else flags


def build_prebuilt_level(level: str, target: Path, cc: str) -> str | None:
    """Compile ``level``'s prebuilt kernels into ``target``; returns an error text or None.

    For ``setup.py``, at install time. Where this CPU runs ``level``, the
    library must also pass the loader's self-tests (else it is removed).
    """
    error = _compile(cc, portable_flags(cc, level), target)
    if error is not None and _is_gcc(cc):  # an old GCC: without the tuning flags
        error = _compile(cc, [*COMPILE_FLAGS, f"-march={level}"], target)
    if error is None and level in cpu_levels():
        try:
            _open(target)
        except OSError as failed:
            target.unlink()
            error = str(failed)
    return error


def load_prebuilt(level: str | None = None) -> tuple[ctypes.CDLL, Selection]:
    """Load the prebuilt kernels: ``level``'s, or the best this CPU runs; else ``OSError``."""
    runnable = cpu_levels()
    if level is not None and level not in PREBUILT_LEVELS:
        raise OSError(f"no such level {level!r} (choose from {', '.join(PREBUILT_LEVELS)})")
    if level is not None and level not in runnable:
        raise OSError(f"this CPU cannot run the {level} kernels")
    if not runnable:
        raise OSError(f"none are built for {platform.machine()} {platform.system()}")
    errors = []
    for candidate in [level] if level is not None else runnable:
        path = prebuilt_path(candidate)
        if not path.exists():
            errors.append(f"{path.name} is not installed")
            continue
        try:
            lib = _open(path)
        except OSError as error:
            errors.append(str(error))
            continue
        return lib, Selection("prebuilt", f"{candidate}, {_threads(lib)}", str(path))
    raise OSError("; ".join(errors))


MODES = ("auto", "prebuilt", "prebuilt:LEVEL", "compiled", "reference")


def _choose(mode: str) -> tuple[ctypes.CDLL | None, Selection]:
    """The kernels ``TFADAM_KERNELS=mode`` asks for: a library (or None) and why."""
    if mode == "reference":
        return None, Selection("reference", "TFADAM_KERNELS=reference")
    kind, _, level = mode.partition(":")
    if kind not in ("auto", "prebuilt", "compiled") or (level and kind != "prebuilt"):
        return None, Selection(
            "reference", f"TFADAM_KERNELS={mode!r} is none of {', '.join(MODES)}"
        )
    # auto: the run-time build where a compiler works (-march=native, AVX512-BF16
    # included, and torch's own OpenMP threads: measured 1.3x faster than the
    # prebuilt x86-64-v4 kernels on D3, see benchmarks/RESULTS.md), else prebuilt.
    errors = []
    if kind in ("auto", "compiled"):
        try:
            return _build(None, ())
        except OSError as error:
            errors.append(f"run-time build: {error}")
    if kind in ("auto", "prebuilt"):
        try:
            return load_prebuilt(level or None)
        except OSError as error:
            errors.append(f"prebuilt kernels: {error}")
    return None, Selection("reference", "; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The loaded kernels (compiled on first use, else prebuilt); ``None`` if unavailable."""
    global _library, _loaded, _selection
    if _loaded:
        return _library
    with _lock:
        if _loaded:
            return _library
        mode = os.environ.get("TFADAM_KERNELS", "auto").strip().lower() or "auto"
        _library, _selection = _choose(mode)
        _loaded = True
        return _library


def selection() -> Selection:
    """Which kernels run (:class:`Selection`); loads them if not done yet."""
    library()
    assert _selection is not None
    return _selection


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` if it did not, or not tried yet)."""
    if _selection is None or _selection.source != "reference":
        return None
    return _selection.detail


def reset() -> None:
    """Forget the loaded library, so that the next :func:`library` call loads again.

    For tests (e.g. of the no-compiler fallback); a library already loaded in
    this process stays mapped.
    """
    global _library, _loaded, _selection
    with _lock:
        _library, _loaded, _selection = None, False, None
