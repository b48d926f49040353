"""The ``compare`` demo, with and without TensorFlow."""

import subprocess
import sys

from tfadam.compare import TORCH, main, run_comparison


def test_tfadam_is_identical_to_tf_and_torch_is_not() -> None:
    rows = run_comparison(steps=20, size=5_003, progress=False)
    assert rows[0].reference == "tensorflow"
    assert all(r.deviations["tfadam"].differing == 0 for r in rows)
    assert rows[-1].deviations[TORCH].differing > 0.1


def test_main_prints_a_table_and_writes_a_png(tmp_path, capsys) -> None:
    out = tmp_path / "plot.png"
    assert main(["--steps", "5", "--size", "101", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bit-identical to TensorFlow" in text and TORCH in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_tensorflow(tmp_path) -> None:
    script = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "from tfadam.cli import main\n"
        "raise SystemExit(main(['compare', '--steps', '3', '--size', '50', '--no-plot']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "TensorFlow was not found" in done.stdout
    assert "deviation from tfadam" in done.stdout
