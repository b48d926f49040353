"""Resume a TensorFlow run in tfadam: train k steps in TF, save, load, train n more
steps in both, and require every variable, slot and accumulator to be bit-identical."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_tf import (
    BETA1,
    BETA2,
    EPS,
    LR,
    SHAPES,
    Run,
    keras_resume_run,
    keras_run,
    tf1_session_run,
    tf2_eager_run,
)

import tfadam
from tfadam.checkpoint import CheckpointError, load_tf_checkpoint
from tfadam.checkpoint.writer import write_bundle


def to_torch(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.name == "bfloat16":  # ml_dtypes' type, as TF hands it out
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(arr.copy())  # (ascontiguousarray makes 0-dim arrays 1-dim)


def assert_same_bits(ours: torch.Tensor, theirs: np.ndarray, what: str) -> None:
    expected = to_torch(np.asarray(theirs))
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, what
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    a = ours.detach().contiguous().view(width)
    b = expected.contiguous().view(width)
    differing = int((a != b).sum())
    assert differing == 0, f"{what}: {differing} of {a.numel()} elements differ from TF"


class Model(torch.nn.Module):
    """The TF run's variables in torch layout: a Linear holds the Dense kernel transposed."""

    def __init__(self, dtype: torch.dtype, partitioned: bool) -> None:
        super().__init__()
        fan_in, fan_out = SHAPES["dense/kernel"]
        self.dense = torch.nn.Linear(fan_in, fan_out, dtype=dtype)
        self.emb = torch.nn.Embedding(*SHAPES["emb"], sparse=True, dtype=dtype)
        self.part = torch.nn.Parameter(torch.zeros(SHAPES["part"], dtype=dtype))
        self.partitioned = partitioned

    def var_map(self, kernel_name: str = "dense/kernel") -> dict[str, torch.Tensor]:
        out = {
            kernel_name: self.dense.weight.T,  # a view: (in, out), as TF stores it
            "dense/bias": self.dense.bias,
            "emb": self.emb.weight,
        }
        if self.partitioned:
            out["part"] = self.part
        return out

    def set_grads(self, dense: dict[str, np.ndarray], sparse: tuple[np.ndarray, np.ndarray]):
        self.dense.weight.grad = to_torch(dense["dense/kernel"]).T.contiguous()
        self.dense.bias.grad = to_torch(dense["dense/bias"])
        if self.partitioned:
            self.part.grad = to_torch(dense["part"])
        ids, values = sparse
        self.emb.weight.grad = torch.sparse_coo_tensor(
            torch.from_numpy(ids)[None], to_torch(values), SHAPES["emb"], check_invariants=True
        )

    def tf_view(self) -> dict[str, torch.Tensor]:
        out = {
            "dense/kernel": self.dense.weight.T,
            "dense/bias": self.dense.bias,
            "emb": self.emb.weight,
        }
        if self.partitioned:
            out["part"] = self.part
        return out


def check_final(model: Model, state_of, run: Run, beta_powers) -> None:
    for name, tensor in model.tf_view().items():
        param = tensor if tensor._base is None else tensor._base
        m, v = state_of(param)
        if tensor._base is not None:
            m, v = m.T, v.T
        assert_same_bits(tensor, run.final[name], name)
        assert_same_bits(m, run.final[name + "/m"], name + "/m")
        assert_same_bits(v, run.final[name + "/v"], name + "/v")
    assert run.beta_powers is not None
    assert_same_bits(beta_powers[0], run.beta_powers[0], "beta1_power")
    assert_same_bits(beta_powers[1], run.beta_powers[1], "beta2_power")


def resume_in_torch_face(model: Model, opt: tfadam.Adam, run: Run) -> None:
    """Apply the rest of the TF run's gradients with ``opt``; every bit must match TF's end."""
    for dense, sparse in zip(run.dense_grads, run.sparse_grads, strict=True):
        model.set_grads(dense, sparse)
        opt.step()
    check_final(
        model,
        lambda p: (opt.state[p]["m"], opt.state[p]["v"]),
        run,
        (opt.param_groups[0]["beta1_power"], opt.param_groups[0]["beta2_power"]),
    )


TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tf1_session_run_resumes_bitwise_in_tfadam_adam(tmp_path, dtype):
    run = tf1_session_run(str(tmp_path), dtype=dtype)
    model = Model(TORCH_DTYPES[dtype], partitioned=True)
    frozen = torch.nn.Parameter(torch.zeros(SHAPES["dense/bias"], dtype=TORCH_DTYPES[dtype]))
    opt = tfadam.Adam(
        [*model.parameters(), frozen], lr=LR, betas=(BETA1, BETA2), eps=EPS, numerics="graph"
    )
    result = load_tf_checkpoint(run.prefix, opt, {**model.var_map(), "frozen": frozen})
    assert result.accumulators == ("beta1_power", "beta2_power")
    assert result.without_slots == ["frozen"]  # TF never created slots for it
    assert sorted(result.slots) == ["dense/bias", "dense/kernel", "emb", "part"]
    resume_in_torch_face(model, opt, run)
    assert_same_bits(frozen, run.final["frozen"], "frozen")
    assert "m" not in opt.state[frozen]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tf2_eager_checkpoint_resumes_bitwise_in_tfadam_adam(tmp_path, dtype):
    run = tf2_eager_run(str(tmp_path), dtype=dtype)
    model = Model(TORCH_DTYPES[dtype], partitioned=False)
    opt = tfadam.Adam(model.parameters(), lr=LR, betas=(BETA1, BETA2), eps=EPS)
    # a TF2 variable may be named by its object path as well as its TF name
    result = load_tf_checkpoint(run.prefix, opt, model.var_map(kernel_name="model/kernel"))
    assert result.variables["model/kernel"] == "model/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert result.slots["dense/bias"] == {
        "m": "model/bias/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE",
        "v": "model/bias/.OPTIMIZER_SLOT/optimizer/v/.ATTRIBUTES/VARIABLE_VALUE",
    }
    resume_in_torch_face(model, opt, run)


def test_tf1_session_run_resumes_bitwise_in_tf1_face(tmp_path):
    run = tf1_session_run(str(tmp_path), seed=5)
    model = Model(torch.float32, partitioned=True)
    opt = tfadam.AdamOptimizer(LR, BETA1, BETA2, EPS, numerics="graph")
    load_tf_checkpoint(run.prefix, opt, model.var_map())
    params = [model.dense.weight, model.dense.bias, model.emb.weight, model.part]
    for dense, sparse in zip(run.dense_grads, run.sparse_grads, strict=True):
        model.set_grads(dense, sparse)
        opt.apply_gradients([(p.grad, p) for p in params])
    check_final(
        model,
        lambda p: (opt.get_slot(p, "m"), opt.get_slot(p, "v")),
        run,
        opt._get_beta_accumulators(),
    )


# -- nothing is modified when anything is wrong ---------------------------------


@pytest.fixture(scope="module")
def tf1_run(tmp_path_factory):
    return tf1_session_run(str(tmp_path_factory.mktemp("tf1")), seed=7)


def trained_model_and_optimizer():
    """A model and optimizer with existing state (one step taken), to check untouched."""
    torch.manual_seed(0)
    model = Model(torch.float32, partitioned=True)
    opt = tfadam.Adam(model.parameters(), lr=LR, numerics="graph")
    model.set_grads(
        {n: np.ones(SHAPES[n], np.float32) for n in ("dense/kernel", "dense/bias", "part")},
        (np.array([1, 2]), np.ones((2, SHAPES["emb"][1]), np.float32)),
    )
    opt.step()
    return model, opt


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        tensors += [t.clone() for t in opt.state[p].values()]
    for g in opt.param_groups:
        tensors += [g["beta1_power"].clone(), g["beta2_power"].clone()]
    return tensors


def assert_untouched(before: list[torch.Tensor], model, opt) -> None:
    after = snapshot(model, opt)
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def test_shape_and_dtype_mismatches_are_all_named_and_nothing_changes(tf1_run):
    model, opt = trained_model_and_optimizer()
    model.emb.weight.data = model.emb.weight.data.double()  # float64 against float32
    before = snapshot(model, opt)
    wrong = model.var_map()
    wrong["dense/kernel"] = model.dense.weight  # (5, 7): not transposed
    with pytest.raises(CheckpointError) as err:
        load_tf_checkpoint(tf1_run.prefix, opt, wrong)
    message = str(err.value)
    assert (
        "'dense/kernel' is [7, 5] float32 in the checkpoint, but var_map['dense/kernel'] is [5, 7]"
        in message
    )
    assert "map linear.weight.T" in message
    assert (
        "'emb' is [20, 4] float32 in the checkpoint, but var_map['emb'] is [20, 4] float64"
        in message
    )
    assert "Nothing was modified" in message and err.value.path.endswith(".index")
    assert_untouched(before, model, opt)


