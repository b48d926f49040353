"""``tfadam.keras.Adam`` against real Keras 3 (TF backend), bit for bit.

Every test drives ``keras.optimizers.Adam`` on ``tf.Variable``\\ s and
``tfadam.keras.Adam`` on torch tensors with the same initial values and
gradients, then compares every variable and every optimizer variable (Keras'
``optimizer.variables``, in order: iteration, learning_rate, EMA averages,
gradient accumulators, momentum/velocity, velocity_hat) element by element
as integers, so NaN payloads and signed zeros count.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import doctest  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from keras_oracle import (  # noqa: E402
    NP_DTYPES,
    Scenario,
    Sparse,
    bits,
    differences,
    keras,
    random_scenario,
    run_keras,
    run_tfadam,
    tf,
    to_torch,
)

import tfadam  # noqa: E402
import tfadam.keras  # noqa: E402
from tfadam import keras_rule, rule  # noqa: E402

schedules = keras.optimizers.schedules
# Random None gradients make both optimizers warn; torch warns about COO checks.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_torch():
    # TF's intra-op pool and torch's OpenMP threads fight over the cores when
    # both run in one process (torch ops get ~10x slower); these tests time neither.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(s: Scenario, what: str = "") -> None:
    keras_vars, keras_state = run_keras(s)
    tfadam_vars, tfadam_state = run_tfadam(s)
    assert differences(keras_vars, tfadam_vars) == [], f"variables differ {what}"
    assert differences(keras_state, tfadam_state) == [], f"optimizer variables differ {what}"


# --- 300 steps, a few rich configurations ------------------------------------------------

LONG = {
    "float32-defaults-sparse-none": dict(dtype="float32", sparse=0.5, none=0.1, config={}),
    "float16-amsgrad-decay": dict(
        dtype="float16",
        scale=(-3.0, 0.0),
        config=dict(learning_rate=0.01, amsgrad=True, weight_decay=0.05),
    ),
    "bfloat16-clipnorm-ema": dict(
        dtype="bfloat16",
        scale=(-3.0, 1.0),
        sparse=0.3,
        config=dict(clipnorm=0.5, use_ema=True, ema_momentum=0.95, ema_overwrite_frequency=25),
    ),
    "float64-global-clipnorm-accumulation": dict(
        dtype="float64",
        sparse=0.3,
        config=dict(global_clipnorm=0.7, gradient_accumulation_steps=3, beta_2=0.99),
    ),
    "float32-clipvalue-loss-scale-amsgrad": dict(
        dtype="float32",
        config=dict(clipvalue=0.2, loss_scale_factor=64.0, amsgrad=True, epsilon=1e-5),
    ),
}


@pytest.mark.parametrize("name", sorted(LONG))
def test_300_steps_bitwise(name: str) -> None:
    s = random_scenario(sorted(LONG).index(name), steps=300, **LONG[name])
    assert_same(s, name)


# --- many random configurations, fewer steps ---------------------------------------------


def _schedule_factory(kind: str, rng: np.random.Generator):
    # Draw everything now: both sides must get the same schedule.
    lr = float(10 ** rng.uniform(-3.5, -1.5))
    decay_steps = int(rng.integers(3, 20))
    if kind == "exponential":
        return lambda side: schedules.ExponentialDecay(lr, decay_steps, 0.9)
    if kind == "piecewise":
        return lambda side: schedules.PiecewiseConstantDecay([7, 20], [lr, lr / 2, lr / 10])
    if kind == "cosine":
        return lambda side: schedules.CosineDecay(lr, 30, alpha=0.1, warmup_target=2 * lr,
                                                  warmup_steps=5)  # fmt: skip
    if kind == "inverse_time":
        return lambda side: schedules.InverseTimeDecay(lr, 5, 0.5, staircase=True)

    def stateful(side: str):  # a fresh counter per side: call counts must agree
        calls = [0]

        def learning_rate():
            calls[0] += 1
            return lr * (1 + calls[0] % 5)

        return learning_rate

    return stateful


def random_case(seed: int) -> tuple[Scenario, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    dtype = str(rng.choice(["float32", "float32", "float16", "bfloat16", "float64"]))
    shapes = [tuple(int(d) for d in rng.integers(1, 40, size=int(rng.integers(0, 3))))
              for _ in range(int(rng.integers(1, 4)))]  # fmt: skip
    shapes[0] = (int(rng.integers(2, 50)), int(rng.integers(1, 9)))
    config: dict[str, Any] = dict(
        learning_rate=float(10 ** rng.uniform(-4, -1.3)),
        beta_1=float(rng.choice([0.9, rng.uniform(0.5, 0.99)])),
        beta_2=float(rng.choice([0.999, rng.uniform(0.9, 0.9999)])),
        epsilon=float(rng.choice([1e-7, 10 ** rng.uniform(-8, -3)])),
        amsgrad=bool(rng.random() < 0.3),
    )
    if rng.random() < 0.3:
        config["weight_decay"] = float(rng.uniform(0.001, 0.1))
    clip = rng.choice(["none", "clipnorm", "clipvalue", "global_clipnorm"])
    if clip != "none":
        config[str(clip)] = float(10 ** rng.uniform(-2, 0.5))
    if rng.random() < 0.3:
        config.update(use_ema=True, ema_momentum=float(rng.uniform(0.5, 0.999)))
        config["ema_overwrite_frequency"] = rng.choice([None, 3, 10])
    if rng.random() < 0.25:
        config["gradient_accumulation_steps"] = int(rng.integers(2, 5))
    sparse = float(rng.choice([0.0, 0.5]))
    if sparse == 0.0 and rng.random() < 0.3:
        config["loss_scale_factor"] = float(rng.choice([8.0, 1024.0]))
    # Gradient magnitudes 10**uniform(low, high); float16 must not overflow in g*g.
    low = float(rng.uniform(-4.0, -1.0))
    high = low + float(rng.uniform(1.0, 4.0))
    scale = (low, min(high, 0.0)) if dtype == "float16" else (low, high)
    s = random_scenario(seed, dtype=dtype, shapes=shapes, steps=40, sparse=sparse,
                        none=float(rng.choice([0.0, 0.2])), scale=scale,
                        config=config)  # fmt: skip
    if rng.random() < 0.35:
        kind = str(rng.choice(["exponential", "piecewise", "cosine", "inverse_time", "callable"]))
        s.learning_rate = _schedule_factory(kind, rng)
        config["learning_rate"] = kind
    return s, dict(config, dtype=dtype, shapes=shapes, sparse=sparse, scale=scale)


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations_bitwise(seed: int) -> None:
    s, described = random_case(seed)
    assert_same(s, f"seed {seed}: {described}")


def test_mixed_dtypes_in_one_optimizer() -> None:
    s = random_scenario(5, dtype=["float16", "bfloat16", "float64", "float32"],
                        shapes=[(20, 3), (31,), (7, 2), ()], steps=60, sparse=0.4, scale=(-3, 0),
                        config=dict(clipnorm=0.3, amsgrad=True, use_ema=True,
                                    weight_decay=0.01))  # fmt: skip
    assert_same(s)


@pytest.mark.parametrize(
    "dtype, shapes, config",
    [
        # Above ~108k float32 (~54k float64) elements TF splits the sum behind the
        # norm over its threads; the split changes the bits, and is reproduced.
        ("float32", [(400, 300), (60001,)], dict(clipnorm=1.0)),
        ("float32", [(400, 301), (129,)], dict(global_clipnorm=1.0)),
        ("float64", [(300, 201)], dict(clipnorm=1.0)),
        ("float16", [(400, 333)], dict(clipnorm=1.0)),
        ("bfloat16", [(400, 371)], dict(global_clipnorm=1.0)),
    ],
)
def test_norms_of_large_gradients(dtype: str, shapes: list, config: dict) -> None:
    scale = (-3.0, -1.0) if dtype == "float16" else (-3.0, 1.0)
    s = random_scenario(7, dtype=dtype, shapes=shapes, steps=4, scale=scale, config=config)
    assert_same(s)


def test_sparse_rows_with_many_repeats() -> None:
    # Keras squares an IndexedSlices' rows before TF sums repeated ones: v sees
    # the sum of squares. Few rows, many repeats makes that visible everywhere.
    s = random_scenario(9, shapes=[(6, 4)], steps=50, sparse=1.0, config=dict(amsgrad=True))
    assert_same(s)


def test_nan_and_inf_gradients_bitwise() -> None:
    rng = np.random.default_rng(3)
    for config in [{}, dict(clipnorm=1.0), dict(clipvalue=0.1), dict(global_clipnorm=1.0),
                   dict(amsgrad=True), dict(use_ema=True, weight_decay=0.1)]:  # fmt: skip
        s = random_scenario(2, steps=30, config=config)
        for call in s.calls:
            for g in call:
                if isinstance(g, np.ndarray) and g.ndim and rng.random() < 0.2:
                    g[rng.integers(0, g.shape[0])] = rng.choice([np.inf, -np.inf, np.nan, -0.0])
        assert_same(s, str(config))


def test_step_counter_in_narrow_dtypes() -> None:
    # Keras casts iterations + 1 to the variable dtype: bfloat16 rounds 257 to
    # 256, float16 overflows to inf above 65519. Start both optimizers there.
    for dtype, start in [("float16", 65500), ("bfloat16", 250), ("float16", 2040)]:
        s = random_scenario(4, dtype=dtype, shapes=[(8,)], steps=30, scale=(-2, 0))
        variables = [tf.Variable(x) for x in s.initial]
        k_opt = keras.optimizers.Adam()
        k_opt.build(variables)
        k_opt.iterations.assign(start)
        t_vars = [to_torch(x) for x in s.initial]
        t_opt = tfadam.keras.Adam()
        t_opt.build(t_vars)
        t_opt.set_weights([v.numpy() for v in k_opt.variables])
        for call in s.calls:
            k_opt.apply_gradients([(tf.constant(call[0]), variables[0])])
            t_opt.apply_gradients([(to_torch(call[0]), t_vars[0])])
        assert differences([v.numpy() for v in variables], t_vars) == [], dtype
        assert differences([v.numpy() for v in k_opt.variables], t_opt.variables) == [], dtype


def test_resume_from_keras_state() -> None:
    # Migrating a run: Keras trains, tfadam takes over its variables and state.
    config = dict(amsgrad=True, use_ema=True, gradient_accumulation_steps=2, weight_decay=0.01)
    s = random_scenario(12, steps=60, sparse=0.3, config=config)
    k_vars = [tf.Variable(x) for x in s.initial]
    k_opt = keras.optimizers.Adam(**config)

    def keras_step(call):
        k_opt.apply_gradients(zip(_keras_grads(call, s.initial), k_vars, strict=True))

    for call in s.calls[:31]:
        keras_step(call)
    t_vars = [to_torch(v.numpy()) for v in k_vars]
    t_opt = tfadam.keras.Adam(**config)
    t_opt.build(t_vars)
    t_opt.set_weights([v.numpy() for v in k_opt.variables])
    for call in s.calls[31:]:
        keras_step(call)
        t_opt.apply_gradients(zip(_tfadam_grads(call, s.initial), t_vars, strict=True))
    assert differences([v.numpy() for v in k_vars], t_vars) == []
    assert differences([v.numpy() for v in k_opt.variables], t_opt.variables) == []
    k_opt.finalize_variable_values(k_vars)
    t_opt.finalize_variable_values(t_vars)
    assert differences([v.numpy() for v in k_vars], t_vars) == []


def _keras_grads(call, initial):
    from keras_oracle import _keras_grad

    return [_keras_grad(g, x.shape) for g, x in zip(call, initial, strict=True)]


def _tfadam_grads(call, initial):
    from keras_oracle import _tfadam_grad

    return [_tfadam_grad(g, x.shape) for g, x in zip(call, initial, strict=True)]


def test_apply_without_variables_and_iterations_with_accumulation() -> None:
    s = random_scenario(13, shapes=[(5, 3), (4,)], steps=7)
    k_vars = [tf.Variable(x) for x in s.initial]
    t_vars = [to_torch(x) for x in s.initial]
    k_opt = keras.optimizers.Adam(gradient_accumulation_steps=2)
    t_opt = tfadam.keras.Adam(gradient_accumulation_steps=2)
    k_opt.build(k_vars)
    t_opt.build(t_vars)
    for call in s.calls:
        k_opt.apply([tf.constant(g) for g in call])
        t_opt.apply([to_torch(g) for g in call])
        assert int(t_opt.iterations) == int(k_opt.iterations)
    assert int(t_opt._iterations) == 7 and int(t_opt.iterations) == 3
    assert differences([v.numpy() for v in k_vars], t_vars) == []
    assert differences([v.numpy() for v in k_opt.variables], t_opt.variables) == []
    t_opt.apply([])  # Keras: an empty list of gradients is a no-op
    assert int(t_opt._iterations) == 7


def test_torch_sparse_coo_gradient_equals_indexed_slices() -> None:
    s = random_scenario(14, shapes=[(9, 3)], steps=10, sparse=1.0)
    a, b = to_torch(s.initial[0]), to_torch(s.initial[0])
    opt_a, opt_b = tfadam.keras.Adam(clipnorm=1.0), tfadam.keras.Adam(clipnorm=1.0)
    for (g,) in s.calls:
        assert isinstance(g, Sparse)
        values, indices = to_torch(g.values), torch.from_numpy(g.indices)
        opt_a.apply_gradients([(tfadam.IndexedSlices(values, indices, (9, 3)), a)])
        coo = torch.sparse_coo_tensor(indices[None], values, (9, 3))
        opt_b.apply_gradients([(coo, b)])
    assert (bits(a) == bits(b)).all()


def test_keras_schedule_object_shared_and_config_roundtrip() -> None:
    schedule = schedules.ExponentialDecay(0.01, 5, 0.8, staircase=True)
    k_opt = keras.optimizers.Adam(learning_rate=schedule, weight_decay=0.02, clipnorm=2.0)
    t_opt = tfadam.keras.Adam.from_config(k_opt.get_config())  # schedule serialized by Keras
    assert t_opt.get_config().keys() == k_opt.get_config().keys()
    s = random_scenario(15, shapes=[(11,)], steps=25)
    k_var, t_var = tf.Variable(s.initial[0]), to_torch(s.initial[0])
    for (g,) in s.calls:
        k_opt.apply_gradients([(tf.constant(g), k_var)])
        t_opt.apply_gradients([(to_torch(g), t_var)])
    assert (bits(k_var.numpy()) == bits(t_var)).all()
    assert bits(np.asarray(k_opt.learning_rate)) == bits(t_opt.learning_rate)
    again = tfadam.keras.Adam.from_config(tfadam.keras.Adam(learning_rate=0.25).get_config())
    assert float(again.learning_rate) == 0.25 and again.get_config()["epsilon"] == 1e-7


def test_learning_rate_setter_and_native_schedule() -> None:
    class Step(tfadam.keras.LearningRateSchedule):
        def __call__(self, step: int) -> float:
            return 0.01 if step < 5 else 0.001

        def get_config(self) -> dict:
            return {}

    k_var, t_var = tf.Variable(np.ones(4, np.float32)), torch.ones(4)
    k_opt = keras.optimizers.Adam(
        learning_rate=lambda: 0.01 if int(k_opt.iterations) < 5 else 0.001
    )
    t_opt = tfadam.keras.Adam(learning_rate=Step())
    for _ in range(8):
        k_opt.apply_gradients([(tf.constant([1.0, -2.0, 3.0, 0.5]), k_var)])
        t_opt.apply_gradients([(torch.tensor([1.0, -2.0, 3.0, 0.5]), t_var)])
    assert (bits(k_var.numpy()) == bits(t_var)).all()
    with pytest.raises(TypeError, match="not settable"):
        t_opt.learning_rate = 0.1
    fixed = tfadam.keras.Adam(learning_rate=0.1)
    fixed.learning_rate = 0.5
    assert fixed.learning_rate.dtype == torch.float32 and float(fixed.learning_rate) == 0.5


def test_tf_sum_matches_reduce_sum() -> None:
    # The order of TF's CPU sum (Eigen) for every dtype, across the sizes where
    # its tree and its thread split change shape; TF's own thread count here.
    rng = np.random.default_rng(0)
    sizes = [0, 1, 7, 8, 33, 1601, 8193, 54195, 108389, 131767, 148101, 250001]
    for name in ["float32", "float64", "float16", "bfloat16"]:
        for n in sizes:
            x = (rng.standard_normal(n) * (0.01 if name == "float16" else 1.0)).astype(
                NP_DTYPES[name]
            )
            expected = tf.reduce_sum(tf.constant(x)).numpy()
            got = keras_rule.tf_sum(to_torch(x), tfadam.keras._tf_intra_op_threads())
            assert bits(np.asarray(expected)) == bits(got), (name, n)


def test_scalar_power_matches_tf_pow() -> None:
    rng = np.random.default_rng(1)
    for name in ["float32", "float64", "float16", "bfloat16"]:
        dtype = {"float32": torch.float32, "float64": torch.float64,
                 "float16": torch.float16, "bfloat16": torch.bfloat16}[name]  # fmt: skip
        for base in [0.9, 0.999, 0.5, *rng.uniform(0.3, 0.99999, 6)]:
            for step in [1, 2, 3, 10, 57, 150, 257, 1000, 4097]:
                b = tf.cast(float(base), name)
                expected = tf.pow(b, tf.cast(step, name)).numpy()
                got = keras_rule.tf_scalar_power(
                    keras_rule.keras_cast(float(base), dtype),
                    torch.tensor(float(step)).to(dtype),
                )
                assert bits(np.asarray(expected)) == bits(got), (name, base, step)


def test_a_naive_transcription_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # The comparison can fail: TF1's scalar arithmetic (1 - β rounded after β,
    # β^t as a float32 running product) in Keras' face breaks most elements.
    def tf1_style(*, lr, beta_1, beta_2, epsilon, iterations, dtype):
        t = iterations + 1
        return rule.tf1_coefficients(
            lr=lr, beta1=beta_1, beta2=beta_2, epsilon=epsilon, dtype=dtype,
            beta1_power=np.float32(beta_1) ** t, beta2_power=np.float32(beta_2) ** t,
        )  # fmt: skip

    s = random_scenario(21, shapes=[(50, 40)], steps=300)
    keras_vars, _ = run_keras(s)
    monkeypatch.setattr(keras_rule, "keras_coefficients", tf1_style)
    naive_vars, _ = run_tfadam(s)
    wrong = int((bits(keras_vars[0]) != bits(naive_vars[0])).sum())
    assert wrong > 0.8 * 2000, wrong


SUBNORMAL_CASES = {
    "dense": dict(seed=2, steps=20, shapes=[(40,)]),
    # Keras' own update (not TF1's kernel) runs these two: it must flush as well.
    "amsgrad": dict(seed=2, steps=20, shapes=[(40,)], config=dict(amsgrad=True)),
    "sparse-repeats": dict(seed=9, steps=30, shapes=[(6, 4)], sparse=1.0),
}


@pytest.mark.parametrize("case", SUBNORMAL_CASES)
def test_subnormals_are_flushed_as_tf_flushes_them(case: str) -> None:
    # TF's CPU kernels run with flush-to-zero: a float32 g*g below 1.2e-38 is 0
    # there; tfmath.TFArithmetic flushes it too, so v agrees bit for bit.
    s = random_scenario(**SUBNORMAL_CASES[case], scale=(-30.0, -18.0))
    keras_vars, keras_state = run_keras(s)
    tfadam_vars, tfadam_state = run_tfadam(s)
    assert differences(keras_vars, tfadam_vars) == []
    assert differences(keras_state, tfadam_state) == []
    assert (keras_state[3] == 0).any()  # the scenario really produces flushed values


def test_doctests() -> None:
    for module in (tfadam.keras, keras_rule, rule):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_keras_inside_tf_function() -> None:
    # model.fit compiles the step with tf.function (XLA is off on CPU-only
    # machines by Keras' jit_compile="auto"); Grappler leaves Keras' Adam alone.
    from keras_oracle import _keras_grad

    config = dict(clipnorm=0.5, weight_decay=0.05, use_ema=True, gradient_accumulation_steps=2)
    s = random_scenario(17, shapes=[(12, 3), (7,)], steps=30, sparse=0.5, config=config)
    variables = [tf.Variable(x) for x in s.initial]
    optimizer = keras.optimizers.Adam(**config)
    optimizer.build(variables)

    @tf.function
    def step(grads):
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    for call in s.calls:
        step([_keras_grad(g, x.shape) for g, x in zip(call, s.initial, strict=True)])
    tfadam_vars, tfadam_state = run_tfadam(s)
    assert differences([v.numpy() for v in variables], tfadam_vars) == []
    assert differences([v.numpy() for v in optimizer.variables], tfadam_state) == []


def test_exclude_from_weight_decay_by_list_and_by_name() -> None:
    s = random_scenario(19, shapes=[(6, 2), (2,), (3,)], steps=20)
    names = ["kernel", "bias", "gain"]
    k_vars = [tf.Variable(x, name=n) for x, n in zip(s.initial, names, strict=True)]
    t_vars = [to_torch(x) for x in s.initial]
    k_opt = keras.optimizers.Adam(weight_decay=0.1, learning_rate=0.01)
    t_opt = tfadam.keras.Adam(weight_decay=0.1, learning_rate=0.01)
    k_opt.exclude_from_weight_decay(var_list=[k_vars[2]], var_names=["bias"])
    names = [("dense.kernel", t_vars[0]), ("dense.bias", t_vars[1]), ("gain", t_vars[2])]
    t_opt.exclude_from_weight_decay(var_list=[t_vars[2]], var_names=["bias"],
                                    named_parameters=names)  # fmt: skip
    for call in s.calls:
        k_opt.apply_gradients(zip([tf.constant(g) for g in call], k_vars, strict=True))
        t_opt.apply_gradients(zip([to_torch(g) for g in call], t_vars, strict=True))
    assert differences([v.numpy() for v in k_vars], t_vars) == []
    with pytest.raises(ValueError, match="named_parameters"):
        t_opt.exclude_from_weight_decay(var_names=["bias"])
