"""Hostile checkpoints: only the reader's own errors, in bounded memory and time.

Every row of ``hostile_cases.CASES`` (a crafted file with valid checksums, or
a damaged one) goes through read, ``python -m tfadam convert`` and
``load_tf_checkpoint`` in a forked child of ``hostile_worker.py``, limited to
512 MiB of address space beyond the imports and 10 s per file: a blow-up
costs a child, never the test runner. ``TFADAM_HOSTILE_MEM_MIB`` and
``TFADAM_HOSTILE_TIME_S`` change the limits (e.g. to measure an old version).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hostile_cases import CASES

from tfadam.checkpoint import BundleReader
from tfadam.checkpoint.writer import write_bundle

HERE = os.path.dirname(os.path.abspath(__file__))
MEM_MIB = int(os.environ.get("TFADAM_HOSTILE_MEM_MIB", "512"))
TIME_S = float(os.environ.get("TFADAM_HOSTILE_TIME_S", "10"))
STAGES = ("read", "convert", "load")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    args = []
    for case in CASES:
        directory = root / case.name
        directory.mkdir()
        args.append(f"{case.name}={case.build(str(directory))}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"  # no thread pools in the process that forks
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "hostile_worker.py"), "--mem-mib", str(MEM_MIB)]
        + ["--time-s", str(TIME_S)]
        + args,
        capture_output=True,
        text=True,
        timeout=120 + len(args) * (TIME_S + 5),
        env=env,
        cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, dict[str, dict]] = {}
    for line in proc.stdout.splitlines():
        record = json.loads(line)
        out.setdefault(record["case"], {})[record["stage"]] = record
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_file_gives_only_checkpoint_errors(results, case):
    records = results[case.name]
    for stage in STAGES:
        assert stage in records, f"{case.name}: no record of {stage}: {records}"
        r = records[stage]
        assert r["outcome"] in ("ok", "error"), f"{case.name} {stage}: {r}"
    if case.expect is not None:
        details = [records[s]["detail"] for s in STAGES if records[s]["outcome"] == "error"]
        assert any(case.expect in d for d in details), f"{case.name}: {details}"


def test_errors_name_the_file(results):
    for case, records in results.items():
        for stage in STAGES:
            r = records[stage]
            if r["outcome"] == "error" and stage != "load":
                assert "/" in r["detail"].split(":")[0], (case, r["detail"])


# -- convert's output ------------------------------------------------------------------


def _checkpoint(tmp_path) -> str:
    import numpy as np

    prefix = str(tmp_path / "ckpt")
    write_bundle(prefix, {"w": np.arange(3, dtype=np.float32)})
    return prefix


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tfadam", "convert", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_convert_does_not_follow_a_link_planted_at_out_tmp(tmp_path):
    prefix = _checkpoint(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "model.pt"
    os.symlink(victim, str(out) + ".tmp")
    proc = _convert(prefix, str(out))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"precious"
    assert os.path.islink(str(out) + ".tmp") and not os.path.islink(out)
    import torch

    assert torch.equal(torch.load(out)["model"]["w"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["ckpt.index", "ckpt.data-00000-of-00001", "victim", "model.pt", "model.pt.tmp"]
    ), "no temporary file left behind"


def test_convert_replaces_a_link_at_out_instead_of_writing_through_it(tmp_path):
    prefix = _checkpoint(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "model.pt"
    os.symlink(victim, out)
    proc = _convert(prefix, str(out))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"precious" and not os.path.islink(out)


def test_convert_output_errors_are_one_line(tmp_path):
    # A missing folder or a folder at OUT is refused with the arguments (exit 2),
    # before anything is read or written.
    prefix = _checkpoint(tmp_path)
    before = sorted(os.listdir(tmp_path))
    proc = _convert(prefix, str(tmp_path / "no-such-dir" / "model.pt"))
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # nothing written anywhere
    (tmp_path / "model.pt").mkdir()  # OUT is a directory: nothing written beside it
    proc = _convert(prefix, str(tmp_path / "model.pt"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.parametrize(
    "state",
    [b'model_checkpoint_path: "\\377\\376"\n', b'model_checkpoint_path: "\\x"\n'],
    ids=["undecodable", "bad-escape"],
)
def test_cli_reports_a_hostile_state_file_in_one_line(tmp_path, state):
    _checkpoint(tmp_path)
    (tmp_path / "checkpoint").write_bytes(state)
    proc = _convert(str(tmp_path), str(tmp_path / "model.pt"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_state_file_with_an_undecodable_name_reaches_that_file(tmp_path):
    # a file name is bytes; the state file's escapes may name one that is not UTF-8
    name = os.fsdecode(b"ckpt-\xff")
    import numpy as np

    write_bundle(str(tmp_path / name), {"w": np.zeros(2, np.float32)})
    (tmp_path / "checkpoint").write_bytes(b'model_checkpoint_path: "ckpt-\\377"\n')
    with BundleReader(str(tmp_path)) as reader:
        assert reader.prefix == str(tmp_path / name) and reader.keys() == ["w"]
