"""``convert``: a TF checkpoint to a torch.save file, model and optimizer state included."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_tf import keras_run, tf1_session_run, tf2_eager_run, tf_values

from tfadam.checkpoint import cli_convert, convert


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cv")
    return {
        "tf1": tf1_session_run(str(d / "tf1")).prefix,
        "tf2": tf2_eager_run(str(d / "tf2")).prefix,
        "keras": keras_run(str(d / "keras")),
    }


def test_tf1_checkpoint_converts_completely(runs, tmp_path, capsys):
    out = tmp_path / "model.pt"
    assert cli_convert([runs["tf1"], str(out), "--no-progress"]) == 0
    listing = capsys.readouterr().out
    state = torch.load(out)  # weights_only=True: plain tensors and containers only
    expected = tf_values(runs["tf1"])
    assert state["format"] == "tfadam.convert/1" and state["naming"] == "tf1"
    assert sorted(state["model"]) == ["dense/bias", "dense/kernel", "emb", "frozen", "part"]
    for name, tensor in state["model"].items():
        assert bits(tensor) == np.asarray(expected[name]).tobytes(), name
        if name == "frozen":  # never updated in TF: no slots
            assert name not in state["optimizer"]["slots"]
            continue
        slots = state["optimizer"]["slots"][name]
        assert bits(slots["m"]) == expected[name + "/Adam"].tobytes()
        assert bits(slots["v"]) == expected[name + "/Adam_1"].tobytes()
    variables = state["optimizer"]["variables"]
    assert bits(variables["beta1_power"]) == np.asarray(expected["beta1_power"]).tobytes()
    assert state["optimizer"]["flavour"] == "tf1" and state["unmapped"] == {}
    assert "dense/kernel  [7, 5]  + Adam m, v" in listing and "optimizer (tf1)" in listing


def test_tf2_and_keras_checkpoints_list_what_is_unmapped(runs, tmp_path, capsys):
    assert cli_convert([runs["tf2"], str(tmp_path / "a.pt"), "--no-progress"]) == 0
    listing = capsys.readouterr().out
    state = torch.load(tmp_path / "a.pt")
    assert state["naming"] == "tf2" and sorted(state["model"]) == [
        "dense/bias",
        "dense/kernel",
        "emb",
    ]
    assert state["keys"]["emb"] == "model/emb/.ATTRIBUTES/VARIABLE_VALUE"
    assert set(state["unmapped"]) == {
        "_CHECKPOINTABLE_OBJECT_GRAPH",
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
    }
    assert "unmapped: 2" in listing and "save_counter" in listing

    assert cli_convert([runs["keras"], str(tmp_path / "k.pt"), "--no-progress"]) == 0
    state = torch.load(tmp_path / "k.pt")
    expected = tf_values(runs["keras"])
    assert state["optimizer"]["flavour"] == "keras"
    assert set(state["optimizer"]["variables"]) == {"iterations", "learning_rate"}
    kernel = state["model"]["mlp/hidden/kernel"]
    key = state["keys"]["mlp/hidden/kernel"]
    assert bits(kernel) == expected[key].tobytes()
    assert set(state["optimizer"]["slots"]["mlp/hidden/kernel"]) == {"m", "v"}


def test_list_and_errors(runs, tmp_path, capsys):
    assert cli_convert([runs["tf1"], "--list"]) == 0
    listing = capsys.readouterr().out
    assert "part  float32 [10, 3]  (partitioned)" in listing
    assert cli_convert([str(tmp_path / "nothing"), str(tmp_path / "o.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nothing.index: no such file" in err
    assert not (tmp_path / "o.pt").exists()


def test_progress_bar_with_and_without_tqdm(runs, tmp_path, monkeypatch):
    stream = io.StringIO()
    convert(runs["tf1"], tmp_path / "p.pt", progress=True, stream=stream)
    assert "reading" in stream.getvalue()  # tqdm drew its bar
    monkeypatch.setitem(sys.modules, "tqdm", None)  # tqdm not installed
    stream = io.StringIO()
    convert(runs["tf1"], tmp_path / "q.pt", progress=True, stream=stream)
    assert stream.getvalue() == ""
    assert (
        torch.load(tmp_path / "q.pt")["model"].keys()
        == torch.load(tmp_path / "p.pt")["model"].keys()
    )


def test_python_m_tfadam_convert(runs, tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "m.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "tfadam", "convert", runs["tf2"], str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and torch.load(out)["naming"] == "tf2"
