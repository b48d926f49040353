"""tfadam against real ``tf.compat.v1.train.AdamOptimizer`` (TF2 eager), bit for bit.

After every call: every element of θ, m, v and both accumulators, for both
faces, dense and sparse gradients, all four float dtypes.
"""

import pytest
from scenarios import random_scenario
from tf_oracle import differences, run_tf_eager, run_tfadam

DTYPES = ["float16", "bfloat16", "float32", "float64"]
CONFIGS = 30


@pytest.mark.parametrize("seed", range(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_configurations_match_tf(dtype: str, seed: int) -> None:
    scenario = random_scenario(seed, dtype)
    expected = run_tf_eager(scenario)
    for face in ("tf1", "torch"):
        assert differences(expected, run_tfadam(scenario, face)) == [], face


@pytest.mark.parametrize("dtype", DTYPES)
def test_200_steps_match_tf(dtype: str) -> None:
    scenario = random_scenario(1000 + DTYPES.index(dtype), dtype, calls=200)
    expected = run_tf_eager(scenario)
    assert differences(expected, run_tfadam(scenario, "tf1")) == []
    assert differences(expected, run_tfadam(scenario, "torch")) == []
