"""A short, fixed-seed run of the checkpoint fuzzer (``fuzz_checkpoint.py``) in CI.

The long run (minutes, a growing corpus) is documented in docs/checkpoints.md;
this one proves the harness works and that the seeds and their first mutations
give nothing but CheckpointErrors. Each run is a subprocess: a finding makes
libFuzzer exit non-zero with the input, never take the test runner down.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "fuzz_checkpoint.py")


def test_atheris_short_run(tmp_path):
    pytest.importorskip("atheris")  # in requirements-dev.txt; Linux only
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run(
        # no RSS limit here: Linux carries ru_maxrss across exec, so libFuzzer
        # would see the test runner's own peak (the long run sets one)
        [sys.executable, FUZZ, "-runs=400", "-seed=1", "-timeout=10", "-rss_limit_mb=0"]
        + [f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = "\n".join(line for line in proc.stderr.splitlines() if "Instrumenting" not in line)
    assert proc.returncode == 0, tail[-4000:]
    assert "Done 400 runs" in tail
    assert len(os.listdir(corpus)) >= 7  # the seeds, and what coverage added
    assert not [n for n in os.listdir(tmp_path) if n.startswith(("crash-", "oom-", "timeout-"))]


def test_fallback_generator_short_run():
    proc = subprocess.run(
        [sys.executable, FUZZ, "--no-atheris", "--runs", "300", "--seed", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "300 inputs, seed 1, no finding" in proc.stdout