def test_unknown_name_is_an_error_and_nothing_changes(tf1_run):
    model, opt = trained_model_and_optimizer()
    before = snapshot(model, opt)
    var_map = model.var_map()
    var_map["dense/kernal"] = var_map.pop("dense/kernel")
    with pytest.raises(CheckpointError, match="Did you mean 'dense/kernel'"):
        load_tf_checkpoint(tf1_run.prefix, opt, var_map)
    assert_untouched(before, model, opt)


def test_damaged_tensor_read_last_leaves_everything_untouched(tf1_run, tmp_path):
    import shutil

    directory = os.path.dirname(tf1_run.prefix)
    for name in os.listdir(directory):
        if name.startswith(os.path.basename(tf1_run.prefix)):
            shutil.copy(os.path.join(directory, name), tmp_path)
    prefix = str(tmp_path / os.path.basename(tf1_run.prefix))
    from tfadam.checkpoint import BundleReader

    with BundleReader(prefix) as reader:
        entry = reader.entry("beta2_power")  # the accumulators are read after everything
    data_file = Path(prefix + ".data-00000-of-00001")
    data = bytearray(data_file.read_bytes())
    data[entry.offset] ^= 0x01
    data_file.write_bytes(bytes(data))
    model, opt = trained_model_and_optimizer()
    before = snapshot(model, opt)
    with pytest.raises(CheckpointError, match="checksum mismatch") as err:
        load_tf_checkpoint(prefix, opt, model.var_map())
    assert err.value.key == "beta2_power"
    assert_untouched(before, model, opt)


def test_keras_checkpoint_is_refused_by_the_tf1_faces(tmp_path):
    prefix = keras_run(str(tmp_path))
    kernel = torch.nn.Parameter(torch.zeros(6, 4))
    opt = tfadam.Adam([kernel])
    with pytest.raises(CheckpointError, match="Keras optimizer state"):
        load_tf_checkpoint(prefix, opt, {"mlp/hidden/kernel": kernel})
    assert torch.equal(kernel, torch.zeros(6, 4)) and not opt.state[kernel]
    # the variables alone load fine, by their Keras path
    load_tf_checkpoint(prefix, None, {"mlp/hidden/kernel": kernel})
    assert kernel.abs().sum() > 0


def test_other_optimizers_are_a_type_error(tf1_run):
    w = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(TypeError, match=r"torch.optim.Adam cannot continue a TF run"):
        load_tf_checkpoint(tf1_run.prefix, torch.optim.Adam([w]), {"dense/bias": w})


# -- var_map forms ---------------------------------------------------------------


def test_module_with_rename_and_variables_only(tf1_run):
    model = Model(torch.float32, partitioned=True)
    names = {"dense.bias": "dense/bias", "emb.weight": "emb", "part": "part"}
    result = load_tf_checkpoint(tf1_run.prefix, None, model, rename=names.get)
    assert sorted(result.variables) == ["dense/bias", "emb", "part"]
    assert "dense/kernel" in result.unused and "beta1_power" in result.unused
    from ckpt_tf import tf_values

    expected = tf_values(tf1_run.prefix)
    assert_same_bits(model.emb.weight, expected["emb"], "emb")
    assert_same_bits(model.part, expected["part"], "part")


def test_optimizer_name_and_several_accumulators(tmp_path):
    # TF1 names slots <var>/<optimizer name>; a second optimizer's accumulators
    # are uniquified (beta1_power_1). Written with the test writer, whose
    # output TF reads (test_checkpoint_reader).
    z = np.zeros(3, np.float32)
    write_bundle(
        str(tmp_path / "ckpt"),
        {
            "w": z + 1,
            "w/Opt": z + 2,
            "w/Opt_1": z + 3,
            "beta1_power": np.float32(0.5),
            "beta2_power": np.float32(0.25),
            "beta1_power_1": np.float32(0.9),
            "beta2_power_1": np.float32(0.99),
        },
    )
    w = torch.nn.Parameter(torch.zeros(3))
    opt = tfadam.AdamOptimizer(name="Opt")
    with pytest.raises(CheckpointError, match="several accumulators"):
        load_tf_checkpoint(str(tmp_path / "ckpt"), opt, {"w": w})
    load_tf_checkpoint(
        str(tmp_path / "ckpt"), opt, {"w": w}, accumulators=("beta1_power_1", "beta2_power_1")
    )
    assert torch.equal(opt.get_slot(w, "v"), torch.full((3,), 3.0))
    beta1_power, beta2_power = opt._get_beta_accumulators()
    assert beta1_power == torch.tensor(0.9) and beta2_power == torch.tensor(0.99)


