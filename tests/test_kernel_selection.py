"""Which C kernels run (prebuilt, compiled at run time, reference), and the warning without any.

``TFADAM_KERNELS`` chooses; ``TFADAM_CC`` pointing nowhere hides the C
compiler (``native.compiler()`` takes it as the only candidate).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tfadam
from tfadam import kernels
from tfadam.kernels import native

LEVELS = [level for level in native.cpu_levels() if native.prebuilt_path(level).exists()]
HAS_COMPILER = native.compiler() is not None
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("TFADAM_KERNELS", raising=False)
    native.reset()
    yield monkeypatch
    monkeypatch.undo()
    native.reset()


def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TFADAM_CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TFADAM_CACHE_DIR", str(tmp_path / "cache"))


# (TFADAM_KERNELS, whether this machine can give it, what which() must say)
SELECTIONS = [
    ("reference", True, r"^reference \(TFADAM_KERNELS=reference\)$"),
    ("compiled", HAS_COMPILER, r"^compiled \(-march=native, .*\): .*tfadam_cpu_\w+\.so$"),
    *(
        (f"prebuilt:{level}", True, rf"^prebuilt \({level}, own thread pool\): .*prebuilt/.*\.so$")
        for level in LEVELS
    ),
    ("prebuilt:x86-64-v9", True, r"^reference \(prebuilt kernels: no such level 'x86-64-v9'"),
    ("fast", True, r"^reference \(TFADAM_KERNELS='fast' is none of auto, prebuilt, "),
]


@pytest.mark.parametrize(("mode", "possible", "said"), SELECTIONS, ids=[s[0] for s in SELECTIONS])
def test_which_says_what_runs(
    fresh_selection: pytest.MonkeyPatch, mode: str, possible: bool, said: str
) -> None:
    if not possible:
        pytest.skip(f"{mode}: no C compiler here")
    fresh_selection.setenv("TFADAM_KERNELS", mode)
    assert re.search(said, kernels.which()), kernels.which()
    assert (native.library() is None) == kernels.which().startswith("reference")


@pytest.mark.skipif(not LEVELS, reason="no prebuilt kernels installed for this CPU")
def test_without_a_compiler_the_best_prebuilt_level_runs(
    fresh_selection: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_compiler(fresh_selection, tmp_path)
    assert native.compiler() is None
    assert kernels.which().startswith(f"prebuilt ({LEVELS[0]}, ")
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast kernels: no warning
        tfadam.Adam([w], lr=0.1).step()


def test_auto_order(fresh_selection: pytest.MonkeyPatch) -> None:
    # the run-time build where a compiler works (-march=native, torch's threads), else prebuilt
    expected = "compiled" if HAS_COMPILER else "prebuilt" if LEVELS else "reference"
    assert native.selection().source == expected


def reference_slowdowns() -> dict[str, str]:
    """The "x slower" figures of RESULTS.md's section the warning quotes, by workload."""
    text = RESULTS.read_text()
    section = text[text.index("## Without the C kernels") :]
    rows = re.findall(r"^\| (D1|D2|D3|S1|S2) \|.*\| \*\*([\d.]+)x\*\* \|$", section, re.M)
    return dict(rows)


def dense(count: int, size: int, dtype: torch.dtype) -> tfadam.Adam:
    params = [torch.nn.Parameter(torch.ones(size, dtype=dtype)) for _ in range(count)]
    for p in params:
        p.grad = torch.ones(size, dtype=dtype)
    return tfadam.Adam(params, lr=0.1, betas=(0.9, 0.99))  # (0.999 is 1.0 in bfloat16)


def sparse(mode: str) -> tfadam.Adam:
    p = torch.nn.Parameter(torch.ones(50, 4))
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 4), (50, 4))
    return tfadam.Adam([p], lr=0.1, sparse=mode)  # type: ignore[arg-type]


# (workload the warning must quote, an optimizer whose step looks like it)
WORKLOADS = [
    ("D1", lambda: dense(2, 70_000, torch.float32)),
    ("D2", lambda: dense(5, 100, torch.float32)),
    ("D3", lambda: dense(2, 100, torch.bfloat16)),
    ("S1", lambda: sparse("dense")),
    ("S2", lambda: sparse("lazy")),
]


@pytest.mark.parametrize(("workload", "make"), WORKLOADS, ids=[w[0] for w in WORKLOADS])
def test_without_c_kernels_the_first_step_warns_once_with_the_measured_cost(
    fresh_selection: pytest.MonkeyPatch, tmp_path: Path, workload: str, make: object
) -> None:
    no_compiler(fresh_selection, tmp_path)
    fresh_selection.setenv("TFADAM_KERNELS", "compiled")  # no prebuilt kernels either
    opt = make()  # type: ignore[operator]
    with pytest.warns(RuntimeWarning, match="no C kernels here") as caught:
        opt.step()
    (ours,) = [w for w in caught if "no C kernels here" in str(w.message)]
    message = str(ours.message)
    description, slowdown = kernels.REFERENCE_SLOWDOWN[workload]
    assert f"measured {slowdown:.0f}x slower on {description}" in message
    assert f"{slowdown:.0f}" == f"{float(reference_slowdowns()[workload]):.0f}"
    assert "no C compiler found" in message and "pip" in message and "TFADAM_CC" in message
    assert ours.filename == __file__  # the user's line, not tfadam's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once


def test_reference_by_choice_does_not_warn(fresh_selection: pytest.MonkeyPatch) -> None:
    fresh_selection.setenv("TFADAM_KERNELS", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense(2, 100, torch.float32).step()
