"""Build hook: the C kernels, prebuilt at install time (metadata is in pyproject.toml).

``pip install .`` and ``pip wheel .`` compile ``src/tfadam/kernels/cpu_adam.c``
once per x86-64 level (``native.PREBUILT_LEVELS``) into
``tfadam/kernels/prebuilt/``: plain shared libraries that tfadam loads with
ctypes, no Python headers, so the wheel is one per platform for every Python 3
(``py3-none-linux_x86_64``). A machine without a C compiler runs the best
level its CPU has; one with a compiler builds its own on first use, as before
(``-march=native`` and torch's OpenMP threads, which no wheel can know).

The flags, the compile and the loader's self-tests are those of the run-time
build: ``native.py`` is loaded here by path (it imports only the standard
library at its top; torch need not be importable in the build environment).
What the build cannot do is link torch's OpenMP runtime, which it does not
know; the prebuilt kernels use their own thread pool.

A failed level (an old compiler without ``-march=x86-64-v4``, say) is
skipped with a warning; no C compiler, or a platform other than x86-64
Linux, installs the package without prebuilt kernels (the run-time build
and the reference kernels remain).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

HERE = Path(__file__).resolve().parent


def _native():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "tfadam_native_at_build", HERE / "src" / "tfadam" / "kernels" / "native.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


native = _native()


class BuildKernels(build_ext):
    """Compiles each level's kernels with native.py's flags (not a Python extension module)."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"

    def copy_extensions_to_source(self) -> None:  # editable installs: into src/
        (HERE / "src" / "tfadam" / "kernels" / "prebuilt").mkdir(exist_ok=True)
        super().copy_extensions_to_source()

    def build_extension(self, ext: Extension) -> None:
        level = LEVELS[ext.name]
        target = Path(self.get_ext_fullpath(ext.name))
        cc = native.compiler()
        error = native.build_prebuilt_level(level, target, cc) if cc else "no C compiler found"
        if error is not None:
            raise CompileError(f"tfadam's C kernels for {level}: {error}")


# tfadam.kernels.prebuilt.tfadam_cpu_x86_64_v4 -> x86-64-v4, ...
LEVELS = {
    f"tfadam.kernels.prebuilt.{native.prebuilt_path(level).stem}": level
    for level in native.PREBUILT_LEVELS
}


def prebuilt_extensions() -> list[Extension]:
    if not native.PREBUILT_PLATFORM:
        return []
    # optional: a level that fails to build is skipped, with a warning
    source = ["src/tfadam/kernels/cpu_adam.c"]
    return [Extension(name, sources=source, optional=True) for name in LEVELS]


commands: dict[str, type] = {"build_ext": BuildKernels}
try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

if bdist_wheel is not None:

    class PlatformWheel(bdist_wheel):  # type: ignore[misc, valid-type]
        """The kernels use no Python ABI: one wheel per platform, any Python 3."""

        def get_tag(self) -> tuple[str, str, str]:
            _, _, platform = super().get_tag()
            return "py3", "none", platform

    commands["bdist_wheel"] = PlatformWheel

setup(ext_modules=prebuilt_extensions(), cmdclass=commands)
