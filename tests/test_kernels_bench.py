"""The benchmark runs end to end (tiny smoke runs: their numbers mean nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tfadam import bench
from tfadam.kernels import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="the floor needs a C compiler")

SMOKE = ["--quick", "--repeats", "1", "--warmup", "1", "--no-tf", "--no-for-loop", "--no-cold",
         "--no-progress"]  # fmt: skip


def test_bench_dense_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.md"
    assert bench.main([*SMOKE, "--workloads", "D2", "--no-memory", "--markdown", str(out)]) == 0
    text = out.read_text()
    assert "| tfadam |" in text and "torch fused" in text and "floor" in text
    assert "D2: tfadam vs torch fused" in text and "Machine:" in text
    assert text in capsys.readouterr().out


def test_bench_sparse_and_memory_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([*SMOKE, "--workloads", "S2"]) == 0
    text = capsys.readouterr().out
    assert "tfadam S2 (lazy)" in text and "S2: tfadam lazy vs torch.optim.SparseAdam" in text
    assert "| S2 | tfadam S2 (lazy) |" in text  # the memory subprocess answered


def test_bench_rejects_unknown_workload() -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--workloads", "D9", "--no-tf"])
    assert exit_.value.code == 2
