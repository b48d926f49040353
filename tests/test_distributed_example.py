"""``examples/distributed_train.py`` under torchrun, as the README's "Scaling out" section runs it.

An uninterrupted two-process run, and a one-process run resumed from its
mid-run DCP checkpoint, must print the same parameter fingerprint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "distributed_train.py"


def torchrun(processes: int, steps: int, checkpoints: Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # what the torchrun script runs
        "--standalone",
        f"--nproc-per-node={processes}",
        str(EXAMPLE),
        f"--steps={steps}",
        "--checkpoint-every=6",
        f"--checkpoint-dir={checkpoints}",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def fingerprint(output: str) -> str:
    found = re.search(r"^fingerprint (\w+) at step", output, re.MULTILINE)
    assert found, output
    return found.group(1)


def test_example_resumes_on_one_process_where_two_left_off(tmp_path: Path):
    uninterrupted = torchrun(2, 12, tmp_path / "two")
    resumed_dir = tmp_path / "one"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "two" / "step-000006", resumed_dir / "step-000006")
    resumed = torchrun(1, 12, resumed_dir)
    assert "resumed from" in resumed and "step-000006 on 1 process" in resumed
    assert fingerprint(resumed) == fingerprint(uninterrupted)
