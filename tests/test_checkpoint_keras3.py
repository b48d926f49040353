"""Keras 3's own files: ``model.save("m.keras")`` and ``model.save_weights("m.weights.h5")``.

Real Keras trains a model (``fit``), saves it, and continues k steps with fixed
gradients; tfadam loads the file into torch tensors and ``tfadam.keras.Adam``,
applies the same gradients, and every variable and every optimizer variable
must match Keras' bit for bit. Mixed precision (``mixed_float16``) saves a
LossScaleOptimizer around the Adam.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from keras_oracle import differences, keras, tf  # sets the TF backend first

import tfadam.keras
from tfadam.checkpoint import CheckpointError, convert, load_tf_checkpoint

h5py = pytest.importorskip("h5py")  # requirements-dev installs it; the extra is optional

STEPS_AFTER = 3


@dataclass
class Saved:
    path: str
    paths: list[str]  # model.variables' paths, in order
    trainable: list[str]
    shapes: list[tuple[int, ...]]  # model.variables' shapes
    iterations: int  # Adam's counter when saved
    grads: list[list[np.ndarray]] = field(default_factory=list)
    final: list[np.ndarray] = field(default_factory=list)  # model.variables after
    optimizer_final: list[np.ndarray] = field(default_factory=list)  # Adam's variables after
    config: dict = field(default_factory=dict)


def build_model(kind: str):
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(5, name="hidden"),
                keras.layers.BatchNormalization(name="norm"),
                keras.layers.Dense(2, name="out", use_bias=False),
            ],
            name="mlp",
        )
    # functional, with an embedding, a LayerNormalization and a nested Sequential
    ids = keras.Input((3,), dtype="int32", name="ids")
    x = keras.layers.Embedding(11, 4, name="emb")(ids)
    x = keras.layers.Flatten()(x)
    x = keras.layers.LayerNormalization(name="ln")(x)
    inner = keras.Sequential([keras.layers.Dense(2, name="proj")], name="head")
    return keras.Model(ids, inner(x), name="func")


def train_and_save(directory: str, *, kind: str, fmt: str, policy: str, amsgrad: bool) -> Saved:
    """fit() a few steps, save, then k steps with known gradients (Keras is the oracle)."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)  # global: restored below
    try:
        keras.utils.set_random_seed(3)
        rng = np.random.default_rng(5)
        model = build_model(kind)
        model.compile(keras.optimizers.Adam(learning_rate=0.01, amsgrad=amsgrad), "mse")
        if kind == "sequential":
            x = rng.standard_normal((32, 6)).astype("float32")
            y = rng.standard_normal((32, 2)).astype("float32")
        else:
            x = rng.integers(0, 11, (32, 3)).astype("int32")
            y = rng.standard_normal((32, 2)).astype("float32")
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        path = os.path.join(directory, "m.keras" if fmt == "keras" else "m.weights.h5")
        if fmt == "keras":
            model.save(path)
        else:
            model.save_weights(path)
        optimizer = model.optimizer
        adam = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        saved = Saved(
            path,
            [v.path for v in model.variables],
            [v.path for v in model.trainable_variables],
            [tuple(v.shape) for v in model.variables],
            int(adam.iterations.numpy()),
        )
        for _ in range(STEPS_AFTER):
            scale = 10.0 ** rng.uniform(-3, 1)
            grads = [
                (rng.standard_normal(v.shape) * scale).astype("float32")
                for v in model.trainable_variables
            ]
            adam.apply_gradients(zip([tf.constant(g) for g in grads], model.trainable_variables))
            saved.grads.append(grads)
        saved.final = [np.asarray(v.numpy()) for v in model.variables]
        saved.optimizer_final = [np.asarray(v.numpy()) for v in adam.variables]
        return saved
    finally:
        keras.mixed_precision.set_global_policy(previous)


CASES = [  # (model, format, dtype policy, amsgrad)
    ("sequential", "keras", "float32", False),
    ("sequential", "weights", "float32", False),
    ("sequential", "keras", "mixed_float16", False),
    ("sequential", "weights", "mixed_float16", False),
    ("functional", "keras", "float32", True),
    ("functional", "weights", "mixed_float16", False),
]


