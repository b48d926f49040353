"""TensorFlow and triton in one process: load triton first, or leave it alone.

TensorFlow >= 2.20 loads its LLVM with ``RTLD_GLOBAL``; a ``libtriton``
(triton >= 3.7, which every CUDA build of torch brings) loaded later binds
to it and the process dies with SIGSEGV (TensorFlow issue #124205). torch
loads triton with its compiler stack (``torch._dynamo``), which
``torch.compile`` and the constructor of every ``torch.optim`` optimizer
import. Loaded in the other order, the two live together.

So :func:`arrange` (run by ``import tfadam``) loads triton when it is
installed, TensorFlow is installed, and neither is loaded yet (~0.12 s, only
in environments that have both). When TensorFlow is loaded already and
triton is not, nothing tfadam does at import loads triton; it warns that the
next thing that does will crash (torch's: the constructor of ``tfadam.Adam``
and of every ``torch.optim`` optimizer, ``torch.compile``), and how to avoid
it: import tfadam (or ``triton``) before tensorflow. tfadam's TF1 and Keras
faces do not load triton.

Example:
    >>> from tfadam import import_order
    >>> import_order.arrange() in {"triton loaded", "triton loaded already",
    ...     "no triton", "no tensorflow", "tensorflow first"}
    True
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Literal

Outcome = Literal[
    "triton loaded", "triton loaded already", "no triton", "no tensorflow", "tensorflow first"
]

HINT = (
    "import tfadam (or triton, or torch._dynamo) before tensorflow; "
    "see tfadam's README, Troubleshooting"
)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _known_to_crash() -> bool:
    """Whether the loaded TensorFlow and the installed triton are a crashing pair."""
    from importlib import metadata

    tensorflow = sys.modules.get("tensorflow")
    try:
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return False
    tf_version = getattr(tensorflow, "__version__", "0")
    return _version(tf_version) >= (2, 20) and _version(triton_version) >= (3, 7)


def arrange() -> Outcome:
    """Load triton before TensorFlow can be; returns what was done (for tests and logs)."""
    if "triton" in sys.modules:
        return "triton loaded already"
    if not _installed("triton"):
        return "no triton"
    if "tensorflow" in sys.modules:
        if _known_to_crash():
            warnings.warn(
                "tfadam: tensorflow was imported before triton, and loading triton now "
                "crashes the process (TensorFlow's LLVM is loaded globally). torch loads it "
                "in the constructor of tfadam.Adam and of every torch.optim optimizer, and in "
                "torch.compile; tfadam.AdamOptimizer and tfadam.keras.Adam do not. "
                f"To avoid it: {HINT}.",
                RuntimeWarning,
                stacklevel=2,
            )
        return "tensorflow first"
    if not _installed("tensorflow"):
        return "no tensorflow"
    try:
        _load_triton_library()
    except Exception:  # a broken triton: torch finds it broken too, later
        return "no triton"
    return "triton loaded"


def _load_triton_library() -> None:
    """Load triton's LLVM, the part that must come before TensorFlow's.

    Only its native library (``triton/_C/libtriton.so``, ~0.12 s): ``import
    triton`` costs ~0.3 s more of Python modules tfadam does not need. When
    torch imports triton later, the library is the same file and stays loaded
    once. Where the layout differs, ``import triton``.
    """
    spec = importlib.util.find_spec("triton")
    package = Path(spec.origin).parent if spec is not None and spec.origin else None
    libraries = sorted(package.glob("_C/libtriton*.so")) if package is not None else []
    if libraries:
        ctypes.CDLL(str(libraries[0]))  # RTLD_LOCAL, as Python loads extension modules
    else:
        import triton  # noqa: F401
