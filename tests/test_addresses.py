"""``tfadam.kernels.addresses``: one C++ call reads what ``data_ptr()`` reads, tensor by tensor.

A reused plan (tests/test_plan_reuse.py) trusts these addresses to find a
tensor moved between steps (``.data =``, ``set_()``, ``share_memory_()``), so
the C++ reader must agree with torch's own ``data_ptr()`` on every kind of
tensor it is given, refuse what it cannot read, and write nothing when it
refuses. ``cpu.pointers`` falls back to ``data_ptr()`` for a subclass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from array import array
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tfadam.kernels import addresses, cpu, native

PLAIN = (torch.Tensor, torch.nn.Parameter)


def _reader() -> addresses.Reader:
    read = addresses.reader(wait=True)
    if read is None:  # only where nothing can build it (checked below)
        pytest.skip(addresses.status())
    return read


def test_the_reader_builds_where_a_compiler_and_headers_are() -> None:
    buildable = (
        addresses.compiler() is not None
        and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
        and shutil.which("ld") is not None
    )
    read = addresses.reader(wait=True)
    assert (read is not None) == buildable, addresses.status()
    if read is not None:
        assert addresses.status().startswith("C++"), addresses.status()


def _base() -> torch.Tensor:
    return torch.arange(24.0).reshape(4, 6)


CASES: dict[str, Callable[[], torch.Tensor]] = {
    "contiguous": _base,
    "a row (offset)": lambda: _base()[2],
    "a column (strided)": lambda: _base()[:, 3],
    "transposed": lambda: _base().t(),
    "0-d": lambda: torch.tensor(1.5),
    "empty": lambda: torch.zeros(0),
    "empty with zero strides": lambda: torch.from_numpy(__import__("numpy").zeros((0, 3))),
    "float16": lambda: torch.zeros(5, dtype=torch.float16),
    "bfloat16 view with offset": lambda: torch.zeros(9, dtype=torch.bfloat16)[3:],
    "float64": lambda: torch.zeros(5, dtype=torch.float64),
    "int8": lambda: torch.zeros(5, dtype=torch.int8),
    "a Parameter": lambda: torch.nn.Parameter(torch.ones(3)),
    "requires grad": lambda: torch.ones(3, requires_grad=True),
    "shared memory": lambda: torch.ones(3).share_memory_(),
    "a dtype view": lambda: torch.ones(4).view(torch.int32)[1:],
    "negative bit": lambda: torch._neg_view(torch.ones(3)),
    "expanded": lambda: torch.ones(1).expand(5),
}


def test_the_reader_agrees_with_data_ptr_on_every_kind_of_tensor() -> None:
    read = _reader()
    tensors = [make() for make in CASES.values()]
    out = array("Q", [0]) * len(tensors)
    assert read(tensors, out, PLAIN) is None
    for name, tensor, address in zip(CASES, tensors, out, strict=True):
        assert address == tensor.data_ptr(), name


def test_the_reader_sees_a_tensor_moved_in_place() -> None:
    read = _reader()
    t = torch.ones(1000)
    out = array("Q", [0])
    moves = [
        lambda: setattr(t, "data", t.data.clone()),
        lambda: t.set_(torch.ones(1000)),
        lambda: t.resize_(10**6),
        lambda: t.share_memory_(),  # (last: torch 2.13 segfaults resizing shared memory)
    ]
    for move in moves:
        before = t.data_ptr()
        move()
        read([t], out, PLAIN)
        assert out[0] == t.data_ptr() != before


class _Sub(torch.Tensor):
    pass


REFUSED: dict[str, tuple[list[object], type[Exception]]] = {
    "a subclass": ([torch.ones(2), torch.ones(2).as_subclass(_Sub)], TypeError),
    "None": ([torch.ones(2), None], TypeError),
    "a NumPy array": ([torch.ones(2).numpy()], TypeError),
    "sparse (no storage)": ([torch.ones(2), torch.ones(2).to_sparse()], RuntimeError),
    "meta (no data)": ([torch.ones(2), torch.ones(2, device="meta")], RuntimeError),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_the_reader_refuses_what_it_cannot_read_and_writes_nothing(case: str) -> None:
    read = _reader()
    tensors, error = REFUSED[case]
    out = array("Q", [7]) * len(tensors)
    try:
        read(tensors, out, PLAIN)
    except error:
        pass
    else:
        # meta tensors have a (null) data pointer in some torch releases
        assert case == "meta (no data)" and list(out) == [tensors[0].data_ptr(), 0]
        return
    assert list(out) == [7] * len(tensors)


def test_the_reader_refuses_an_output_of_the_wrong_size() -> None:
    read = _reader()
    out = array("Q", [7, 7, 7])
    with pytest.raises(ValueError, match="wrong size"):
        read([torch.ones(2), torch.ones(2)], out, PLAIN)
    assert list(out) == [7, 7, 7]
    with pytest.raises(TypeError):
        read([torch.ones(2)], b"\0" * 8, PLAIN)  # read-only


@pytest.mark.parametrize("path", ["C++", "Python"])
def test_pointers_are_data_ptr_on_either_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "C++":
        _reader()
    else:
        monkeypatch.setattr(addresses, "reader", lambda **kwargs: None)
    tensors = [make() for make in CASES.values()]
    tensors.append(torch.ones(3).as_subclass(_Sub))  # the C++ reader refuses it: data_ptr()
    assert list(cpu.pointers(tensors)) == [t.data_ptr() for t in tensors]


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The build's state forgotten, a cache directory of its own; restored afterwards."""
    monkeypatch.setenv("TFADAM_CACHE_DIR", str(tmp_path / "cache"))
    addresses.reset()
    yield monkeypatch
    monkeypatch.undo()
    addresses.reset()