@pytest.mark.parametrize(("kind", "fmt", "policy", "amsgrad"), CASES)
def test_keras_file_resumes_bitwise(tmp_path, kind, fmt, policy, amsgrad):
    saved = train_and_save(str(tmp_path), kind=kind, fmt=fmt, policy=policy, amsgrad=amsgrad)
    assert keras.mixed_precision.global_policy().name == "float32"
    # torch tensors in Keras' layout, named by variable.path
    tensors = {p: torch.zeros(s) for p, s in zip(saved.paths, saved.shapes)}
    opt = tfadam.keras.Adam(learning_rate=0.5, amsgrad=amsgrad)  # lr and counter restored
    opt.build([tensors[p] for p in saved.trainable])  # Keras' order: opt.variables line up
    result = load_tf_checkpoint(saved.path, opt, tensors)
    assert sorted(result.slots) == sorted(saved.trainable)
    assert set(result.optimizer_variables) == {"iterations", "learning_rate"}
    assert int(opt.iterations) == saved.iterations > 0
    for grads in saved.grads:
        opt.apply_gradients(
            zip([torch.from_numpy(g) for g in grads], [tensors[p] for p in saved.trainable])
        )
    assert differences(saved.final, [tensors[p] for p in saved.paths]) == []
    assert differences(saved.optimizer_final, opt.variables) == []
    assert int(opt.iterations) == saved.iterations + STEPS_AFTER


def test_names_are_keras_variable_paths(tmp_path):
    for kind in ("sequential", "functional"):
        for fmt in ("keras", "weights"):
            directory = tmp_path / f"{kind}-{fmt}"
            directory.mkdir()
            saved = train_and_save(
                str(directory), kind=kind, fmt=fmt, policy="float32", amsgrad=False
            )
            out = tmp_path / f"{kind}-{fmt}.pt"
            result = convert(saved.path, out)
            assert sorted(result.model) == sorted(saved.paths), (kind, fmt)
            assert sorted(result.slots) == sorted(saved.trainable), (kind, fmt)
            state = torch.load(out)
            assert state["naming"] == "keras3"
            assert state["optimizer"]["flavour"] == "keras"
            iterations = state["optimizer"]["variables"]["iterations"]
            assert int(iterations) == saved.iterations


# -- refusals ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_keras(tmp_path_factory):
    return train_and_save(
        str(tmp_path_factory.mktemp("k")),
        kind="sequential",
        fmt="keras",
        policy="float32",
        amsgrad=False,
    )


def test_keras_state_into_a_tf1_face_is_refused(saved_keras):
    w = torch.zeros(6, 5)
    with pytest.raises(CheckpointError, match="Keras optimizer state"):
        load_tf_checkpoint(saved_keras.path, tfadam.Adam([w]), {"mlp/hidden/kernel": w})
    assert not w.any()


def test_a_misfit_is_named_and_nothing_changes(saved_keras):
    kernel, bias = torch.zeros(5, 6), torch.zeros(5, dtype=torch.float64)
    opt = tfadam.keras.Adam()
    with pytest.raises(CheckpointError) as err:
        load_tf_checkpoint(
            saved_keras.path, opt, {"mlp/hidden/kernel": kernel, "mlp/hidden/bias": bias}
        )
    assert "map linear.weight.T" in str(err.value) and "float64" in str(err.value)
    assert not kernel.any() and not bias.any() and not opt.built
    with pytest.raises(CheckpointError, match="Did you mean 'mlp/hidden/kernel'"):
        load_tf_checkpoint(saved_keras.path, None, {"mlp/hiden/kernel": kernel})


