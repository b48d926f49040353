"""``python -m tfadam``: dispatch, and every bad argument of every command refused up front.

Each row of ``BAD`` is one bad command line: it must exit with status 2 and
one line on stderr that names the argument (the fragment), print no
traceback, write nothing, and start no work. "No work" is checked by
replacing each command's work functions with ones that fail the test when
called; "nothing written" by the working directory staying as it was.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tfadam import bench, compare
from tfadam.cli import COMMANDS, main

# the module (tfadam.checkpoint's ``convert`` is the function of that name)
convert = importlib.import_module("tfadam.checkpoint.convert")

# (argv, fragment of the one-line error); "{file}" is a regular file in the cwd.
BAD: list[tuple[list[str], str]] = [
    # compare
    (["compare", "--steps", "-5"], "argument --steps: must be an integer >= 1, got '-5'"),
    (["compare", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["compare", "--steps", "2.5"], "argument --steps: must be an integer >= 1, got '2.5'"),
    (["compare", "--steps"], "argument --steps: expected one argument"),
    (["compare", "--every", "0"], "argument --every: must be an integer >= 1, got '0'"),
    (["compare", "--every", "-1"], "argument --every: must be an integer >= 1"),
    (["compare", "--size", "0"], "argument --size: must be an integer >= 1, got '0'"),
    (["compare", "--size", "1e3"], "argument --size: must be an integer >= 1"),
    (["compare", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    (["compare", "--lr", "-1"], "argument --lr: must be a number >= 0, finite in float32"),
    (["compare", "--lr", "nan"], "argument --lr: must be a number >= 0"),
    (["compare", "--lr", "inf"], "argument --lr: must be a number >= 0"),
    (["compare", "--lr", "1e39"], "argument --lr: must be a number >= 0, finite in float32"),
    (["compare", "--lr", "fast"], "argument --lr: must be a number >= 0"),
    (["compare", "--out", "/nonexistent/x.png"], "argument --out: directory '/nonexistent' does"),
    (["compare", "--out", "."], "argument --out: '.' is a directory"),
    (["compare", "--out", "{file}/x.png"], "argument --out: '{file}' is not a directory"),
    (["compare", "--out", ""], "argument --out: must be a file path"),
    (["compare", "--no-plot", "--out", "x.png"], "--out and --no-plot contradict"),
    (["compare", "--no-tf=yes"], "argument --no-tf: ignored explicit argument 'yes'"),
    (["compare", "--no-plot=no"], "argument --no-plot: ignored explicit argument 'no'"),
    (["compare", "--bogus"], "unrecognized arguments: --bogus"),
    (["compare", "extra"], "unrecognized arguments: extra"),
    # bench
    (["bench", "--workloads", "D9"], "argument --workloads: unknown workload(s) D9"),
    (["bench", "--workloads", "D1,x"], "unknown workload(s) X; choose from D1,D2,D3,S1,S2"),
    (["bench", "--workloads", ","], "argument --workloads: names no workload"),
    (["bench", "--workloads", ""], "argument --workloads: names no workload"),
    (["bench", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got '0'"),
    (["bench", "--repeats", "-3"], "argument --repeats: must be an integer >= 1"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be an integer >= 0, got '-1'"),
    (["bench", "--warmup", "x"], "argument --warmup: must be an integer >= 0"),
    (["bench", "--markdown", "/nonexistent/r.md"], "argument --markdown: directory '/nonexistent'"),
    (["bench", "--markdown", "."], "argument --markdown: '.' is a directory"),
    (["bench", "--markdown"], "argument --markdown: expected one argument"),
    (["bench", "--quick=1"], "argument --quick: ignored explicit argument '1'"),
    (["bench", "--no-tf=1"], "argument --no-tf: ignored explicit argument '1'"),
    (["bench", "--no-for-loop=1"], "argument --no-for-loop: ignored explicit argument"),
    (["bench", "--no-memory=1"], "argument --no-memory: ignored explicit argument"),
    (["bench", "--no-cold=1"], "argument --no-cold: ignored explicit argument"),
    (["bench", "--no-progress=1"], "argument --no-progress: ignored explicit argument"),
    (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    # convert
    (["convert"], "the following arguments are required: checkpoint"),
    (["convert", "ckpt"], "OUT is required unless --list is given"),
    (["convert", "ckpt", "out.pt", "--list"], "--list prints the tensors and writes nothing"),
    (["convert", "", "out.pt"], "argument checkpoint: must not be empty"),
    (["convert", "ckpt", "/nonexistent/o.pt"], "argument out: directory '/nonexistent' does not"),
    (["convert", "ckpt", "."], "argument out: '.' is a directory"),
    (["convert", "ckpt", "{file}/o.pt"], "argument out: '{file}' is not a directory"),
    (["convert", "ckpt", "o.pt", "--optimizer-name", " "], "argument --optimizer-name: must not"),
    (["convert", "m.ckpt", "m.ckpt.index"], "is a file of the checkpoint itself"),
    (["convert", "m.ckpt.index", "m.ckpt"], "is a file of the checkpoint itself"),
    (["convert", "m.ckpt", "m.ckpt.data-00000-of-00001"], "is a file of the checkpoint itself"),
    (["convert", "ckpt", "o.pt", "--bogus"], "unrecognized arguments: --bogus"),
    (["convert", "ckpt", "o.pt", "--no-progress=1"], "argument --no-progress: ignored explicit"),
    (["convert", "ckpt", "--list=1"], "argument --list: ignored explicit argument '1'"),
    # the dispatcher
    (["nope"], "unknown command 'nope'; choose from compare, bench, convert"),
]

FILE = "a-file"


def _no_work(name: str):
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran: the bad argument was not caught before the work")

    return called


@pytest.fixture
def guarded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cwd holding one regular file, with every command's work replaced by a tripwire."""
    (tmp_path / FILE).write_text("x")
    monkeypatch.chdir(tmp_path)
    for module, names in (
        (compare, ["run_comparison", "_import_tensorflow", "plot"]),
        (bench, ["build_contenders", "run_interleaved", "measure_memory", "measure_cold_start"]),
        (convert, ["convert", "open_checkpoint"]),
    ):
        for name in names:
            monkeypatch.setattr(module, name, _no_work(f"{module.__name__}.{name}"))
    return tmp_path


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.mark.parametrize(("argv", "fragment"), BAD, ids=[" ".join(a) or "-" for a, _ in BAD])
def test_bad_argument_is_one_line_exit_2_and_nothing_happens(
    argv: list[str], fragment: str, guarded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{file}", FILE) for a in argv]
    assert run(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert fragment.replace("{file}", FILE) in err
    assert "Traceback" not in err
    assert sorted(p.name for p in guarded.iterdir()) == [FILE]  # nothing written


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--steps", "-5"],
        ["bench", "--repeats", "0"],
        ["convert", "ckpt", "/nonexistent/o.pt"],
    ],
)
def test_bad_argument_from_the_shell(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tfadam", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"python -m tfadam {argv[0]}: error: argument ")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_directory_is_refused(
    guarded: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Permissions cannot be taken away from root, who runs CI here: ask the check
    # with os.access answering as it does for an ordinary user in a read-only directory.
    import tfadam.cli

    monkeypatch.setattr(tfadam.cli.os, "access", lambda path, mode: False)
    assert run(["compare"]) == 2  # the default ./tfadam-compare.png
    assert "the default plot path: cannot create files in '.'" in capsys.readouterr().err
    assert run(["bench", "--markdown", FILE]) == 2
    assert f"'{FILE}' exists and is not writable" in capsys.readouterr().err


def test_smallest_valid_values_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--steps", "1", "--size", "1", "--every", "1", "--lr", "0", "--seed", "0"]
    assert run([*argv, "--no-tf", "--no-plot"]) == 0
    assert "deviation from tfadam" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_usage_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2  # no command: the usage, as an error
    err = capsys.readouterr().err
    assert all(name in err for name in COMMANDS)


def test_every_command_has_a_main() -> None:
    for module, function, _ in COMMANDS.values():
        assert callable(getattr(importlib.import_module(module), function))


def test_every_option_of_every_command_has_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    """A new option needs a row in BAD (a flag: one with an explicit value)."""
    tested = {(argv[0], a.split("=")[0]) for argv, _ in BAD for a in argv[1:] if a.startswith("-")}
    for command in COMMANDS:
        assert run([command, "--help"]) == 0
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))
        missing = {o for o in options if (command, o) not in tested} - {"--help"}
        assert options and not missing, f"{command}: no bad-argument row for {sorted(missing)}"
