"""NumPy and tensor hyperparameters in the Keras face, against live Keras 3.

Measured: Keras accepts a NumPy scalar, a 0-dim array or a tensor as
``beta_1``, ``beta_2``, ``epsilon`` and ``weight_decay`` and computes with it
in its own dtype (its type promotion: ``1 - beta_1`` in that dtype, the
products in the promoted dtype, ``ops.cast`` from it), which changes the bits
from a Python float of the same value. tfadam.keras reproduces that
arithmetic (:mod:`tfadam.keras_rule`); the matrix below proves it bit for bit
for every kind of value, variable dtype, dense and sparse gradients, with
and without AMSGrad. A learning rate is a float to Keras only if it is a
``float`` instance: ``np.float64`` is accepted (kept in a float32 variable,
as a Python float), ``np.float32`` and 0-dim arrays are refused with a
``ValueError``, in both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from keras_oracle import differences, keras, random_scenario, run_keras, run_tfadam, tf
from tf_oracle import NP_DTYPES, to_torch

import tfadam.keras

DTYPES = ["float16", "bfloat16", "float32", "float64"]
NON_PYTHON = {
    "numpy-float16": np.float16,
    "numpy-float32": np.float32,
    "numpy-float64": np.float64,
    "numpy-0d-array": np.array,
    "torch-float64": lambda x: torch.tensor(x, dtype=torch.float64),
}

# One kind of typed value per row: how each side receives it. NumPy values are
# the same object on both sides; a 0-dim torch tensor of dtype D stands for
# tf.constant(x, D) (the same bits, from one NumPy array).
HYPER_KINDS: dict[str, tuple[Any, Any]] = {
    "numpy-float16": (np.float16, np.float16),
    "numpy-bfloat16": (NP_DTYPES["bfloat16"], NP_DTYPES["bfloat16"]),
    "numpy-float32": (np.float32, np.float32),
    "numpy-float64": (np.float64, np.float64),
    "numpy-0d-array": (np.array, np.array),
    "numpy-0d-float32-array": (
        lambda x: np.array(x, np.float32),
        lambda x: np.array(x, np.float32),
    ),
    **{
        f"tensor-{name}": (
            lambda x, n=name: tf.constant(np.array(x, NP_DTYPES[n])),
            lambda x, n=name: to_torch(np.array(x, NP_DTYPES[n])),
        )
        for name in DTYPES
    },
}
HYPER_VALUES = {"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-3, "weight_decay": 0.01}
GRADIENTS = {"dense": 0.0, "sparse": 1.0}  # sparse: IndexedSlices with repeated rows


def _configs(kind: str, names: list[str], amsgrad: bool) -> tuple[dict, dict]:
    keras_make, tfadam_make = HYPER_KINDS[kind]
    keras_config: dict[str, Any] = dict(amsgrad=amsgrad)
    tfadam_config: dict[str, Any] = dict(amsgrad=amsgrad)
    for name in names:
        keras_config[name] = keras_make(HYPER_VALUES[name])
        tfadam_config[name] = tfadam_make(HYPER_VALUES[name])
    return keras_config, tfadam_config


def _compare(s: Any, keras_config: dict, tfadam_config: dict) -> list[str]:
    s.config = keras_config
    expected = run_keras(s)
    s.config = tfadam_config
    actual = run_tfadam(s)
    return differences(expected[0] + expected[1], actual[0] + actual[1])


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", HYPER_KINDS)
def test_typed_hyperparameters_match_keras(kind: str, dtype: str, gradient: str, amsgrad: bool):
    # β1, β2, ε and weight_decay all of one kind: every promoted op at once,
    # on every element of θ, m, v (and v̂), several steps.
    s = random_scenario(
        7, dtype=dtype, shapes=[(6, 3), (5,)], steps=3, sparse=GRADIENTS[gradient], scale=(-2, 0)
    )
    keras_config, tfadam_config = _configs(kind, list(HYPER_VALUES), amsgrad)
    assert _compare(s, keras_config, tfadam_config) == []


@pytest.mark.parametrize("name", list(HYPER_VALUES))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("kind", ["numpy-float64", "tensor-bfloat16"])
def test_one_typed_hyperparameter_at_a_time_matches_keras(kind: str, dtype: str, name: str):
    # Each argument alone (the others Python floats): no promotion leaks into
    # an op it does not belong to.
    s = random_scenario(8, dtype=dtype, shapes=[(6, 3)], steps=3, sparse=0.5, scale=(-2, 0))
    keras_config, tfadam_config = _configs(kind, [name], False)
    assert _compare(s, keras_config, tfadam_config) == []


def test_typed_hyperparameters_matter() -> None:
    # The matrix above can fail: with np.float64 βs a float32 variable's bits
    # are not those of the same Python floats.
    s = random_scenario(3, dtype="float32", shapes=[(6, 3)], steps=4, scale=(-2, 0))
    s.config = dict(beta_1=np.float64(0.9), beta_2=np.float64(0.99))
    numpy_run = run_keras(s)
    s.config = dict(beta_1=0.9, beta_2=0.99)
    python_run = run_tfadam(s)
    assert differences(numpy_run[0] + numpy_run[1], python_run[0] + python_run[1])


# The transforms' hyperparameters. Values whose float32 rounding is a tie of
# the variable's dtype, so that converting through float32 (a Python number)
# and rounding once (a NumPy value) differ: 1 + 2**-11 + 2**-40 for float16,
# 1 + 2**-8 + 2**-40 for bfloat16.
TIES = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24, "float64": 2**-53}
TRANSFORMS: dict[str, tuple[dict[str, Any], float]] = {
    # argument: (other options, its value before the tie is added)
    "loss_scale_factor": ({}, 1.0),
    "clipvalue": ({}, 1.0),
    "clipnorm": ({}, 1.0),
    "ema_momentum": (dict(use_ema=True, ema_overwrite_frequency=2), 0.5),
    # Above the gradients' norm: the scale is clip * (1 / clip), rounded in each dtype.
    "global_clipnorm": ({}, 300.0),
}


def _keras_refuses(name: str, kind: str, dtype: str) -> bool:
    # TF converts a Python number or NumPy value to the gradient's dtype but
    # takes a tensor as it is, in `g / scale` and tf.clip_by_value.
    # global_clipnorm: Keras' scale is computed in result_type(T, D), which TF
    # then cannot add to a T tensor unless it is T (a tensor must be T itself).
    if kind.startswith("tensor-"):
        return (
            name in ("loss_scale_factor", "clipvalue", "global_clipnorm")
            and kind != f"tensor-{dtype}"
        )
    if name != "global_clipnorm":
        return False
    kind_dtype = {"numpy-0d-array": "float64", "numpy-0d-float32-array": "float32"}.get(
        kind, kind.removeprefix("numpy-")
    )
    wider = {"float16": 1, "bfloat16": 1, "float32": 2, "float64": 3}
    return kind_dtype != dtype and (wider[kind_dtype] >= wider[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", HYPER_KINDS)
@pytest.mark.parametrize("name", TRANSFORMS)
def test_typed_transform_hyperparameters_match_keras(name: str, kind: str, dtype: str) -> None:
    options, base = TRANSFORMS[name]
    value = base + TIES[dtype] + 2**-40
    sparse = 0.0 if name == "loss_scale_factor" else 0.5  # Keras cannot unscale IndexedSlices
    s = random_scenario(
        9, dtype=dtype, shapes=[(6, 3), (4,)], steps=3, sparse=sparse, scale=(-1, 1)
    )
    keras_make, tfadam_make = HYPER_KINDS[kind]
    keras_config = dict(options, **{name: keras_make(value)})
    tfadam_config = dict(options, **{name: tfadam_make(value)})
    if _keras_refuses(name, kind, dtype):
        s.config = keras_config
        with pytest.raises(Exception):  # noqa: B017 (TypeError or InvalidArgumentError)
            run_keras(s)
        w = torch.ones(4, dtype=getattr(torch, dtype))
        optimizer = tfadam.keras.Adam(**tfadam_config)
        with pytest.raises(TypeError, match=f"Argument `{name}` is (a )?torch"):
            optimizer.apply_gradients([(torch.ones_like(w), w)])
        assert (w == 1).all() and not optimizer.built
        return
    assert _compare(s, keras_config, tfadam_config) == []


def test_the_transform_ties_matter() -> None:
    # A NumPy float64 clipvalue rounds once to float16, a Python float through
    # float32: the matrix above distinguishes the two conversions.
    s = random_scenario(9, dtype="float16", shapes=[(6, 3)], steps=3, scale=(0, 1))
    value = 1 + TIES["float16"] + 2**-40
    s.config = dict(clipvalue=np.float64(value))
    numpy_run = run_keras(s)
    s.config = dict(clipvalue=value)
    python_run = run_tfadam(s)
    assert differences(numpy_run[0] + numpy_run[1], python_run[0] + python_run[1])


# What Keras refuses (at construction or, for these, at its first step) is
# refused at construction, naming the argument and the fix.
REFUSED = [
    ("beta_1", lambda: 0.9, ValueError, "Argument `beta_1` must be a number.*callable"),
    ("epsilon", "1e-7", TypeError, "Argument `epsilon` must be a real number.*str"),
    ("beta_2", True, TypeError, "Argument `beta_2` must be a real number.*bool"),
    ("beta_1", np.array([0.9, 0.8]), ValueError, r"`beta_1` must be a scalar .*shape \(2,\)"),
    ("weight_decay", torch.ones(2), ValueError, r"`weight_decay` must be a scalar .*shape \(2,\)"),
    ("epsilon", np.complex64(1e-7), TypeError, "`epsilon` must be a floating value.*complex64"),
    ("beta_1", object(), TypeError, "`beta_1` must be a floating value.*object"),
]


@pytest.mark.parametrize("name, value, error, match", REFUSED)
def test_what_keras_refuses_is_refused(name: str, value: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tfadam.keras.Adam(**{name: value})


@pytest.mark.parametrize("name, value", [("beta_1", lambda: 0.9), ("epsilon", "1e-7")])
def test_keras_fails_on_the_refused_values(name: str, value: Any) -> None:
    # Keras takes them at construction and fails at its first step.
    optimizer = keras.optimizers.Adam(**{name: value})
    with pytest.raises(Exception):  # noqa: B017 (Keras' own classes vary by value)
        optimizer.apply_gradients([(tf.ones([2]), tf.Variable(tf.ones([2])))])


def test_a_bad_hyperparameter_set_later_changes_nothing() -> None:
    w = torch.ones(3)
    optimizer = tfadam.keras.Adam(beta_1=np.float32(0.9))
    optimizer.apply_gradients([(torch.ones(3), w)])
    before = [t.clone() for t in [w, *optimizer.variables]]
    optimizer.beta_1 = "0.9"
    with pytest.raises(TypeError, match="Argument `beta_1` must be a real number"):
        optimizer.apply_gradients([(torch.ones(3), w)])
    after = [w, *optimizer.variables]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_get_config_keeps_the_values_as_given() -> None:
    beta_1 = np.float16(0.9)
    config = tfadam.keras.Adam(beta_1=beta_1).get_config()
    assert config["beta_1"] is beta_1
    assert tfadam.keras.Adam.from_config(config).get_config()["beta_1"] is beta_1


@pytest.mark.parametrize("sparse", [0.0, 1.0], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_keras_computes_numpy_float64_betas_otherwise_than_python_floats(dtype, sparse) -> None:
    # Why the refusal: taking np.float64(0.9) as the float 0.9 gives other bits.
    s = random_scenario(3, dtype=dtype, shapes=[(6, 3)], steps=4, sparse=sparse, scale=(-2, 0))
    s.config = dict(beta_1=np.float64(0.9), beta_2=np.float64(0.99))
    numpy_run = run_keras(s)
    s.config = dict(beta_1=0.9, beta_2=0.99)
    python_run = run_keras(s)
    assert differences(python_run[0] + python_run[1], numpy_run[0] + numpy_run[1])


@pytest.mark.parametrize("sparse", [0.0, 1.0], ids=["dense", "sparse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_float64_learning_rate_matches_keras(dtype: str, sparse: float) -> None:
    s = random_scenario(4, dtype=dtype, shapes=[(6, 3), (5,)], steps=5, sparse=sparse)
    s.config = dict(learning_rate=np.float64(0.01), epsilon=1e-3)
    expected, actual = run_keras(s), run_tfadam(s)
    assert not differences(expected[0] + expected[1], actual[0] + actual[1])


@pytest.mark.parametrize(
    "learning_rate",
    [np.float32(0.01), np.float16(0.01), np.array(0.01)],
    ids=["numpy-float32", "numpy-float16", "numpy-0d-array"],
)
def test_numpy_learning_rates_keras_refuses_are_refused(learning_rate: Any) -> None:
    message = "Argument `learning_rate` should be float"
    with pytest.raises(ValueError, match=message):
        keras.optimizers.Adam(learning_rate=learning_rate)
    with pytest.raises(ValueError, match=message):
        tfadam.keras.Adam(learning_rate=learning_rate)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_zero_stride_empty_variables_are_accepted_like_keras(shape: tuple[int, ...]) -> None:
    var = torch.from_numpy(np.zeros(shape, np.float32))
    grad = torch.from_numpy(np.zeros(shape, np.float32))
    assert 0 in var.stride()
    ours = tfadam.keras.Adam(learning_rate=0.1)
    ours.apply_gradients([(grad, var)])
    theirs = keras.optimizers.Adam(learning_rate=0.1)
    theirs.apply_gradients([(tf.constant(np.zeros(shape, np.float32)), tf.Variable(var.numpy()))])
    assert int(ours.iterations) == int(theirs.iterations.numpy()) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kind", ["numpy-float16", "numpy-float32", "numpy-float64", "numpy-0d-array"]
)
def test_callable_learning_rate_returning_numpy_matches_keras(kind: str, dtype: str) -> None:
    # Keras casts the callable's value with ops.cast, from the value's own
    # dtype: np.float64(0.01) is not float32(0.01) to a float64 variable.
    make = NON_PYTHON[kind]
    s = random_scenario(6, dtype=dtype, shapes=[(6, 3)], steps=4, scale=(-2, 0), sparse=0.5)
    s.config = dict(epsilon=1e-3)
    s.learning_rate = lambda side: lambda: make(0.01)
    expected, actual = run_keras(s), run_tfadam(s)
    assert not differences(expected[0] + expected[1], actual[0] + actual[1])
