"""Numerics guards: ε that rounds to 0 warns once; NaN/Inf gradients by policy."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reliab_support import differences, torch_face_tensors

import tfadam
from tfadam import (
    BetaRoundsToOneWarning,
    EpsilonUnderflowWarning,
    NonFiniteGradientError,
    PrecisionWarning,
    engine,
)

# -- ε that the dtype cannot hold ----------------------------------------------------------------


def steps_with_warnings(
    make_step, count: int = 3, category: type[Warning] = EpsilonUnderflowWarning
) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            make_step()
    return [w for w in caught if issubclass(w.category, category)]


def torch_step(dtype: torch.dtype, **options):
    w = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    opt = tfadam.Adam([w], **options)

    def step():
        w.grad = torch.zeros(4, dtype=dtype)
        opt.step()

    return step, w


def test_float16_default_epsilon_warns_once_per_optimizer_naming_the_fix():
    step, w = torch_step(torch.float16)
    caught = steps_with_warnings(step)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "epsilon=1e-08 rounds to 0 in torch.float16" in message
    assert "5.96e-08" in message and "1e-4" in message and "float32 master weights" in message
    assert caught[0].filename == __file__  # points at the caller, past torch's wrappers
    # The warning is all it does: the update is TF's, 0/0 = NaN where v is 0.
    assert torch.isnan(w).all()
    second, _ = torch_step(torch.float16)
    assert len(steps_with_warnings(second)) == 1  # another optimizer warns again


@pytest.mark.parametrize(
    "dtype, eps",
    [(torch.float32, 1e-8), (torch.bfloat16, 1e-8), (torch.float64, 1e-8),
     (torch.float16, 1e-4), (torch.float16, 0.0)],
)  # fmt: skip
def test_no_warning_where_epsilon_survives_or_is_chosen_zero(dtype, eps):
    step, _ = torch_step(dtype, eps=eps)
    assert steps_with_warnings(step) == []


def test_float32_subnormal_epsilon_warns():
    # TF flushes float32 subnormals to zero: 1e-40 is 0 to its kernels.
    step, _ = torch_step(torch.float32, eps=1e-40)
    assert len(steps_with_warnings(step)) == 1


def test_bfloat16_default_beta2_rounds_to_one_warns():
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = tfadam.Adam([w])  # betas=(0.9, 0.999): 0.999 is 1.0 in bfloat16

    def step():
        w.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()

    caught = steps_with_warnings(step, category=PrecisionWarning)
    assert [w.category for w in caught] == [BetaRoundsToOneWarning]
    message = str(caught[0].message)
    assert "beta2=0.999 rounds to 1.0 in torch.bfloat16" in message
    assert "divides by epsilon alone" in message and "at most 0.99609375" in message
    # What it warns of (and TF computes): v stays 0, so steps of ~lr/epsilon, not ~lr.
    assert torch.all(opt.state[w]["v"] == 0) and torch.all(w.detach().abs() > 1000)


def test_tf1_face_warns_once_too():
    opt = tfadam.AdamOptimizer()
    var = torch.zeros(3, dtype=torch.float16)

    def step():
        opt.apply_gradients([(torch.ones(3, dtype=torch.float16), var)])

    caught = steps_with_warnings(step)
    assert len(caught) == 1 and "AdamOptimizer" in str(caught[0].message)


# -- NaN / Inf gradients -------------------------------------------------------------------------


def test_default_propagates_nan_as_tf_does():
    w = torch.nn.Parameter(torch.ones(3))
    opt = tfadam.Adam([w], lr=0.1)
    w.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert torch.isnan(w[1]) and not torch.isnan(w[[0, 2]]).any()


def test_raise_reports_step_parameter_counts_and_index():
    model = torch.nn.Linear(3, 2)
    opt = tfadam.Adam(model.named_parameters(), lr=0.1, nonfinite="raise")
    for _ in range(4):
        model.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    model.bias.grad[1] = math.inf
    model.weight.grad[1, 0] = math.nan
    model.weight.grad[0, 2] = -math.inf
    before = torch_face_tensors(opt)
    with pytest.raises(NonFiniteGradientError) as raised:
        opt.step()
    error = raised.value
    assert isinstance(error, ValueError)
    assert error.when == "step() #5"
    assert error.parameter == "param_groups[0]['params'][0] ('weight')"
    assert (error.nan, error.inf, error.index) == (1, 1, (0, 2))
    assert differences(before, torch_face_tensors(opt)) == []


def test_tf1_face_names_the_global_step():
    var, step = torch.zeros(2), torch.tensor(41)
    opt = tfadam.AdamOptimizer(nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match=r"apply_gradients #0 \(global_step 41\)"):
        opt.apply_gradients([(torch.tensor([0.0, math.inf]), var)], global_step=step)
    assert int(step) == 41


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_but_finite_gradients_are_not_a_false_alarm(dtype):
    # Their sum overflows (the fast check's shortcut); the exact scan clears them.
    big = torch.finfo(dtype).max
    grad = torch.full((1000,), big, dtype=dtype)
    w = torch.nn.Parameter(torch.zeros(1000, dtype=dtype))
    opt = tfadam.Adam([w], nonfinite="raise", eps=1e-3, betas=(0.9, 0.99))
    w.grad = grad
    opt.step()
    assert torch.isfinite(w).all()


def test_the_check_runs_in_prepare():
    """engine.prepare raises: nothing is executed, no slot is created."""
    theta, state = torch.zeros(2), {}
    update = engine.Update(theta, torch.tensor([math.nan, 0.0]), state, "theta")
    hyper = engine.resolve_all(0.1, 0.9, 0.999, 1e-8, "")
    with pytest.raises(NonFiniteGradientError, match="theta"):
        engine.prepare([update], hyper, engine.Options(nonfinite="raise"), when="test")
    assert state == {} and torch.equal(theta, torch.zeros(2))
    engine.prepare([update], hyper, engine.Options())  # "propagate" does not look


def test_unknown_policy_is_refused_at_construction():
    with pytest.raises(ValueError, match="nonfinite='warn': choose 'propagate'"):
        tfadam.Adam([torch.nn.Parameter(torch.ones(1))], nonfinite="warn")
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        tfadam.AdamOptimizer(nonfinite="ignore")


def test_policy_survives_load_state_dict_and_pickling():
    import pickle

    w = torch.nn.Parameter(torch.ones(2))
    opt = tfadam.Adam([w], nonfinite="raise")
    opt.load_state_dict(tfadam.Adam([w]).state_dict())
    clone = pickle.loads(pickle.dumps(opt))
    for o in (opt, clone):
        o.param_groups[0]["params"][0].grad = torch.tensor([math.nan, 0.0])
        with pytest.raises(NonFiniteGradientError):
            o.step()


def test_resolved_hyperparameters_keep_signed_zeros_apart() -> None:
    # resolve_all remembers valid float hyperparameters, keyed by their bits.
    for lr in (0.0, -0.0, 0.0, -0.0):
        assert math.copysign(1.0, engine.resolve_all(lr, 0.9, 0.999, 1e-8, "").lr) == math.copysign(
            1.0, lr
        )
    with pytest.raises(ValueError, match="beta1=1.0"):
        engine.resolve_all(0.1, 0.99999999, 0.999, 1e-8, "")  # 1.0 in float32, every time
    with pytest.raises(ValueError, match="beta1=1.0"):
        engine.resolve_all(0.1, 0.99999999, 0.999, 1e-8, "")
