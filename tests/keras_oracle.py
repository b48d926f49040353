"""Drive real Keras 3 (TF backend) and ``tfadam.keras.Adam`` with the same inputs.

A :class:`Scenario` is a set of initial variables and a stream of calls; each
call gives every variable a dense gradient, a sparse one (indices, values) or
None. :func:`run_keras` replays it through ``keras.optimizers.Adam`` on
``tf.Variable``\\ s, :func:`run_tfadam` through ``tfadam.keras.Adam`` on torch
tensors. Both return the variables and the optimizer's ``variables`` (Keras'
order) as numpy arrays, which :func:`differences` compares bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from tf_oracle import NP_DTYPES, UINT, bits, to_torch  # noqa: E402, F401

import tfadam  # noqa: E402
import tfadam.keras  # noqa: E402


@dataclasses.dataclass
class Sparse:
    indices: np.ndarray
    values: np.ndarray


Grad = np.ndarray | Sparse | None


@dataclasses.dataclass
class Scenario:
    initial: list[np.ndarray]
    calls: list[list[Grad]]
    config: dict[str, Any]
    # Built fresh on each side: (keras schedule or callable, tfadam equivalent).
    learning_rate: Callable[[str], Any] | None = None


def random_scenario(
    seed: int,
    *,
    dtype: str | list[str] = "float32",
    shapes: list[tuple[int, ...]] | None = None,
    steps: int = 300,
    sparse: float = 0.0,
    none: float = 0.0,
    scale: tuple[float, float] = (-3.0, 1.0),
    config: dict[str, Any] | None = None,
) -> Scenario:
    """Random variables and gradients: magnitudes 10**uniform(scale), per element.

    ``sparse`` is the chance a matrix variable's gradient is an IndexedSlices
    (rows drawn with repeats), ``none`` the chance a gradient is None (never
    all of them).
    """
    rng = np.random.default_rng(seed)
    shapes = shapes or [(37, 5), (101,), ()]
    dtypes = [dtype] * len(shapes) if isinstance(dtype, str) else dtype

    def draw(shape: tuple[int, ...], name: str) -> np.ndarray:
        magnitude = 10.0 ** rng.uniform(*scale, size=shape)
        return (rng.standard_normal(shape) * magnitude).astype(NP_DTYPES[name])

    initial = [draw(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    calls = []
    for _ in range(steps):
        call: list[Grad] = []
        for shape, name in zip(shapes, dtypes, strict=True):
            if rng.random() < none:
                call.append(None)
            elif len(shape) >= 1 and shape[0] > 1 and rng.random() < sparse:
                k = int(rng.integers(1, 2 * shape[0]))
                indices = rng.integers(0, shape[0], size=k)
                call.append(Sparse(indices, draw((k, *shape[1:]), name)))
            else:
                call.append(draw(shape, name))
        if all(g is None for g in call):
            call[0] = draw(shapes[0], dtypes[0])
        calls.append(call)
    return Scenario(initial, calls, dict(config or {}))


def _keras_grad(g: Grad, shape: tuple[int, ...]) -> Any:
    if g is None:
        return None
    if isinstance(g, Sparse):
        return tf.IndexedSlices(
            tf.constant(g.values), tf.constant(g.indices, tf.int64), tf.constant(shape, tf.int64)
        )
    return tf.constant(g)


def _tfadam_grad(g: Grad, shape: tuple[int, ...]) -> Any:
    if g is None:
        return None
    if isinstance(g, Sparse):
        return tfadam.IndexedSlices(to_torch(g.values), torch.from_numpy(g.indices), shape)
    return to_torch(g)


def run_keras(s: Scenario) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Replay ``s`` through ``keras.optimizers.Adam``; the variables and optimizer state."""
    variables = [tf.Variable(x) for x in s.initial]
    config = dict(s.config)
    if s.learning_rate is not None:
        config["learning_rate"] = s.learning_rate("keras")
    optimizer = keras.optimizers.Adam(**config)
    for call in s.calls:
        optimizer.apply_gradients(
            [
                (_keras_grad(g, x.shape), v)
                for g, x, v in zip(call, s.initial, variables, strict=True)
            ]
        )
    return [v.numpy() for v in variables], [np.asarray(v.numpy()) for v in optimizer.variables]


def run_tfadam(
    s: Scenario, optimizer_class: type = tfadam.keras.Adam
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Replay ``s`` through ``tfadam.keras.Adam``; the variables and optimizer state."""
    variables = [to_torch(x) for x in s.initial]
    config = dict(s.config)
    if s.learning_rate is not None:
        config["learning_rate"] = s.learning_rate("tfadam")
    optimizer = optimizer_class(**config)
    for call in s.calls:
        optimizer.apply_gradients(
            [
                (_tfadam_grad(g, x.shape), v)
                for g, x, v in zip(call, s.initial, variables, strict=True)
            ]
        )
    return list(variables), list(optimizer.variables)  # type: ignore[arg-type]


def differences(expected: list[Any], actual: list[Any]) -> list[str]:
    """Human-readable bitwise differences between two lists of tensors or arrays."""
    if len(expected) != len(actual):
        return [f"{len(expected)} tensors expected, got {len(actual)}"]
    found = []
    for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
        e_bits, a_bits = bits(e), bits(a)
        if e_bits.shape != a_bits.shape or e_bits.dtype != a_bits.dtype:
            found.append(
                f"#{i}: shape/dtype {e_bits.shape}/{e_bits.dtype} vs {a_bits.shape}/{a_bits.dtype}"
            )
            continue
        wrong = int((e_bits != a_bits).sum())
        if wrong:
            found.append(f"#{i}: {wrong} of {e_bits.size} elements differ")
    return found
