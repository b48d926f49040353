"""The torch-free per-step scalars equal the rule's, bit for bit."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_cases import DTYPES

from tfadam import rule
from tfadam.kernels import scalars

FORMATS = {  # p, emin, largest
    torch.float16: (11, -14, 65504.0),
    torch.bfloat16: (8, -126, float.fromhex("0x1.fep127")),
    torch.float32: (24, -126, float.fromhex("0x1.fffffep127")),
}


def exact_round(x: float, dtype: torch.dtype) -> float:
    """Round-to-nearest-even by exact rational arithmetic (slow, obviously right)."""
    if dtype == torch.float64 or x == 0 or not math.isfinite(x):
        return x
    p, emin, largest = FORMATS[dtype]
    value = Fraction(x)
    exponent = max(math.floor(math.log2(abs(x))), emin)
    # math.log2 can be off by one near powers of two: fix the binade exactly
    while Fraction(2) ** exponent > abs(value) and exponent > emin:
        exponent -= 1
    while Fraction(2) ** (exponent + 1) <= abs(value):
        exponent += 1
    quantum = Fraction(2) ** (exponent - p + 1)
    q, r = divmod(value / quantum, 1)
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and q % 2 == 1):
        q += 1
    y = q * quantum
    if abs(y) > largest:
        return math.copysign(math.inf, x)
    return math.copysign(float(y), x)


doubles = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=300, deadline=None)
@given(x=doubles, dtype=st.sampled_from(list(FORMATS)))
def test_round_to_is_round_to_nearest_even(x: float, dtype: torch.dtype) -> None:
    expected = exact_round(x, dtype)
    got = scalars.round_to(x, dtype)
    assert math.copysign(1, got) == math.copysign(1, expected)
    assert got == expected


@pytest.mark.parametrize("dtype", list(FORMATS), ids=str)
def test_round_to_matches_torch_on_float32_values(dtype: torch.dtype) -> None:
    # torch's float32 -> T cast rounds once, so float32 inputs compare directly
    generator = torch.Generator().manual_seed(0)
    raw = torch.randint(-(2**31), 2**31, (20_000,), generator=generator, dtype=torch.int64)
    values = raw.to(torch.int32).view(torch.float32)
    values = values[torch.isfinite(values)]
    expected = values.to(dtype).double().tolist()
    got = [scalars.round_to(x, dtype) for x in values.double().tolist()]
    same = [
        (g == e and math.copysign(1, g) == math.copysign(1, e))
        for g, e in zip(got, expected, strict=True)
    ]
    assert all(same)


def assert_coefficients_equal_the_rule(args: dict[str, object]) -> None:
    expected = rule.tf1_coefficients(**args)  # type: ignore[arg-type]
    got = scalars.tf1_coefficients(**args)  # type: ignore[arg-type]
    for name in ("alpha", "beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "epsilon"):
        e, g = getattr(expected, name), getattr(got, name)
        same = e == g and math.copysign(1, e) == math.copysign(1, g)
        assert same or (e != e and g != g), (args, name, e, g)


hyper = st.one_of(
    st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    st.floats(min_value=1e-12, max_value=1e-2),
)
beta = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 0.999, 0.9999]), st.floats(0.0, 0.99999))
power = st.one_of(
    st.floats(min_value=1e-30, max_value=1.0),
    # subnormal or zero in float32, or beyond it (the engine passes validated ones)
    st.sampled_from([0.0, -0.0, 1e-40, 2.0**-127, 2.0**-126, 3.4e38, 1e39, 2.0]),
)


@settings(max_examples=300, deadline=None)
@given(
    lr=hyper,
    beta1=beta,
    beta2=beta,
    epsilon=hyper,
    beta1_power=power,
    beta2_power=power,
    dtype=st.sampled_from(DTYPES),
    as_tensor=st.sampled_from([None, torch.float32, torch.float64]),
    powers_as_floats=st.booleans(),
)
def test_coefficients_equal_the_rule(
    lr: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    beta1_power: float,
    beta2_power: float,
    dtype: torch.dtype,
    as_tensor: torch.dtype | None,
    powers_as_floats: bool,
) -> None:
    # the accumulators are float32 tensors, which the engine reads as Python
    # floats; lr may be a tensor (any dtype)
    powers: dict[str, float | torch.Tensor] = dict(beta1_power=beta1_power, beta2_power=beta2_power)
    if not powers_as_floats:
        powers = {k: torch.tensor(v, dtype=torch.float32) for k, v in powers.items()}
    lr_value = lr if as_tensor is None else torch.tensor(lr, dtype=as_tensor)
    args = dict(lr=lr_value, beta1=beta1, beta2=beta2, epsilon=epsilon, **powers, dtype=dtype)
    assert_coefficients_equal_the_rule(args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_coefficients_cache_tells_signed_zeros_apart(dtype: torch.dtype) -> None:
    # The per-hyperparameter part is cached; 0.0 == -0.0 as a key, not to TF.
    for lr in (0.0, -0.0, 0.0, -0.0):
        args = dict(lr=lr, beta1=0.9, beta2=0.999, epsilon=1e-8, dtype=dtype)
        powers = dict(beta1_power=torch.tensor(0.9), beta2_power=torch.tensor(0.999))
        got = scalars.tf1_coefficients(**args, **powers)  # type: ignore[arg-type]
        expected = rule.tf1_coefficients(**args, **powers)  # type: ignore[arg-type]
        assert (
            math.copysign(1, got.alpha) == math.copysign(1, expected.alpha) == math.copysign(1, lr)
        )


@settings(max_examples=200, deadline=None)
@given(beta1=beta, beta2=beta, b1p=power, b2p=power, as_tensor=st.booleans())
# a β subnormal in float32 counts as 0 (TF's denormals-are-zero), found by hypothesis
@example(beta1=0.0, beta2=1.2973100156539674e-39, b1p=1.0, b2p=3.4e38, as_tensor=False)
@example(beta1=1e-40, beta2=0.5, b1p=3.4e38, b2p=1e-40, as_tensor=True)
def test_advance_accumulators_equals_the_rule(
    beta1: float, beta2: float, b1p: float, b2p: float, as_tensor: bool
) -> None:
    expected = [torch.tensor(b1p), torch.tensor(b2p)]
    got = [t.clone() for t in expected]
    b1 = torch.tensor(beta1, dtype=torch.float64) if as_tensor else beta1
    rule.advance_accumulators(*expected, b1, beta2)
    scalars.advance_accumulators(*got, b1, beta2)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == torch.float32 and g.shape == ()
        assert torch.equal(e.view(torch.int32), g.view(torch.int32))


def test_accumulators_are_read_and_written_where_they_live() -> None:
    # Plain float32 CPU accumulators are read and written through memory: a
    # view's offset must be honoured and its neighbours left alone.
    big = torch.tensor([0.5, 0.9, 0.999, 0.25])
    expected = [torch.tensor(0.9), torch.tensor(0.999)]
    rule.advance_accumulators(*expected, 0.9, 0.999)
    scalars.advance_accumulators(big[1], big[2], 0.9, 0.999)
    assert torch.equal(big[1:3].view(torch.int32), torch.stack(expected).view(torch.int32))
    assert (big[0].item(), big[3].item()) == (0.5, 0.25)
    assert scalars.float32_value(big[3]) == 0.25
    # a negative view's memory holds the positive value: read through torch
    assert scalars.float32_value(torch._neg_view(torch.tensor(0.5))) == -0.5
    # a tensor subclass may have no memory of its own (data_ptr() is 0 here)
    from torch.testing._internal.two_tensor import TwoTensor

    assert scalars.float32_value(TwoTensor(torch.tensor(0.5), torch.tensor(0.5))) == 0.5
    # no memory of its own behind the tensor: read through torch, never at address 0
    assert scalars.float32_value(torch._efficientzerotensor((), dtype=torch.float32)) == 0.0
    assert scalars.float32_value(torch._to_functional_tensor(torch.tensor(0.5))) == 0.5
    gone = torch.tensor(0.5)
    gone.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="not allocated"):
        scalars.float32_value(gone)
    # a subclass (torch.nn.Parameter) is written through torch
    param = torch.nn.Parameter(torch.tensor(0.9), requires_grad=False)
    scalars.advance_accumulators(param, torch.tensor(0.999), 0.9, 0.999)
    assert param.item() == expected[0].item()


def test_float32_coefficients_from_floats_equal_the_rule() -> None:
    # The engine's common call (float32 variables, every input a Python float)
    # takes a shortcut through the same arithmetic: compare it on many draws.
    generator = torch.Generator().manual_seed(1)
    u = torch.rand(6, 3000, generator=generator, dtype=torch.float64).tolist()
    edges = [0.0, -0.0, 1e-45, 1e-40, 2.0**-126, 0.5, 1.0 - 2.0**-24, 1.0, 3.4e38, 1e39]
    for k in range(3000):
        lr = 10.0 ** (8 * u[0][k] - 8) if k % 7 else edges[k % len(edges)]
        beta1, beta2 = u[1][k], 1.0 - 10.0 ** (-6 * u[2][k])
        epsilon = 10.0 ** (-12 * u[3][k])
        b1p = u[4][k] ** (1 + 50 * u[5][k]) if k % 5 else edges[(k // 5) % len(edges)]
        b2p = u[5][k] if k % 3 else edges[(k // 3) % len(edges)]
        args = dict(lr=lr, beta1=beta1, beta2=beta2, epsilon=epsilon, beta1_power=b1p,
                    beta2_power=b2p, dtype=torch.float32)  # fmt: skip
        assert_coefficients_equal_the_rule(args)