def test_weights_only_checkpoint_leaves_the_optimizer_alone(tmp_path):
    prefix = str(tmp_path / "weights")
    write_bundle(prefix, {"w": np.arange(3, dtype=np.float32)})
    model, opt = trained_model_and_optimizer()
    w = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [w]})
    before = [t.clone() for t in opt.state[model.dense.bias].values()]
    result = load_tf_checkpoint(prefix, opt, {"w": w})
    assert result.without_slots == ["w"] and result.accumulators is None
    assert torch.equal(w.detach(), torch.arange(3.0))
    assert "beta1_power" not in opt.param_groups[1] and not opt.state[w]
    after = list(opt.state[model.dense.bias].values())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_every_group_holding_a_mapped_parameter_gets_the_accumulators(tf1_run):
    model = Model(torch.float32, partitioned=True)
    outsider = torch.nn.Parameter(torch.zeros(2))
    opt = tfadam.Adam(
        [
            {"params": [model.dense.weight, model.dense.bias]},
            {"params": [model.emb.weight, model.part], "lr": 0.5},
            {"params": [outsider]},
        ]
    )
    load_tf_checkpoint(tf1_run.prefix, opt, model.var_map())
    b1 = [g.get("beta1_power") for g in opt.param_groups]
    assert b1[0] is not None and b1[1] is not None and b1[2] is None
    assert b1[0] is not b1[1]  # each group advances its own copy
    assert_same_bits(b1[0], tf1_run.beta_powers_at_save[0], "beta1_power")


def test_a_tensor_outside_the_optimizer_gets_its_value_only(tf1_run):
    model, opt = trained_model_and_optimizer()
    extra = torch.zeros(SHAPES["dense/bias"])
    result = load_tf_checkpoint(tf1_run.prefix, opt, {**model.var_map(), "frozen": extra})
    assert "frozen" in result.variables and "frozen" not in result.slots
    assert extra.abs().sum() > 0


@pytest.mark.parametrize("amsgrad", [False, True])
def test_keras_checkpoint_resumes_bitwise_in_the_keras_face(tmp_path, amsgrad):
    import tfadam.keras

    run = keras_resume_run(str(tmp_path), amsgrad=amsgrad)
    hidden, out = torch.nn.Linear(6, 4), torch.nn.Linear(4, 2)
    var_map = {  # Keras paths; Dense kernels are (in, out), Linear weights (out, in)
        "mlp/hidden/kernel": hidden.weight.T,
        "mlp/hidden/bias": hidden.bias,
        "mlp/out/kernel": out.weight.T,
        "mlp/out/bias": out.bias,
    }
    opt = tfadam.keras.Adam(learning_rate=0.5, amsgrad=amsgrad)  # the lr variable is restored
    result = load_tf_checkpoint(run.prefix, opt, var_map)
    assert set(result.optimizer_variables) == {"iterations", "learning_rate"}
    assert int(opt.iterations) == 3 and float(opt.learning_rate) == np.float32(LR)
    # built on the parameters (torch layout); the views of var_map are recognised
    params = [hidden.weight, hidden.bias, out.weight, out.bias]
    for step, grads in enumerate(run.dense_grads):
        as_torch = [to_torch(grads[name]) for name in var_map]
        if step % 2:  # the parameters, gradients in torch layout
            as_torch = [g.T.contiguous() if g.dim() == 2 else g for g in as_torch]
            opt.apply_gradients(zip(as_torch, params, strict=True))
        else:  # fresh views, gradients in Keras' layout
            views = [hidden.weight.T, hidden.bias, out.weight.T, out.bias]
            opt.apply_gradients(zip(as_torch, views, strict=True))
    slot_names = ["m", "v", "vhat"] if amsgrad else ["m", "v"]
    keras_names = {"m": "momentum", "v": "velocity", "vhat": "velocity_hat"}
    for (name, tensor), param in zip(var_map.items(), params, strict=True):
        assert_same_bits(tensor, run.final[name], name)
        slots = opt._slots[opt._index[id(param)]]
        for slot in slot_names:
            held = slots[keras_names[slot]]
            assert_same_bits(
                held.T if tensor.dim() == 2 else held, run.final[f"{name}/{slot}"], f"{name}/{slot}"
            )
    assert int(opt.iterations) == int(run.final["iterations"]) == 6


def test_checkpoint_and_face_flavours_must_agree(tmp_path, tf1_run):
    import tfadam.keras

    w = torch.nn.Parameter(torch.zeros(SHAPES["dense/bias"]))
    opt = tfadam.keras.Adam()
    with pytest.raises(CheckpointError, match="TF1 AdamOptimizer state"):
        load_tf_checkpoint(tf1_run.prefix, opt, {"dense/bias": w})
    assert not opt.built and not w.abs().sum()
