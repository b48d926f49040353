"""Hyperparameter dtypes, accumulator dtypes and duplicate sums against live TF.

TF converts each hyperparameter with ``convert_to_tensor`` (a Python float is
float32, a NumPy float64 float64, a tensor keeps its dtype), creates the
beta-power accumulators in β's dtype and advances them there (see
:mod:`tfadam.hyper`). Each row of :data:`KINDS` passes lr, β1, β2 and ε one
way; TF1's ``AdamOptimizer`` gets the TF equivalent (a NumPy value as is, a
torch tensor as a ``tf.constant`` of its dtype). Every comparison is ``==`` on
integer views of θ, m, v and both accumulators (whose dtypes must agree too).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
import torch
from tf_oracle import NP_DTYPES, TORCH_DTYPES, bits, to_torch

import tfadam

DTYPES = ["float16", "bfloat16", "float32", "float64"]
VALUES = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "epsilon": 1e-3}  # β2 < 1 in bfloat16
TF_OF = {
    "float16": tf.float16,
    "bfloat16": tf.bfloat16,
    "float32": tf.float32,
    "float64": tf.float64,
}


def _tensor_pair(dtype: str) -> Callable[[float], tuple[Any, Any]]:
    def make(x: float) -> tuple[Any, Any]:
        return torch.tensor(x, dtype=TORCH_DTYPES[dtype]), tf.constant(x, TF_OF[dtype])

    return make


def _same(make: Callable[[float], Any]) -> Callable[[float], tuple[Any, Any]]:
    return lambda x: (make(x), make(x))


def _called(make: Callable[[float], tuple[Any, Any]]) -> Callable[[float], tuple[Any, Any]]:
    def wrap(x: float) -> tuple[Any, Any]:
        ours, theirs = make(x)
        return (lambda: ours), (lambda: theirs)

    return wrap


# kind -> x -> (tfadam's hyperparameter, TF's), for all four hyperparameters
KINDS: dict[str, Callable[[float], tuple[Any, Any]]] = {
    "python-float": _same(float),
    "numpy-float16": _same(np.float16),
    "numpy-float32": _same(np.float32),
    "numpy-float64": _same(np.float64),
    "numpy-0d-array": _same(np.array),
    "torch-float16": _tensor_pair("float16"),
    "torch-bfloat16": _tensor_pair("bfloat16"),
    "torch-float32": _tensor_pair("float32"),
    "torch-float64": _tensor_pair("float64"),
    "callable-numpy-float64": _called(_same(np.float64)),
    "callable-torch-bfloat16": _called(_tensor_pair("bfloat16")),
    "callable-torch-float16": _called(_tensor_pair("float16")),
}
# Each hyperparameter its own kind: the accumulators follow β1 and β2 separately.
MIXED = {"lr": "numpy-float16", "beta1": "numpy-float64", "beta2": "python-float",
         "epsilon": "torch-bfloat16"}  # fmt: skip

ROWS, COLUMNS, STEPS = 5, 3, 3
SPARSE_INDICES = [0, 3, 0, 4, 3, 0]  # duplicates, out of order


def hyperparameters(kinds: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    ours, theirs = {}, {}
    for name, x in VALUES.items():
        ours[name], theirs[name] = KINDS[kinds[name]](x)
    return ours, theirs


def gradients(dtype: str, sparse: bool, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal((ROWS, COLUMNS)).astype(NP_DTYPES[dtype])
    rows = len(SPARSE_INDICES) if sparse else ROWS
    grads = [rng.standard_normal((rows, COLUMNS)).astype(NP_DTYPES[dtype]) for _ in range(STEPS)]
    return theta, grads


def tf_grad(g: np.ndarray, sparse: bool) -> Any:
    if not sparse:
        return tf.constant(g)
    return tf.IndexedSlices(
        tf.constant(g), tf.constant(SPARSE_INDICES), tf.constant([ROWS, COLUMNS], tf.int64)
    )


def torch_grad(g: np.ndarray, sparse: bool) -> Any:
    if not sparse:
        return to_torch(g)
    return tfadam.IndexedSlices(to_torch(g), torch.tensor(SPARSE_INDICES), (ROWS, COLUMNS))


def coo(g: np.ndarray, indices: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """An uncoalesced COO gradient: its rows in the given order, duplicates kept."""
    return torch.sparse_coo_tensor(torch.tensor([indices]), to_torch(g), shape)


def run_tf(theirs: dict[str, Any], theta: np.ndarray, grads: list[np.ndarray], sparse: bool):
    opt = tf.compat.v1.train.AdamOptimizer(
        theirs["lr"], theirs["beta1"], theirs["beta2"], theirs["epsilon"]
    )
    var = tf.Variable(theta)
    for g in grads:
        opt.apply_gradients([(tf_grad(g, sparse), var)])
    powers = opt._get_beta_accumulators()
    return (
        [var.numpy(), opt.get_slot(var, "m").numpy(), opt.get_slot(var, "v").numpy()],
        [p.numpy() for p in powers],
    )


def run_tfadam(
    face: str, ours: dict[str, Any], theta: np.ndarray, grads: list[np.ndarray], sparse: bool
):
    var = torch.nn.Parameter(to_torch(theta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ε underflow / β rounding warnings: TF computes the same
        if face == "torch":
            opt = tfadam.Adam(
                [var], lr=ours["lr"], betas=(ours["beta1"], ours["beta2"]), eps=ours["epsilon"]
            )
            for g in grads:
                var.grad = coo(g, SPARSE_INDICES, theta.shape) if sparse else to_torch(g)
                opt.step()
            slots = opt.state[var]
            powers = opt.param_groups[0]["beta1_power"], opt.param_groups[0]["beta2_power"]
        else:
            opt1 = tfadam.AdamOptimizer(ours["lr"], ours["beta1"], ours["beta2"], ours["epsilon"])
            for g in grads:
                opt1.apply_gradients([(torch_grad(g, sparse), var)])
            slots = {name: opt1.get_slot(var, name) for name in ("m", "v")}
            powers = opt1._get_beta_accumulators()
    return [var.detach(), slots["m"], slots["v"]], list(powers)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same(expected, actual) -> None:
    (tf_tensors, tf_powers), (our_tensors, our_powers) = expected, actual
    for name, want, got in zip(("theta", "m", "v"), tf_tensors, our_tensors, strict=True):
        assert np.array_equal(bits(want), bits(got)), name
    for name, want, got in zip(("beta1_power", "beta2_power"), tf_powers, our_powers, strict=True):
        got = as_numpy(got)
        assert np.asarray(want).dtype == got.dtype, name
        assert np.array_equal(bits(want), bits(got)), name


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("face", ["torch", "tf1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", [*KINDS, "mixed"])
def test_hyperparameter_kinds_match_tf(kind: str, dtype: str, face: str, sparse: bool) -> None:
    kinds = MIXED if kind == "mixed" else dict.fromkeys(VALUES, kind)
    ours, theirs = hyperparameters(kinds)
    theta, grads = gradients(dtype, sparse, seed=len(kind) * 7 + DTYPES.index(dtype))
    expected = run_tf(theirs, theta, grads, sparse)
    assert_same(expected, run_tfadam(face, ours, theta, grads, sparse))


def test_numpy_float64_accumulators_change_float64_bits() -> None:
    # The case: the same values as Python floats give other bits in a
    # float64 variable, because the accumulators are float32 then.
    theta, grads = gradients("float64", False, seed=1)
    by_kind = {}
    for kind in ("python-float", "numpy-float64"):
        ours, _ = hyperparameters(dict.fromkeys(VALUES, kind))
        by_kind[kind] = run_tfadam("torch", ours, theta, grads, False)[0][0]
    assert not torch.equal(by_kind["python-float"], by_kind["numpy-float64"])


# --- AMSGrad: TF densifies an IndexedSlices (unsorted_segment_sum, in order) ----------


def tf_amsgrad(theta: np.ndarray, grads: list[np.ndarray], indices: list[int]):
    """``ResourceApplyAdamWithAmsgrad`` fed ``convert_to_tensor(IndexedSlices)``."""
    var, m, v, vhat = (tf.Variable(x) for x in (theta, *[np.zeros_like(theta)] * 3))
    b1, b2 = tf.constant(0.9, tf.float32), tf.constant(0.999, tf.float32)
    power1, power2 = b1, b2
    for g in grads:
        slices = tf.IndexedSlices(
            tf.constant(g), tf.constant(indices), tf.constant(theta.shape, tf.int64)
        )

        def cast(x):
            return tf.cast(x, var.dtype)

        tf.raw_ops.ResourceApplyAdamWithAmsgrad(
            var=var.handle, m=m.handle, v=v.handle, vhat=vhat.handle,
            beta1_power=cast(power1), beta2_power=cast(power2), lr=cast(tf.constant(0.01)),
            beta1=cast(b1), beta2=cast(b2), epsilon=cast(tf.constant(1e-3)),
            grad=tf.convert_to_tensor(slices),
        )  # fmt: skip
        power1, power2 = power1 * b1, power2 * b2
    return [x.numpy() for x in (var, m, v, vhat)], [power1.numpy(), power2.numpy()]


@pytest.mark.parametrize("face", ["torch", "tf1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_sums_duplicate_rows_in_sequence_like_tf(dtype: str, face: str) -> None:
    # Four occurrences of row 1: 1 then three increments of 3/4 of an ulp in
    # total (column 0 for float16, 1 for bfloat16); summed in float32 and
    # rounded once (index_add_) they round up, summed in T they stay 1.
    indices = [1, 1, 0, 1, 1]
    rng = np.random.default_rng(5)
    theta = rng.standard_normal((3, 2)).astype(NP_DTYPES[dtype])
    small = [2.0**-12, 2.0**-9]
    rows = np.array([[1.0, 1.0], small, [7.0, 1.0], small, small])
    grads = [rows.astype(NP_DTYPES[dtype]), rng.standard_normal((5, 2)).astype(NP_DTYPES[dtype])]
    expected, powers = tf_amsgrad(theta, grads, indices)
    var = torch.nn.Parameter(to_torch(theta))
    if face == "torch":
        opt = tfadam.Adam([var], lr=0.01, eps=1e-3, amsgrad=True)
        for g in grads:
            var.grad = coo(g, indices, theta.shape)
            opt.step()
        slots = opt.state[var]
        ours = opt.param_groups[0]["beta1_power"], opt.param_groups[0]["beta2_power"]
    else:
        opt1 = tfadam.AdamOptimizer(0.01, epsilon=1e-3, amsgrad=True)
        for g in grads:
            opt1.apply_gradients([(tfadam.IndexedSlices(to_torch(g), torch.tensor(indices)), var)])
        slots = {name: opt1.get_slot(var, name) for name in ("m", "v", "vhat")}
        ours = opt1._get_beta_accumulators()
    for name, want, got in zip(
        ("theta", "m", "v", "vhat"), expected, [var.detach(), *map(slots.get, ("m", "v", "vhat"))],
        strict=True,
    ):  # fmt: skip
        assert np.array_equal(bits(want), bits(got)), name
    for want, got in zip(powers, ours, strict=True):
        assert np.array_equal(bits(want), bits(got))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_amsgrad_example_differs_between_sequential_and_float32_sums(dtype) -> None:
    # The rows above must exercise the difference, or the test cannot fail.
    small = [2.0**-12, 2.0**-9]
    rows = torch.tensor([[1.0, 1.0], small, small, small], dtype=dtype)
    at = torch.zeros(4, dtype=torch.long)
    once = torch.zeros(1, 2, dtype=dtype).index_add_(0, at, rows)
    assert not torch.equal(once, tfadam.sparse.deduplicate(at, rows)[1])


# --- what TF accepts -------------------------------------------------------------------


@pytest.mark.parametrize("face", ["torch", "tf1"])
@pytest.mark.parametrize(
    "lr", [np.float32(0.1), np.array(0.01), np.float16(0.1)], ids=["np32", "0d-array", "np16"]
)
def test_numpy_learning_rates_are_accepted_and_match_tf(face: str, lr: Any) -> None:
    theta, grads = gradients("float32", False, seed=3)
    ours = {**{k: float(v) for k, v in VALUES.items()}, "lr": lr}
    assert_same(run_tf(ours, theta, grads, False), run_tfadam(face, ours, theta, grads, False))


@pytest.mark.parametrize("face", ["torch", "tf1"])
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0,)])
def test_zero_stride_empty_tensors_are_accepted_like_tf(face: str, shape: tuple[int, ...]) -> None:
    zeros = np.zeros(shape, np.float32)
    var = torch.nn.Parameter(torch.from_numpy(zeros.copy()))
    grad = torch.from_numpy(np.zeros(shape, np.float32))
    assert 0 in var.stride() or len(shape) == 1  # torch.from_numpy's strides for no elements
    if face == "torch":
        var.grad = grad
        opt = tfadam.Adam([var], lr=0.1)
        opt.step()
        ours = opt.param_groups[0]["beta1_power"], opt.param_groups[0]["beta2_power"]
    else:
        opt1 = tfadam.AdamOptimizer(0.1)
        opt1.apply_gradients([(grad, var)])
        ours = opt1._get_beta_accumulators()
    tf_opt = tf.compat.v1.train.AdamOptimizer(0.1)
    tf_var = tf.Variable(zeros)
    tf_opt.apply_gradients([(tf.constant(zeros), tf_var)])
    assert var.shape == tf_var.shape
    for want, got in zip(tf_opt._get_beta_accumulators(), ours, strict=True):
        assert np.array_equal(bits(want.numpy()), bits(got))


# --- what TF refuses: a β whose dtype is not its accumulator's -------------------------


@pytest.mark.parametrize("face", ["torch", "tf1"])
def test_a_beta_changing_dtype_is_refused_before_anything_moves(face: str) -> None:
    # TF: "cannot compute Mul as input #1 was expected to be a float tensor but
    # is a double tensor", raised after the variables moved (measured).
    betas = [np.float32(0.9), np.float64(0.9)]
    var = torch.nn.Parameter(torch.ones(3))
    grad = torch.full((3,), 0.5)
    if face == "torch":
        opt = tfadam.Adam([var], lr=0.1, betas=(lambda: betas[0], 0.999))
        var.grad = grad

        def step() -> None:
            opt.step()

        powers = [opt.param_groups[0].get("beta1_power")]
    else:
        opt1 = tfadam.AdamOptimizer(0.1, beta1=lambda: betas[0])

        def step() -> None:
            opt1.apply_gradients([(grad, var)])

    step()
    before = [var.detach().clone()]
    if face == "torch":
        powers = [opt.param_groups[0]["beta1_power"].clone()]
        before += [t.clone() for t in opt.state[var].values()]
    else:
        powers = [opt1._get_beta_accumulators()[0].clone()]
        before += [opt1.get_slot(var, n).clone() for n in ("m", "v")]
    betas.pop(0)
    with pytest.raises(TypeError, match="beta1 is torch.float64 but beta1_power is torch.float32"):
        step()
    after = [var.detach()]
    if face == "torch":
        after += list(opt.state[var].values())
        assert torch.equal(opt.param_groups[0]["beta1_power"], powers[0])
    else:
        after += [opt1.get_slot(var, n) for n in ("m", "v")]
        assert torch.equal(opt1._get_beta_accumulators()[0], powers[0])
    for b, a in zip(before, after, strict=True):
        assert np.array_equal(bits(b), bits(a))


# --- the accumulators' dtype through the load paths ------------------------------------


def test_float64_accumulators_resume_through_state_dict_bitwise() -> None:
    theta, grads = gradients("float64", False, seed=8)
    ours, _ = hyperparameters(dict.fromkeys(VALUES, "numpy-float64"))

    def optimizer(var: torch.Tensor) -> tfadam.Adam:
        return tfadam.Adam(
            [var], lr=ours["lr"], betas=(ours["beta1"], ours["beta2"]), eps=ours["epsilon"]
        )

    straight = torch.nn.Parameter(to_torch(theta))
    opt = optimizer(straight)
    resumed = torch.nn.Parameter(to_torch(theta))
    first = optimizer(resumed)
    for i, g in enumerate(grads):
        straight.grad = to_torch(g)
        opt.step()
        if i == 1:
            second = optimizer(resumed)
            second.load_state_dict(first.state_dict())
            first = second
        resumed.grad = to_torch(g)
        first.step()
    assert first.param_groups[0]["beta1_power"].dtype == torch.float64
    for a, b in [(straight, resumed), *zip(opt.state[straight].values(),
                                           first.state[resumed].values(), strict=True)]:  # fmt: skip
        assert np.array_equal(bits(a), bits(b))


def test_state_dict_whose_accumulators_are_not_their_betas_dtype_is_refused() -> None:
    var = torch.nn.Parameter(torch.ones(3))
    var.grad = torch.ones(3)
    saved = tfadam.Adam([var], betas=(np.float64(0.9), np.float64(0.999)))
    saved.step()
    state = saved.state_dict()
    target = tfadam.Adam([var], betas=(0.9, 0.999))  # Python floats: float32 to TF
    with pytest.raises(tfadam.errors.StateDictError, match="beta1_power is torch.float64"):
        target.load_state_dict({**state, "param_groups": [
            {**state["param_groups"][0], "betas": (0.9, 0.999)}]})  # fmt: skip
    assert target.state == {} and "beta1_power" not in target.param_groups[0]


# --- a TF1 Session: a NumPy β2 is a graph constant, which Grappler folds ---------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["numpy-float64", "numpy-float32", "numpy-0d-array"])
def test_numpy_beta2_folds_in_a_tf1_session_like_a_number(kind: str, dtype: str) -> None:
    # Grappler rewrites the sparse (g*g)*(1-β2) for a constant β2 (see
    # rule.sparse_update); a NumPy β2 is one, like a Python float.
    beta2 = KINDS[kind](0.999)[0]
    rng = np.random.default_rng(11)
    theta = rng.standard_normal((6, 4)).astype(NP_DTYPES[dtype])
    shape = (len(SPARSE_INDICES), 4)
    grads = [
        (rng.standard_normal(shape) * 10 ** rng.uniform(-4, 2, shape)).astype(NP_DTYPES[dtype])
        for _ in range(20)
    ]
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session() as session:
        var = tf.compat.v1.Variable(theta)
        values = tf.compat.v1.placeholder(TF_OF[dtype], shape)
        opt = tf.compat.v1.train.AdamOptimizer(0.01, 0.9, beta2, 1e-3)
        dense_shape = tf.constant(theta.shape, tf.int64)
        op = opt.apply_gradients(
            [(tf.IndexedSlices(values, tf.constant(SPARSE_INDICES), dense_shape), var)]
        )
        session.run(tf.compat.v1.global_variables_initializer())
        for g in grads:
            session.run(op, {values: g})
        expected = session.run([var, opt.get_slot(var, "m"), opt.get_slot(var, "v")])
    ours = torch.nn.Parameter(to_torch(theta))
    opt1 = tfadam.AdamOptimizer(0.01, 0.9, beta2, 1e-3, numerics="graph")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in grads:
            opt1.apply_gradients(
                [(tfadam.IndexedSlices(to_torch(g), torch.tensor(SPARSE_INDICES)), ours)]
            )
    actual = [ours.detach(), opt1.get_slot(ours, "m"), opt1.get_slot(ours, "v")]
    for name, want, got in zip(("theta", "m", "v"), expected, actual, strict=True):
        assert np.array_equal(bits(want), bits(got)), name
