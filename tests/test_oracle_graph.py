"""``numerics="graph"`` against TF1 graph mode (a ``Session``, default Grappler).

Grappler's constant folding rewrites the sparse second-moment increment when
β2 is a constant; tfadam's ``numerics="graph"`` reproduces it bit for bit.
"""

import pytest
from scenarios import random_scenario
from tf_oracle import Hyper, differences, run_tf_eager, run_tf_graph, run_tfadam

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def constant_hyperparameters(seed: int, dtype: str, calls: int = 10):
    scenario = random_scenario(seed, dtype, calls=calls)
    for name in ("lr", "beta1", "beta2", "epsilon"):
        setattr(scenario, name, Hyper([getattr(scenario, name).values[0]], "number"))
    return scenario


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", DTYPES)
def test_graph_numerics_match_a_tf1_session(dtype: str, seed: int) -> None:
    scenario = constant_hyperparameters(100 + seed, dtype)
    expected = run_tf_graph(scenario)
    assert differences(expected, run_tfadam(scenario, "tf1", numerics="graph")) == []
    assert differences(expected, run_tfadam(scenario, "torch", numerics="graph")) == []


def test_graph_and_eager_modes_really_differ_on_sparse_updates() -> None:
    """The two modes give different bits, so each must be proven separately."""
    scenario = constant_hyperparameters(7, "float32", calls=9)
    graph, eager = run_tf_graph(scenario), run_tf_eager(scenario)
    assert differences(graph, eager) != []
    assert differences(graph, run_tfadam(scenario, "tf1", numerics="eager")) != []


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_mode_with_beta2_as_a_variable_is_not_folded(dtype: str) -> None:
    """With β2 a placeholder, Grappler cannot fold (1 - β2): the eager rounding
    holds. tfadam's analogue: β2 given as a tensor keeps the eager formula."""
    scenario = constant_hyperparameters(3, dtype)
    expected = run_tf_graph(scenario, beta2_as_variable=True)
    scenario.beta2 = Hyper(scenario.beta2.values, "tensor")
    assert differences(expected, run_tfadam(scenario, "tf1", numerics="graph")) == []


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_graph_mode_with_epsilon_zero_uses_rsqrt(dtype: str) -> None:
    """ε = 0 in T: Grappler drops the + ε and turns x / sqrt(v) into x * rsqrt(v)."""
    scenario = constant_hyperparameters(11, dtype)
    scenario.epsilon = Hyper([0.0 if dtype == "float64" else 1e-9], "number")
    expected = run_tf_graph(scenario)
    assert differences(expected, run_tfadam(scenario, "tf1", numerics="graph")) == []
