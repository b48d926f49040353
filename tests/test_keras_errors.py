"""Keras' errors keep their meaning in ``tfadam.keras.Adam``; a failing call changes nothing.

Each case is raised by real Keras too (same exception type, same cause);
tfadam's message names the culprit and the fix.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from keras_oracle import bits, keras, tf  # noqa: E402

import tfadam  # noqa: E402
import tfadam.keras  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONSTRUCTOR_ERRORS = [
    (dict(clipnorm=1.0, clipvalue=1.0), ValueError, "Only one of"),
    (dict(clipnorm=1.0, global_clipnorm=1.0), ValueError, "Only one of"),
    (dict(gradient_accumulation_steps=1), ValueError, "must be an integer >= 2"),
    (dict(use_ema=True, ema_momentum=1.5), ValueError, "ema_momentum"),
    (dict(use_ema=True, ema_overwrite_frequency=0.5), ValueError, "ema_overwrite_frequency"),
    (dict(learning_rate=1), ValueError, "should be float"),
    (dict(learning_rate=np.float32(0.1)), ValueError, "should be float"),
    (dict(not_an_argument=3), ValueError, "not recognized"),
]


@pytest.mark.parametrize("kwargs, error, match", CONSTRUCTOR_ERRORS)
def test_constructor_errors_as_keras(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        keras.optimizers.Adam(**kwargs)
    with pytest.raises(error, match=match):
        tfadam.keras.Adam(**kwargs)


def test_callable_beta_rejected_early() -> None:
    # Keras takes it and fails at the first step (ValueError, "Attempt to
    # convert a value (<function>)"); tfadam says so at construction.
    k_opt = keras.optimizers.Adam(beta_1=lambda: 0.9)
    with pytest.raises(ValueError, match="Attempt to convert"):
        k_opt.apply_gradients([(tf.ones([2]), tf.Variable(tf.ones([2])))])
    with pytest.raises(ValueError, match="beta_1.*callable"):
        tfadam.keras.Adam(beta_1=lambda: 0.9)
    # A string is no number to Keras either (it fails at the first step).
    with pytest.raises(TypeError, match="Argument `epsilon` must be a real number"):
        tfadam.keras.Adam(epsilon="1e-7")


def _state(variables, optimizer):
    return [bits(t).copy() for t in [*variables, *optimizer.variables]]


def _trained(**kwargs):
    variables = [torch.randn(6, 3), torch.randn(4)]
    optimizer = tfadam.keras.Adam(**kwargs)
    for _ in range(3):
        optimizer.apply_gradients(
            [(torch.randn(6, 3), variables[0]), (torch.randn(4), variables[1])]
        )
    return variables, optimizer


def _assert_unchanged(variables, optimizer, before):
    after = _state(variables, optimizer)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert (a == b).all()


FAILING_CALLS = {
    "all gradients None": (
        {},
        lambda v: [(None, v[0]), (None, v[1])],
        ValueError,
        "No gradients provided",
    ),
    "index out of range": (
        dict(use_ema=True),
        lambda v: [
            (torch.ones(6, 3), v[0]),
            (tfadam.IndexedSlices(torch.ones(1), torch.tensor([4]), (4,)), v[1]),
        ],
        ValueError,
        "out of range",
    ),
    "shape mismatch": (
        dict(weight_decay=0.1),
        lambda v: [(torch.ones(6, 3), v[0]), (torch.ones(5), v[1])],
        ValueError,
        "shape",
    ),
    "dtype mismatch": (
        {},
        lambda v: [(torch.ones(6, 3), v[0]), (torch.ones(4, dtype=torch.float64), v[1])],
        TypeError,
        "float64",
    ),
    "unknown variable": (
        {},
        lambda v: [(torch.ones(6, 3), v[0]), (torch.ones(2), torch.zeros(2))],
        ValueError,
        "Unknown variable",
    ),
    "loss scale of an IndexedSlices": (
        dict(loss_scale_factor=4.0, gradient_accumulation_steps=2),
        lambda v: [
            (torch.ones(6, 3), v[0]),
            (tfadam.IndexedSlices(torch.ones(1), torch.tensor([1]), (4,)), v[1]),
        ],
        TypeError,
        "IndexedSlices",
    ),
    "learning rate callable raises": (
        dict(learning_rate=lambda: 1 / 0),
        lambda v: [(torch.ones(6, 3), v[0])],
        ZeroDivisionError,
        "",
    ),
    "not a tensor": (
        {},
        lambda v: [(torch.ones(6, 3), v[0]), (np.ones(4), v[1])],
        TypeError,
        "ndarray",
    ),
    "same variable twice": (
        {},
        lambda v: [(torch.ones(6, 3), v[0]), (torch.ones(6, 3), v[0])],
        ValueError,
        "once",
    ),
}


@pytest.mark.parametrize("name", sorted(FAILING_CALLS))
def test_failing_call_changes_nothing(name: str) -> None:
    kwargs, pairs, error, match = FAILING_CALLS[name]
    if name == "learning rate callable raises":
        calls = [0]

        def learning_rate():
            calls[0] += 1
            if calls[0] > 3:
                raise ZeroDivisionError("step 4")
            return 0.01

        kwargs = dict(learning_rate=learning_rate)
    variables, optimizer = _trained(**kwargs)
    before = _state(variables, optimizer)
    with pytest.raises(error, match=match):
        optimizer.apply_gradients(pairs(variables))
    _assert_unchanged(variables, optimizer, before)


def test_keras_raises_for_the_same_calls() -> None:
    variables = [tf.Variable(tf.ones([6, 3])), tf.Variable(tf.ones([4]))]
    optimizer = keras.optimizers.Adam(loss_scale_factor=4.0)
    optimizer.apply_gradients([(tf.ones([6, 3]), variables[0]), (tf.ones([4]), variables[1])])
    with pytest.raises(ValueError, match="No gradients provided"):
        optimizer.apply_gradients([(None, variables[0]), (None, variables[1])])
    with pytest.raises(ValueError, match="Unknown variable"):
        optimizer.apply_gradients([(tf.ones([2]), tf.Variable(tf.ones([2])))])
    sparse = tf.IndexedSlices(tf.ones([1]), tf.constant([1]), tf.constant([4]))
    with pytest.raises(TypeError, match="IndexedSlices"):
        optimizer.apply_gradients([(sparse, variables[1])])
    with pytest.raises(ValueError, match="must already be built"):
        keras.optimizers.Adam().apply([tf.ones([2])])
    mixed = keras.optimizers.Adam(global_clipnorm=1.0)
    with pytest.raises(tf.errors.InvalidArgumentError):
        mixed.apply_gradients(
            [
                (tf.ones([2], tf.float16), tf.Variable(tf.ones([2], tf.float16))),
                (tf.ones([2]), tf.Variable(tf.ones([2]))),
            ]
        )


def test_global_clipnorm_needs_one_dtype() -> None:
    a, b = torch.ones(2, dtype=torch.float16), torch.ones(2)
    optimizer = tfadam.keras.Adam(global_clipnorm=1.0)
    with pytest.raises(TypeError, match="one dtype"):
        optimizer.apply_gradients([(torch.ones(2, dtype=torch.float16), a), (torch.ones(2), b)])
    assert not optimizer.built and int(optimizer.iterations) == 0
    assert (a == 1).all() and (b == 1).all()


def test_apply_without_variables_needs_a_built_optimizer() -> None:
    optimizer = tfadam.keras.Adam()
    with pytest.raises(ValueError, match="must already be built"):
        optimizer.apply([torch.ones(2)])
    w = torch.ones(2)
    optimizer.build([w])
    with pytest.raises(ValueError, match="one-to-one"):
        optimizer.apply([torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="not yet been built"):
        tfadam.keras.Adam().set_weights([])
    with pytest.raises(ValueError, match="shape"):
        optimizer.set_weights([np.zeros(()), np.zeros(()), np.zeros(3), np.zeros(2)])
    assert int(optimizer.iterations) == 0


def test_some_gradients_none_warns_and_skips() -> None:
    a, b = torch.ones(2), torch.ones(3)
    optimizer = tfadam.keras.Adam(learning_rate=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.apply_gradients([(torch.ones(2), a), (None, b)])
    assert any("Gradients do not exist" in str(w.message) for w in caught)
    assert (b == 1).all() and (a != 1).all()