def _no_build_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("*")) if cache.exists() else []


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        ({"TFADAM_ADDRESSES": "python"}, "python (TFADAM_ADDRESSES=python)"),
        ({"TFADAM_CXX": "/no/such/compiler"}, "python (no C++ compiler: set TFADAM_CXX or CXX)"),
        ({"TFADAM_ADDRESSES": "fast"}, "python (TFADAM_ADDRESSES='fast' is none of auto, python)"),
    ],
    ids=["switched off", "no compiler", "a mode that is none"],
)
def test_where_it_is_not_built_pointers_come_from_data_ptr(
    fresh_build: pytest.MonkeyPatch, tmp_path: Path, setting: dict[str, str], said: str
) -> None:
    for name, value in setting.items():
        fresh_build.setenv(name, value)
    assert addresses.reader(wait=True) is None
    assert addresses.status() == said
    assert _no_build_files(tmp_path / "cache") == []
    t = torch.ones(3)
    assert list(cpu.pointers([t, t[1:]])) == [t.data_ptr(), t.data_ptr() + 4]


def test_a_failed_build_is_recorded_and_not_retried(
    fresh_build: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    failing = shutil.which("false")
    assert failing is not None
    fresh_build.setenv("TFADAM_CXX", failing)  # a "compiler" that always fails
    assert addresses.reader(wait=True) is None
    assert addresses.status().startswith("python (the build failed: exit status 1")
    (failed,) = (tmp_path / "cache").glob("*.failed")
    assert _no_build_files(tmp_path / "cache") == [failed.name]  # no marker, no half-built file
    addresses.reset()  # as a later process: it says why, and builds nothing
    assert addresses.reader(wait=True) is None
    assert "delete it to try again" in addresses.status(), addresses.status()
    assert _no_build_files(tmp_path / "cache") == [failed.name]


@pytest.mark.slow
def test_the_build_outlives_the_process_that_started_it(tmp_path: Path) -> None:
    import time

    if addresses.compiler() is None:
        pytest.skip("no C++ compiler here: nothing to build")
    env = dict(os.environ, TFADAM_CACHE_DIR=str(tmp_path))
    env.pop("TFADAM_ADDRESSES", None)
    starts = "from tfadam.kernels import addresses; addresses.reader(); print(addresses.status())"
    started = subprocess.run(
        [sys.executable, "-c", starts], env=env, capture_output=True, text=True
    )
    assert started.stdout.startswith("building "), started.stdout + started.stderr
    deadline = time.monotonic() + 300
    while list(tmp_path.glob("*.building")) and time.monotonic() < deadline:
        time.sleep(0.5)
    (module,) = tmp_path.glob("tfadam_addresses_*")  # the module alone: no marker, no leftovers
    assert not module.name.endswith((".building", ".failed", ".tmp")), module.name
    loads = "from tfadam.kernels import addresses; addresses.reader(); print(addresses.status())"
    later = subprocess.run([sys.executable, "-c", loads], env=env, capture_output=True, text=True)
    assert later.stdout.strip() == f"C++ ({module})", later.stdout + later.stderr


def _built_libraries() -> list[Path]:
    """The reader's and the C kernels' run-time builds, where this machine made them."""
    _reader()
    found = [Path(addresses.status().removeprefix("C++ (").removesuffix(")"))]
    native.library()
    if native.selection().source == "compiled":
        found.append(Path(native.selection().path))
    return found


@pytest.mark.parametrize("cut", [1, 4096, 50_000], ids=lambda n: f"{n} bytes cut")
def test_a_truncated_cached_library_is_not_whole(cut: int, tmp_path: Path) -> None:
    # (loading one killed the process with SIGBUS, each run, until the cache was cleared)
    for built in _built_libraries():
        data = built.read_bytes()
        (tmp_path / "whole.so").write_bytes(data)
        (tmp_path / "cut.so").write_bytes(data[:-cut])
        assert native.whole(tmp_path / "whole.so"), built
        assert not native.whole(tmp_path / "cut.so"), built


_CHILD = """
import torch, tfadam
from tfadam.kernels import addresses
print(addresses.reader() is None and addresses.status())
p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
opt = tfadam.Adam([p], lr=0.01)
for step in range(4):
    p.grad = torch.full((5,), 0.25 * step)
    opt.step()
print(addresses.status())
"""


def _child(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_cache_directory_that_cannot_be_searched_leaves_the_python_path(
    tmp_path: Path,
) -> None:
    # (Path.exists raises for ENAMETOOLONG and EACCES: every step raised OSError)
    done = _child({"TFADAM_CACHE_DIR": str(tmp_path / ("x" * 300)), "TFADAM_KERNELS": "reference"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("python (the cache directory"), done.stdout


def test_a_truncated_cached_reader_is_rebuilt_not_loaded(tmp_path: Path) -> None:
    built = _built_libraries()[0]
    env = {"TFADAM_CACHE_DIR": str(tmp_path), "TFADAM_CXX": shutil.which("false") or "false"}
    first = _child(env)  # (its compiler fails: it names the file it would have built)
    target = Path(first.stdout.splitlines()[0].removeprefix("building "))
    assert target.parent == tmp_path, first.stdout
    target.write_bytes(built.read_bytes()[:50_000])
    done = _child(env)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "python (the build failed" in done.stdout, done.stdout


def test_records_agree_with_data_ptr_and_refuse_what_they_cannot_read() -> None:
    record = addresses.recorder(wait=True)
    if record is None:
        pytest.skip(addresses.status())
    tensors = [make() for make in CASES.values()]
    out = array("Q", [0]) * len(tensors)
    recorded = record(tensors, out, PLAIN)
    assert isinstance(recorded, bytes)
    assert list(out) == [t.data_ptr() for t in tensors]
    assert record([t.clone() for t in tensors[:1]], array("Q", [0]), PLAIN) == record(
        tensors[:1], array("Q", [0]), PLAIN
    )  # the same layout elsewhere: the same record
    unreadable = {
        "a subclass": torch.ones(2).as_subclass(_Sub),
        "sparse": torch.ones(2).to_sparse(),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "None": None,
    }
    for name, bad in unreadable.items():
        out = array("Q", [7, 7])
        assert record([torch.ones(2), bad], out, PLAIN) is None, name
        assert list(out) == [7, 7], name
    with pytest.raises(ValueError, match="wrong size"):
        record([torch.ones(2)], array("Q", [0, 0]), PLAIN)


def test_records_refuse_types_that_are_not_tensor_types() -> None:
    # (it prefetches a tensor's metadata some items ahead on its type alone:
    # an int or object there was unpacked as a tensor, and the process crashed)
    code = """if True:
        from array import array
        import torch
        from tfadam.kernels import addresses
        record = addresses.recorder(wait=True)
        if record is None:
            print("not built")
            raise SystemExit
        for items, types in (([10**30 + i for i in range(40)], (int,)),
                             ([object() for _ in range(40)], (object,)),
                             ([torch.ones(1)] * 40, (torch.Tensor, "torch.Tensor"))):
            try:
                record(items, array("Q", [7]) * 40, types)
            except TypeError as error:
                print(error)
        print(record([torch.ones(1)] * 40, array("Q", [7]) * 40, (torch.Tensor,)) is not None)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if done.stdout.strip() == "not built":
        pytest.skip(addresses.status())
    assert done.returncode == 0, done.stderr[-2000:]
    refused = "records: `types` must hold tensor types only"
    assert done.stdout.splitlines() == [refused] * 3 + ["True"], done.stdout
