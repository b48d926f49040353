"""``pip wheel .`` gives a wheel whose kernels run where no C compiler is.

The wheel is built as a user would (``pip wheel``, build isolation), then
installed with ``--no-deps`` into a fresh virtual environment that borrows
torch and numpy from this one (a ``.pth`` line: not this environment's
tfadam, whose editable install is a ``.pth`` of its own that a plain path
entry does not run). That environment runs with ``PATH`` holding no C
compiler and ``CC``/``TFADAM_CC`` unset; ``python -m tfadam.kernels`` must
name the prebuilt kernels of this CPU's best level, loaded from the wheel,
and a step of each dtype must give the reference's bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from tfadam.kernels import native

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not native.PREBUILT_PLATFORM or native.compiler() is None,
        reason="prebuilt kernels are built on x86-64 Linux with a C compiler only",
    ),
]

CHECK = """
import torch
from kernel_cases import DTYPES, assert_same_bits, random_tensor
from tfadam import kernels, rule
from tfadam.kernels import native, reference

assert native.compiler() is None, native.compiler()
print(kernels.which())
generator = torch.Generator().manual_seed(3)
for dtype in DTYPES:
    shapes = [(1001,), (3, 67), (70_001,)]
    state = [
        [random_tensor(s, dtype, generator, special_fraction=0.02) for s in shapes],
        [random_tensor(s, dtype, generator) for s in shapes],
        [random_tensor(s, dtype, generator, low=-8, high=1) for s in shapes],
        [random_tensor(s, dtype, generator, low=-12, high=2, positive=True) for s in shapes],
    ]
    copy = [[t.clone() for t in group] for group in state]
    c = rule.tf1_coefficients(lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8,
                              beta1_power=0.9, beta2_power=0.999, dtype=dtype)
    kernels.dense_step(*state, None, c)
    reference.dense_step(*copy, None, c, nesterov=False)
    for group, expected in zip(state, copy):
        for a, e in zip(group, expected):
            assert_same_bits(a, e, str(dtype))
print("same bits")
"""


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, (
        f"{' '.join(command)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )
    return done


def test_wheel_runs_prebuilt_kernels_without_a_compiler(tmp_path: Path) -> None:
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)])
    (wheel,) = tmp_path.glob("tfadam-*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for level in native.PREBUILT_LEVELS:
        assert f"tfadam/kernels/prebuilt/{native.prebuilt_path(level).name}" in names, names
    assert "tfadam/kernels/cpu_adam.c" in names  # the run-time build's source, kept
    assert "tfadam/kernels/addresses.cpp" in names  # built against the installed torch

    fresh = tmp_path / "fresh"
    run([sys.executable, "-m", "venv", str(fresh)])
    python = fresh / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    Path(purelib, "borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    bare = tmp_path / "bin"  # PATH: nothing but the fresh environment's python
    bare.mkdir()
    (bare / "python").symlink_to(python)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("CC", "TFADAM_CC", "TFADAM_KERNELS", "PYTHONPATH")
    }
    env.update(
        PATH=str(bare),
        TFADAM_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONPATH=str(ROOT / "tests"),  # kernel_cases only
    )
    query = run([str(python), "-m", "tfadam.kernels"], env=env, cwd=tmp_path).stdout
    print(f"{wheel.name}, installed without a C compiler on PATH:\n{query}")  # (pytest -s)
    best = native.cpu_levels()[0]
    assert f"tfadam CPU kernels: prebuilt ({best}, own thread pool): {purelib}/tfadam/" in query
    checked = run([str(python), "-c", textwrap.dedent(CHECK)], env=env, cwd=tmp_path).stdout
    assert checked.splitlines()[0].startswith(f"prebuilt ({best}, ") and "same bits" in checked
