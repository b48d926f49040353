"""Crash safety: atomic checksummed checkpoints, SIGKILL mid-save and mid-step.

The end-to-end test trains in a subprocess (``reliab_crash_worker.py``), kills
it with SIGKILL in the middle of writing a checkpoint and in the middle of an
optimizer step, tears the newest checkpoint on disk, restarts it each time,
and requires the final model and optimizer to be bit-identical to an
uninterrupted run. The in-process tests cover the file format: every torn or
altered file is refused and refusing changes nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from reliab_support import bits, differences, tf1_face_tensors, torch_face_tensors

import tfadam
from tfadam import CorruptCheckpointError, StateDictError

WORKER = Path(__file__).with_name("reliab_crash_worker.py")
STEPS, EVERY = 24, 4

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and directory fsync")


# -- end to end: kill, restart, compare ----------------------------------------------------------


def run_worker(directory: Path, *options: str, kill_on: str | None = None) -> list[str]:
    """Run the worker; with ``kill_on``, SIGKILL it when it prints that event. Its lines."""
    env = dict(os.environ)
    source = str(Path(tfadam.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    command = [sys.executable, str(WORKER), str(directory), str(STEPS), str(EVERY), *options]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    watchdog = threading.Timer(180, process.kill)  # a hung worker fails the test, not CI
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.strip())
            if kill_on is not None and line.startswith(kill_on):
                os.kill(process.pid, signal.SIGKILL)
                break
        process.wait()
    finally:
        watchdog.cancel()
    stderr = process.stderr.read() if process.stderr else ""
    if kill_on is None:
        assert process.returncode == 0, stderr
    else:
        assert process.returncode == -signal.SIGKILL, (lines, stderr)
    return lines


def checkpoint_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_sigkill_in_save_and_in_step_then_resume_is_bitwise_equal(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    reference.mkdir()
    crashed.mkdir()
    assert run_worker(reference)[-1] == "DONE"

    # 1. Killed while writing checkpoint 8: half of its bytes are in the temporary file.
    lines = run_worker(crashed, "--stall-in-save", "8", kill_on="STALLED-IN-SAVE")
    assert lines == ["SAVED 4", "STALLED-IN-SAVE 8"]
    names = checkpoint_names(crashed)
    torn = [n for n in names if n.startswith(".ckpt-000008.tfadam.") and n.endswith(".tmp")]
    assert len(torn) == 1 and names == sorted(["ckpt-000004.tfadam", *torn])
    assert (crashed / torn[0]).stat().st_size > 52  # torn after the header, mid-payload
    with pytest.raises(CorruptCheckpointError):  # the torn temporary would be refused too
        tfadam.read_checkpoint(crashed / torn[0])

    # 2. Restarted, it resumes from 4; killed in step 14 with one param group updated.
    lines = run_worker(crashed, "--stall-in-step", "14", kill_on="STALLED-IN-STEP")
    assert lines == ["RESUMED 4", "SAVED 8", "SAVED 12", "STALLED-IN-STEP 14"]
    # The dead saver's temporary was removed by the next save.
    assert checkpoint_names(crashed) == [f"ckpt-{k:06d}.tfadam" for k in (4, 8, 12)]

    # 3. The newest checkpoint is torn on disk (as a crash on a file system
    # without ordered writes can leave it): it must be skipped, never loaded.
    newest = crashed / "ckpt-000012.tfadam"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    lines = run_worker(crashed)
    assert lines[:2] == ["SKIPPED ckpt-000012.tfadam", "RESUMED 8"]
    assert lines[-1] == "DONE"

    final, expected = (tfadam.read_checkpoint(d / "final.tfadam") for d in (crashed, reference))
    assert bits(final) == bits(expected)
    assert final["optimizer"]["param_groups"][1]["beta1_power"] is not None


# -- the file format, in process -----------------------------------------------------------------


def trained(seed: int = 0, steps: int = 3) -> tuple[torch.nn.Module, tfadam.Adam]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = tfadam.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        opt.zero_grad()
        model(
            torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
        ).square().sum().backward()
        opt.step()
    return model, opt


def everything(model: torch.nn.Module, opt: tfadam.Adam) -> dict[str, object]:
    """Model and optimizer state, bitwise (the per-object call counter left out)."""
    state = {k: v for k, v in torch_face_tensors(opt).items() if k != "_calls"}
    return state | {f"model.{k}": bits(v) for k, v in model.state_dict().items()}


def test_round_trip_is_bitwise(tmp_path):
    model, opt = trained()
    path = tmp_path / "run.ckpt"
    rng = torch.get_rng_state()
    tfadam.save_checkpoint(path, model=model, optimizer=opt, step=3, rng=rng)
    twin, twin_opt = trained(seed=1, steps=1)
    extra = tfadam.load_checkpoint(path, model=twin, optimizer=twin_opt)
    assert extra["step"] == 3 and torch.equal(extra["rng"], rng)
    for source in (model, twin):
        source.zero_grad()
    assert differences(everything(model, opt), everything(twin, twin_opt)) == []
    # ...and it goes on identically.
    for m, o in ((model, opt), (twin, twin_opt)):
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    assert differences(everything(model, opt), everything(twin, twin_opt)) == []


def damaged_versions(data: bytes) -> dict[str, bytes]:
    header = 52
    versions = {f"truncated to {n}": data[:n] for n in (0, 7, header - 1, header, header + 1,
                                                        len(data) // 2, len(data) - 1)}  # fmt: skip
    versions["one byte appended"] = data + b"\0"
    for name, position in [("magic", 0), ("version", 8), ("length", 12), ("digest", 20),
                           ("payload start", header), ("payload middle", (header + len(data)) // 2),
                           ("last byte", len(data) - 1)]:  # fmt: skip
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        versions[f"bit flipped in {name}"] = bytes(flipped)
    return versions


def test_damaged_checkpoints_are_refused_and_change_nothing(tmp_path):
    model, opt = trained()
    good = tmp_path / "good.ckpt"
    tfadam.save_checkpoint(good, model=model, optimizer=opt, step=3)
    target_model, target_opt = trained(seed=5, steps=2)
    before = everything(target_model, target_opt)
    versions = damaged_versions(good.read_bytes())
    assert len(versions) >= 15
    for name, data in versions.items():
        path = tmp_path / "damaged.ckpt"
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpointError) as raised:
            tfadam.load_checkpoint(path, model=target_model, optimizer=target_opt)
        assert str(path) in str(raised.value), name
        assert differences(before, everything(target_model, target_opt)) == [], name


def test_a_torch_save_file_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CorruptCheckpointError, match="not a tfadam checkpoint.*torch.load"):
        tfadam.read_checkpoint(path)


@pytest.mark.parametrize("mismatch", ["model shape", "model keys", "optimizer"])
def test_a_mismatched_checkpoint_changes_nothing(tmp_path, mismatch):
    model, opt = trained()
    path = tmp_path / "run.ckpt"
    if mismatch == "model shape":
        other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        tfadam.save_checkpoint(path, model=other, optimizer=tfadam.Adam(other.parameters()))
        pattern = r"model entry '2.bias' has shape \(3,\) in the checkpoint but \(2,\)"
    elif mismatch == "model keys":
        other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
        tfadam.save_checkpoint(path, model=other, optimizer=opt)
        pattern = r"missing keys \['2.bias', '2.weight'\]"
    else:
        state = opt.state_dict()
        state["state"][0]["m"] = torch.zeros(3)
        tfadam.save_checkpoint(path, model=model, optimizer=_Fixed(state))
        pattern = r"slot 'm' of param_groups\[0\]\['params'\]\[0\] has shape \(3,\)"
    target_model, target_opt = trained(seed=5, steps=2)
    before = everything(target_model, target_opt)
    with pytest.raises(StateDictError, match=pattern):
        tfadam.load_checkpoint(path, model=target_model, optimizer=target_opt)
    assert differences(before, everything(target_model, target_opt)) == []


class _Fixed:
    """An 'optimizer' whose state_dict is given: to save a deliberately bad state."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def test_a_failing_save_leaves_the_previous_checkpoint_and_no_temporary(tmp_path):
    model, opt = trained()
    path = tmp_path / "run.ckpt"
    tfadam.save_checkpoint(path, model=model, optimizer=opt, step=1)
    previous = path.read_bytes()
    with pytest.raises(Exception, match="pickle|lambda"):
        tfadam.save_checkpoint(path, model=model, optimizer=opt, hook=lambda: None)
    (tmp_path / "a-directory").mkdir()
    with pytest.raises(IsADirectoryError):
        tfadam.save_checkpoint(tmp_path / "a-directory", step=2)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-directory", "run.ckpt"]