def test_missing_h5py_names_the_extra(saved_keras, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(CheckpointError, match=r"pip install tfadam\[keras\]"):
        load_tf_checkpoint(saved_keras.path, None, {"mlp/hidden/bias": torch.zeros(5)})


@pytest.mark.parametrize(
    ("content", "looks"),
    [
        (b"root:x:0:0:root:/root:/bin/bash\n" * 3, "96 bytes, starting b'root:x:0:0:root:'"),
        (b"", "0 bytes, starting b''"),
        (b"PK\x03\x04garbage", "damaged zip archive"),
        (b"\x89HDF\r\n\x1a\n" + bytes(100), "not a readable HDF5 file"),
    ],
)
def test_files_of_no_supported_format_say_what_they_are(tmp_path, content, looks):
    path = tmp_path / "m.weights.h5"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_tf_checkpoint(path, None, {"x": torch.zeros(1)})
    assert looks in str(err.value)
    assert err.value.path.startswith(str(path))
    if not content.startswith((b"PK", b"\x89HDF")):
        assert "a Keras 3 .keras archive, a Keras 3 .weights.h5 file" in str(err.value)
        assert "tensor bundle (PREFIX with PREFIX.index" in str(err.value)


def _hostile_h5(path, make):
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        f.create_group("vars").attrs["name"] = "m"
        make(g)


HOSTILE = {
    # declared 2^40 float32 with no bytes stored: reading it would allocate 4 TiB
    "unallocated": (
        lambda g: g.create_dataset("0", shape=(1 << 20, 1 << 20), dtype="f4"),
        "needs 4398046511104 bytes, but the file stores 0",
    ),
    # a compressed chunked dataset: 4 GiB of zeros in a few kB
    "compressed": (
        lambda g: g.create_dataset(
            "0",
            shape=(1 << 15, 1 << 15),
            dtype="f4",
            chunks=(1 << 10, 1 << 10),
            compression="gzip",
            fillvalue=0,
        ),
        "chunked or filtered",
    ),
    "strings": (lambda g: g.create_dataset("0", data=np.array([b"ab"])), "not a variable type"),
    "big-endian": (
        lambda g: g.create_dataset("0", data=np.ones(3, ">f4")),
        "not a variable type",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_datasets_are_refused_before_reading(tmp_path, name):
    make, message = HOSTILE[name]
    path = tmp_path / "m.weights.h5"
    _hostile_h5(path, make)
    with pytest.raises(CheckpointError, match=message) as err:
        convert(path, tmp_path / "out.pt")
    assert err.value.key == "layers/dense/vars/0"
    assert not (tmp_path / "out.pt").exists()


_MEMORY_PROBE = """
import resource, sys, torch, h5py
from tfadam.checkpoint import CheckpointError, convert
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    try:
        convert(path, path + ".pt")
        print("converted", path)
    except CheckpointError as err:
        print("refused", path, "--", str(err)[:400])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("peak growth MiB", (after - before) // 1024)  # ru_maxrss: KiB on Linux
"""


def test_zip_bomb_and_huge_declarations_cost_no_memory(tmp_path):
    """In a subprocess (a blow-up cannot take pytest down): peak memory stays flat."""
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", "{}")
        with z.open("model.weights.h5", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(512):  # 512 MiB of zeros, ~0.5 MB compressed
                member.write(block)
    assert bomb.stat().st_size < 4 << 20
    stored = tmp_path / "stored.keras"  # uncompressed, 64 MiB, not HDF5
    with zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model.weights.h5", bytes(64 << 20))
    huge = tmp_path / "huge.weights.h5"
    _hostile_h5(huge, HOSTILE["unallocated"][0])
    compressed = tmp_path / "compressed.weights.h5"
    _hostile_h5(compressed, HOSTILE["compressed"][0])
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(bomb), str(stored), str(huge), str(compressed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["refused"] * 4, run.stdout
    growth = int(lines[-1].split()[-1])
    assert growth < 16, run.stdout
    assert "is compressed" in lines[0] and "is not HDF5" in lines[1], run.stdout


def test_keras_files_load_without_tensorflow_or_keras(saved_keras):
    from test_checkpoint_no_tf import BLOCKER

    script = BLOCKER + (
        "import sys, torch, tfadam.keras\n"
        "from tfadam.checkpoint import load_tf_checkpoint\n"
        "assert sys.modules.get('keras') is None and sys.modules.get('tensorflow') is None\n"
        "kernel, bias = torch.zeros(6, 5), torch.zeros(5)\n"
        "opt = tfadam.keras.Adam()\n"
        "load_tf_checkpoint(sys.argv[1], opt, {'mlp/hidden/kernel': kernel, "
        "'mlp/hidden/bias': bias})\n"
        "print(int(opt.iterations), float(kernel.abs().sum()) > 0)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, saved_keras.path], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(saved_keras.iterations), "True"]


def test_an_optimizer_that_does_not_line_up_still_lets_the_variables_load(tmp_path):
    path = tmp_path / "m.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "mlp"
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "hidden"
        g["0"], g["1"] = np.ones((3, 2), np.float32), np.ones(2, np.float32)
        o = f.create_group("optimizer/vars")
        o["0"], o["1"] = np.int64(4), np.float32(0.1)
        o["2"], o["3"] = np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)  # transposed
        o["4"], o["5"] = np.zeros(2, np.float32), np.zeros(2, np.float32)
    kernel = torch.zeros(3, 2)
    opt = tfadam.keras.Adam()
    with pytest.raises(CheckpointError, match="do not line up with the model's"):
        load_tf_checkpoint(path, opt, {"mlp/hidden/kernel": kernel})
    assert not kernel.any() and not opt.built
    load_tf_checkpoint(path, None, {"mlp/hidden/kernel": kernel})
    assert torch.equal(kernel, torch.ones(3, 2))


def test_overlapping_or_outlying_data_is_refused(tmp_path):
    """Two datasets declared over the same bytes: reading both would read the file twice."""
    path = tmp_path / "m.weights.h5"
    # point the second dataset's layout at the first one's bytes
    _hostile_h5(
        path,
        lambda g: (
            g.create_dataset("0", data=np.arange(64, dtype=np.float32)),
            g.create_dataset("1", data=np.arange(64, dtype=np.float32) + 1),
        ),
    )
    data = bytearray(path.read_bytes())
    with h5py.File(path) as f:
        a = f["layers/dense/vars/0"].id.get_offset()
        b = f["layers/dense/vars/1"].id.get_offset()
    address = b.to_bytes(8, "little")
    assert data.count(address) == 1, "the layout message holds the data address once"
    data[data.index(address) : data.index(address) + 8] = a.to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="overlaps 'layers/dense/vars/0'"):
        convert(path, tmp_path / "out.pt")


LAYERS = {  # each layer of the name table, in a model Keras builds: (input shape, layer)
    "Dense": ((5,), lambda: keras.layers.Dense(3)),
    "Dense no bias": ((5,), lambda: keras.layers.Dense(3, use_bias=False)),
    "EinsumDense": ((5,), lambda: keras.layers.EinsumDense("ab,bc->ac", (3,), bias_axes="c")),
    "Conv1D": ((6, 2), lambda: keras.layers.Conv1D(3, 2)),
    "Conv2D": ((6, 6, 2), lambda: keras.layers.Conv2D(3, 2)),
    "Conv3D": ((4, 4, 4, 2), lambda: keras.layers.Conv3D(3, 2)),
    "Conv2DTranspose": ((6, 6, 2), lambda: keras.layers.Conv2DTranspose(3, 2)),
    "DepthwiseConv2D": ((6, 6, 2), lambda: keras.layers.DepthwiseConv2D(2)),
    "SeparableConv2D": ((6, 6, 2), lambda: keras.layers.SeparableConv2D(3, 2)),
    "Embedding": ((4,), lambda: keras.layers.Embedding(7, 3)),
    "BatchNormalization": ((5,), lambda: keras.layers.BatchNormalization()),
    "BatchNormalization no center": (
        (5,),
        lambda: keras.layers.BatchNormalization(center=False),
    ),
    "LayerNormalization": ((5,), lambda: keras.layers.LayerNormalization()),
    "GroupNormalization": ((4,), lambda: keras.layers.GroupNormalization(groups=2)),
    "PReLU": ((5,), lambda: keras.layers.PReLU()),
}


@pytest.mark.parametrize("fmt", ["keras", "weights"])
def test_the_name_table_gives_keras_paths(tmp_path, fmt):
    for label, (shape, make) in LAYERS.items():
        dtype = "int32" if label == "Embedding" else "float32"
        model = keras.Sequential([keras.Input(shape, dtype=dtype), make()], name="m")
        path = str(tmp_path / ("m.keras" if fmt == "keras" else "m.weights.h5"))
        if fmt == "keras":
            model.save(path)
        else:
            model.save_weights(path)
        result = convert(path, path + ".pt")
        if "no center" in label and fmt == "weights":  # gamma or beta? only the config says
            assert [n.rsplit("/", 2)[1:] for n in result.model] == [
                ["vars", "0"],
                ["vars", "1"],
                ["vars", "2"],
            ]
            continue
        assert sorted(result.model) == sorted(v.path for v in model.variables), label
        os.remove(path)


def test_an_sstable_file_is_named_as_tf1s_v1_format(tmp_path):
    """V1 checkpoints are single SSTable files: an SSTable that is not a prefix's .index."""
    from tfadam.checkpoint.writer import write_bundle

    write_bundle(str(tmp_path / "ckpt"), {"w": np.ones(3, np.float32)})
    (tmp_path / "old.ckpt").write_bytes((tmp_path / "ckpt.index").read_bytes())
    with pytest.raises(CheckpointError, match="TF1's old V1 format") as err:
        load_tf_checkpoint(tmp_path / "old.ckpt", None, {"w": torch.zeros(3)})
    assert "a Keras 3 .keras archive" in str(err.value)
