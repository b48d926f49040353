"""NumPy and tensor hyperparameters in the Keras face, against live Keras 3.

Measured: Keras accepts a NumPy scalar, a 0-dim array or a tensor as
``beta_1``, ``beta_2`` and ``epsilon`` and computes with it in its own dtype
(its type promotion: ``1 - beta_1`` in that dtype, the products in the
promoted dtype), which changes the bits from a Python float of the same
value. tfadam.keras reproduces Keras' arithmetic for Python numbers only, so
it refuses the others — np.float64 included, a ``float`` subclass it used to
take as a Python float (wrong bits, shown below). A learning rate is a float
to Keras only if it is a ``float`` instance: ``np.float64`` is accepted (kept
in a float32 variable, as a Python float), ``np.float32`` and 0-dim arrays are
refused with a ``ValueError``, in both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from keras_oracle import differences, keras, random_scenario, run_keras, run_tfadam, tf

import tfadam.keras

DTYPES = ["float16", "bfloat16", "float32", "float64"]
NON_PYTHON = {
    "numpy-float16": np.float16,
    "numpy-float32": np.float32,
    "numpy-float64": np.float64,
    "numpy-0d-array": np.array,
    "torch-float64": lambda x: torch.tensor(x, dtype=torch.float64),
}


@pytest.mark.parametrize("name", ["beta_1", "beta_2", "epsilon"])
@pytest.mark.parametrize("kind", NON_PYTHON)
def test_non_python_betas_and_epsilon_are_refused(kind: str, name: str) -> None:
    value = NON_PYTHON[kind]({"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-3}[name])
    with pytest.raises(TypeError, match=f"Argument `{name}` must be a Python number"):
        tfadam.keras.Adam(**{name: value})


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