def test_stale_temporaries_of_dead_savers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".run.ckpt.{dead.stdout.strip()}.0123abcd.tmp"
    alive = tmp_path / f".run.ckpt.{os.getppid()}.0123abcd.tmp"  # a running process's
    other = tmp_path / f".other.ckpt.{dead.stdout.strip()}.0123abcd.tmp"
    for p in (stale, alive, other):
        p.write_bytes(b"torn")
    tfadam.save_checkpoint(tmp_path / "run.ckpt", step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, other.name, "run.ckpt"]
    )


def test_tf1_face_round_trip(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        return model, tfadam.AdamOptimizer(0.1)

    model, opt = build(0)
    for step in range(3):
        loss = model(torch.full((4, 3), float(step))).square().sum()
        opt.minimize(loss, var_list=list(model.parameters()))
    path = tmp_path / "tf1.ckpt"
    tfadam.save_checkpoint(path, model=model, optimizer=opt)
    twin, twin_opt = build(1)
    tfadam.load_checkpoint(path, model=twin, optimizer=twin_opt)

    def state(m, o):
        return tf1_face_tensors(o, {"w": m.weight, "b": m.bias}) | {"_applied": None}

    assert differences(state(model, opt), state(twin, twin_opt)) == []
    with pytest.raises(TypeError, match="pass model="):
        tfadam.save_checkpoint(path, optimizer=opt)
