"""The reader, the loader and the converter work where TensorFlow cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from ckpt_tf import every_dtype_checkpoint, keras_resume_run, tf1_session_run, tf_values

BLOCKER = """
import sys
# importing any of these now raises ImportError: no TF, no Keras, no protobuf
for name in ("tensorflow", "keras", "tf_keras", "ml_dtypes", "google.protobuf"):
    sys.modules[name] = None
"""

SCRIPT = (
    BLOCKER
    + """
import hashlib, json, os
import torch
import tfadam
from tfadam.checkpoint import BundleReader, cli_convert, load_tf_checkpoint

try:
    import tensorflow  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the blocker failed: tensorflow imported")

digests = {}
for prefix in sys.argv[1:3]:
    with BundleReader(prefix) as reader:
        for key in reader.keys():
            a = reader.read_numpy(key)
            raw = b"|".join(a.reshape(-1)) if a.dtype == object else a.tobytes()
            digests[f"{prefix}:{key}"] = [str(a.shape), hashlib.sha256(raw).hexdigest()]

w = torch.nn.Parameter(torch.zeros(20, 4))
opt = tfadam.Adam([w], numerics="graph")
load_tf_checkpoint(sys.argv[1], opt, {"emb": w})
digests["loaded_m"] = hashlib.sha256(opt.state[w]["m"].numpy().tobytes()).hexdigest()
import tfadam.keras
kernel = torch.nn.Parameter(torch.zeros(6, 4))
keras_opt = tfadam.keras.Adam()
load_tf_checkpoint(sys.argv[4], keras_opt, {"mlp/hidden/kernel": kernel})
digests["keras_iterations"] = int(keras_opt.iterations)
status = cli_convert([sys.argv[1], os.path.join(sys.argv[3], "out.pt"), "--no-progress"])
heavy = sorted(
    m for m, mod in sys.modules.items()
    if mod is not None and m.split(".")[0] in ("tensorflow", "keras", "ml_dtypes")
)
print(json.dumps({"digests": digests, "convert": status, "heavy": heavy}))
"""
)


def _digest(value: np.ndarray) -> str:
    import hashlib

    a = np.asarray(value, dtype=object if isinstance(value, bytes) else None)
    raw = b"|".join(a.reshape(-1)) if a.dtype == object else a.tobytes()
    return hashlib.sha256(raw).hexdigest()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    d = tmp_path_factory.mktemp("nf")
    return (
        tf1_session_run(str(d / "tf1")).prefix,
        every_dtype_checkpoint(str(d / "dt"), big=False),
        keras_resume_run(str(d / "keras")).prefix,
    )


def test_reader_loader_and_converter_run_without_tensorflow(prefixes, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *prefixes[:2], str(tmp_path), prefixes[2]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["convert"] == 0 and report["heavy"] == []
    digests = report["digests"]
    assert digests.pop("keras_iterations") == 3
    for prefix in prefixes[:2]:
        for key, value in tf_values(prefix).items():
            shape, digest = digests.pop(f"{prefix}:{key}")
            assert digest == _digest(value), key
            assert shape == str(np.asarray(value).shape)
    assert digests.pop("loaded_m") == _digest(tf_values(prefixes[0])["emb/Adam"])
    assert not digests  # nothing read that TF does not list


def test_blocker_really_blocks():
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + "import tensorflow"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "import of tensorflow halted" in proc.stderr
