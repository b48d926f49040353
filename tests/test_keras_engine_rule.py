"""The engine's ``Options(rule="keras")``: Keras' update, dispatched by the engine.

The Keras face hands its updates to ``engine.execute`` with ``rule="keras"``;
the engine runs ``keras_rule.keras_only_update`` where Keras' update is not
TF1's (AMSGrad, repeated sparse rows, typed hyperparameters promoted beyond
the variable's dtype) and TF1's kernel elsewhere. Each case here is compared
bit for bit with :func:`tfadam.keras_rule.keras_update`, the readable rule
(itself proven against live Keras in test_keras*.py); the TF1 rule on the
same inputs gives other bits where the two differ, so the dispatch matters.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tf_oracle import bits

from tfadam import IndexedSlices, engine, keras_rule
from tfadam.hyper import Resolution
from tfadam.tfmath import TFArithmetic

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NO_HYPER = Resolution(0.0, 0.0, 0.0, 0.0)
ROWS = torch.tensor([1, 3, 1, 1])  # repeated rows
UNIQUE = torch.tensor([0, 3])

# name: (gradient kind, amsgrad, beta_1, TF1's rule gives other bits on these finite inputs)
# (AMSGrad differs from TF1's kernel in NaN bits only: test_keras.py covers those.)
CASES: dict[str, tuple[str, bool, Any, bool]] = {
    "dense": ("dense", False, 0.9, False),
    "sparse-unique-rows": ("unique", False, 0.9, False),
    "sparse-repeated-rows": ("repeated", False, 0.9, True),
    "amsgrad-dense": ("dense", True, 0.9, False),
    "amsgrad-sparse-repeated-rows": ("repeated", True, 0.9, True),
    "float64-tensor-beta": ("dense", False, torch.tensor(0.9, dtype=torch.float64), True),
}


def _gradient(kind: str, dtype: torch.dtype, gen: torch.Generator) -> Any:
    if kind == "dense":
        return torch.randn(5, 3, generator=gen).to(dtype)
    indices = ROWS if kind == "repeated" else UNIQUE
    values = torch.randn(len(indices), 3, generator=gen).to(dtype)
    return IndexedSlices(values, indices, (5, 3))


def _reference(theta, m, v, vhat, g, c) -> None:
    """keras_rule.keras_update on the densified gradient (squares summed for repeated rows)."""
    g_squared = None
    if isinstance(g, IndexedSlices):
        squares = TFArithmetic(theta.dtype).mul(g.values, g.values)
        g_squared = keras_rule.keras_densify(g.indices, squares, theta.shape)
        g = keras_rule.keras_densify(g.indices, g.values, theta.shape)
    keras_rule.keras_update(theta, m, v, g, c, g_squared=g_squared, vhat=vhat)


def _run(case: str, dtype: torch.dtype, rule: str) -> list[torch.Tensor]:
    kind, amsgrad, beta_1, _ = CASES[case]
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(5, 3, generator=gen).to(dtype)
    state: dict[str, torch.Tensor] = {}
    counter = torch.zeros((), dtype=torch.int64)
    for step in range(3):
        g = _gradient(kind, dtype, gen)
        schedule = keras_rule.Iterations(counter, step, torch.tensor(0.01), beta_1, 0.999, 1e-7)
        if rule == "reference":
            if not state:
                names = ["m", "v", "vhat"] if amsgrad else ["m", "v"]
                state = {name: torch.zeros_like(theta) for name in names}
            c = schedule.coefficients(dtype)
            _reference(theta, state["m"], state["v"], state.get("vhat"), g, c)
            schedule.advance()
            continue
        options = engine.Options(amsgrad=amsgrad, rule=rule)
        plan = engine.prepare([engine.Update(theta, g, state, "theta")], NO_HYPER, options)
        engine.execute(plan, schedule)
    assert int(counter) == 3
    return [theta, *state.values()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_the_engine_runs_keras_rule(case: str, dtype: torch.dtype) -> None:
    expected = _run(case, dtype, "reference")
    actual = _run(case, dtype, "keras")
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert (bits(e) == bits(a)).all(), case


@pytest.mark.parametrize("case", [name for name, row in CASES.items() if row[3]])
def test_where_keras_differs_tf1s_kernel_gives_other_bits(case: str) -> None:
    # The dispatch is not a formality: TF1's rule (same coefficients) differs.
    dtype = torch.float32
    expected = _run(case, dtype, "reference")
    tf1 = _run(case, dtype, "tf1")
    assert any((bits(e) != bits(a)).any() for e, a in zip(expected, tf1, strict=True))


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(rule="Keras"), ValueError, "rule='Keras': choose 'tf1'"),
        (dict(rule=None), ValueError, "rule=None: choose 'tf1'"),
        (dict(rule="keras", nesterov=True), ValueError, "rule='keras' has no nesterov"),
        (dict(rule="keras", sparse="lazy"), ValueError, "rule='keras' has no nesterov or lazy"),
    ],
)
def test_the_rule_option_is_parsed_strictly(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        engine.Options(**options)
