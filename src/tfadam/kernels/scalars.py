"""The per-step scalars of :mod:`tfadam.rule`, computed without torch ops.

:func:`tfadam.rule.tf1_coefficients` builds ~15 tiny tensors per dtype and
step (~90 µs); :func:`tf1_coefficients` here computes the same numbers with
Python floats (~10 µs), which matters when the step itself is short (many
small parameters, lazy sparse steps). It is proven equal to the rule by the
tests, and falls back to the rule whenever a hyperparameter or an
accumulator is a tensor of a dtype other than float32 (TF casts such a tensor
from its own dtype, and keeps the accumulators in β's dtype: see
:mod:`tfadam.hyper`; the rule reproduces those casts).

Why Python floats are exact here: every operation is computed in float64 and
rounded once to ``T``. For ``+ - * / sqrt`` on ``T`` values, rounding the
float64 result to ``T`` equals the correctly rounded ``T`` result whenever
float64 carries at least ``2p + 2`` bits for ``T``'s ``p`` (53 >= 50 for
float32, and more so for float16 and bfloat16) — the classical
innocuous-double-rounding bound. float64 itself is Python's IEEE arithmetic.

Example:
    >>> import torch
    >>> from tfadam import rule
    >>> args = dict(lr=1e-3, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...             beta1_power=torch.tensor(0.9), beta2_power=torch.tensor(0.999))
    >>> tf1_coefficients(**args, dtype=torch.bfloat16) == rule.tf1_coefficients(
    ...     **args, dtype=torch.bfloat16)
    True
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
from collections.abc import Callable

import torch

from .. import rule

# (significand bits p, minimum normal exponent, largest finite value)
_FORMATS = {
    torch.float16: (11, -14, 65504.0),
    torch.bfloat16: (8, -126, float.fromhex("0x1.fep127")),
    torch.float32: (24, -126, float.fromhex("0x1.fffffep127")),
}


_F32 = struct.Struct("f")
_F16 = struct.Struct("e")


def round_to(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to the nearest value of ``dtype`` (ties to even), as a float.

    Overflow gives ±inf; NaN, ±inf and ±0 are kept.

    >>> round_to(0.1, torch.float16), round_to(65520.0, torch.float16)
    (0.0999755859375, inf)
    """
    if dtype == torch.float64:
        return float(x)
    # struct's float32/float16 packing rounds to nearest even (C's cast and
    # PyFloat_Pack2), but raises on overflow: that case goes the long way.
    try:
        if dtype == torch.float32:
            return _F32.unpack(_F32.pack(x))[0]
        if dtype == torch.float16:
            return _F16.unpack(_F16.pack(x))[0]
    except OverflowError:
        pass
    return _round_format(x, *_FORMATS[dtype])


def _round_format(x: float, p: int, emin: int, largest: float) -> float:
    """Round to ``p`` significand bits, exponents >= ``emin`` (then subnormal)."""
    if x == 0.0 or not math.isfinite(x):
        return float(x)
    if abs(x) >= 2 * largest:  # certainly inf, and the scaling below could overflow
        return math.copysign(math.inf, x)
    _, e = math.frexp(x)  # |x| = m * 2**e, 0.5 <= m < 1: x's exponent is e - 1
    quantum = max(e - 1, emin) - (p - 1)  # the exponent of one ulp (subnormals: fixed)
    # Scaling by a power of two is exact; round() of a float is exact, ties to even.
    y = math.ldexp(round(math.ldexp(x, -quantum)), quantum)
    if abs(y) > largest:
        return math.copysign(math.inf, x)
    return math.copysign(y, x)  # a tiny negative x rounds to -0.0


def _divide(a: float, b: float) -> float:
    """IEEE division (Python raises on a zero divisor; TF gives ±inf or NaN)."""
    if b != 0.0:
        return a / b
    if a == 0.0 or a != a:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _sqrt(x: float) -> float:
    """IEEE square root (Python raises below zero; TF gives NaN)."""
    return math.sqrt(x) if x >= 0.0 or x != x else math.nan


def _float32(value: float) -> float:
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return _round_format(value, *_FORMATS[torch.float32])


def _as_float32(value: rule.HyperValue) -> float | None:
    """The float32 value TF uses for a hyperparameter; None if it is not ours to cast."""
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.float32:
            return None
        return float32_value(value)
    return _float32(float(value))


def _address(t: torch.Tensor) -> int:
    """Where a plain one-element float32 CPU tensor keeps its value, or 0: read it through torch.

    0 too for a negative view (its memory holds the other sign) and an
    inference tensor (not writable outside inference mode); ``data_ptr()``
    itself is 0 for a tensor with no memory of its own behind it (a zero
    tensor, a functional wrapper).
    """
    if (
        type(t) is torch.Tensor
        and t.is_cpu
        and t.dtype is torch.float32
        and t.numel() == 1
        and not t.is_neg()
        and not t.is_inference()
    ):
        return t.data_ptr()
    return 0


def float32_value(t: torch.Tensor) -> float:
    """The value of a one-element float32 tensor (``t.item()``).

    A plain CPU tensor is read from its memory: no torch op. After a step's
    memory traffic has flushed the caches, each torch op (dispatcher, then
    kernel) costs ~10-20 µs, and a step reads and writes its accumulators
    several times.

    >>> float32_value(torch.tensor(0.81))
    0.8100000023841858
    """
    address = _address(t)
    if address:
        return ctypes.c_float.from_address(address).value
    return float(t.item())


def tf1_coefficients(
    *,
    lr: rule.HyperValue,
    beta1: rule.HyperValue,
    beta2: rule.HyperValue,
    epsilon: rule.HyperValue,
    beta1_power: rule.HyperValue,
    beta2_power: rule.HyperValue,
    dtype: torch.dtype,
) -> rule.Coefficients:
    """Exactly :func:`tfadam.rule.tf1_coefficients`, with Python floats::

    b1p, b2p = T(beta1_power), T(beta2_power)
    alpha = (T(lr) * sqrt(T(1) - b2p)) / (T(1) - b1p)
    one_minus_beta = T(1) - T(β)

    every operation rounded to ``T``; numbers are float32 before they are ``T``.

    >>> c = tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                      beta1_power=0.9, beta2_power=0.999, dtype=torch.float32)
    >>> c.alpha, c.one_minus_beta1
    (0.031622566282749176, 0.10000002384185791)
    """
    t: Callable[[float], float]
    if (
        dtype is torch.float32
        and type(lr) is float
        and type(beta1) is float
        and type(beta2) is float
        and type(epsilon) is float
        and type(beta1_power) is float
        and type(beta2_power) is float
    ):
        # The engine's common call, in few Python calls: each costs ~1 µs once
        # the step's memory traffic has flushed the caches.
        t = _f32_ftz
        hypers = _HYPERS.pack(lr, beta1, beta2, epsilon)  # type: ignore[arg-type]
        powers = (beta1_power, beta2_power)
    else:
        values = [_as_float32(x) for x in (lr, beta1, beta2, epsilon, beta1_power, beta2_power)]
        if None in values:
            return rule.tf1_coefficients(
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                epsilon=epsilon,
                beta1_power=beta1_power,
                beta2_power=beta2_power,
                dtype=dtype,
            )
        t = functools.partial(_tf_round, dtype=dtype)
        hypers = _HYPERS.pack(*values[:4])
        powers = values[4:]  # type: ignore[assignment]
    # Keyed by the bits: 0.0 == -0.0 as dict keys, but not as TF's operands.
    lr_t, b1, b2, eps, omb1, omb2 = _constant_part(hypers, dtype)
    b1p, b2p = t(powers[0]), t(powers[1])  # type: ignore[arg-type]
    alpha = t(_divide(t(lr_t * t(_sqrt(t(1.0 - b2p)))), t(1.0 - b1p)))
    return rule.Coefficients(
        alpha=alpha,
        beta1=b1,
        beta2=b2,
        one_minus_beta1=omb1,
        one_minus_beta2=omb2,
        epsilon=eps,
    )


_HYPERS = struct.Struct("4d")


@functools.lru_cache(maxsize=64)
def _constant_part(
    hypers: bytes, dtype: torch.dtype
) -> tuple[float, float, float, float, float, float]:
    # What does not change from step to step while the hyperparameters do not:
    # T(lr), T(β1), T(β2), T(ε), T(1) - T(β1), T(1) - T(β2). Numbers are float32
    # before they are T (a no-op for values that already are).
    lr_t, b1, b2, eps = (_tf_round(_float32(x), dtype) for x in _HYPERS.unpack(hypers))
    return lr_t, b1, b2, eps, _tf_round(1.0 - b1, dtype), _tf_round(1.0 - b2, dtype)


_TINY = {torch.float32: 2.0**-126, torch.float64: 2.0**-1022}


def _f32_ftz(x: float) -> float:
    """:func:`_tf_round` for ``T`` = float32 (a number is float32 before it is T), in one call."""
    try:
        y: float = _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return _tf_round(x, torch.float32)
    return y if abs(y) >= 2.0**-126 or y == 0.0 or y != y else math.copysign(0.0, y)


def _tf_round(x: float, dtype: torch.dtype) -> float:
    """``x`` as a TF CPU kernel leaves it in ``T``: rounded to the compute type
    (float32 for float16/bfloat16), a subnormal flushed to a signed zero (not
    for float16, see :class:`tfadam.tfmath.TFArithmetic`), then rounded to ``T``.

    >>> _tf_round(1e-39, torch.float32), _tf_round(-1e-39, torch.bfloat16)
    (0.0, -0.0)
    """
    if dtype == torch.float16:
        return round_to(x, dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    y = round_to(x, compute)
    if abs(y) < _TINY[compute]:
        y = math.copysign(0.0, y)
    return round_to(y, dtype)


def advance_accumulators(
    beta1_power: torch.Tensor,
    beta2_power: torch.Tensor,
    beta1: rule.HyperValue,
    beta2: rule.HyperValue,
) -> None:
    """Exactly :func:`tfadam.rule.advance_accumulators`, in place, without temporaries::

    beta_power = float32(beta_power * float32(β))

    (the product of two float32 values is exact in float64, so one rounding
    to float32 is the float32 product). As in every TF op, subnormal operands
    count as zero and a subnormal product is flushed to zero.

    >>> b1p, b2p = torch.tensor(0.9), torch.tensor(0.999)
    >>> advance_accumulators(b1p, b2p, 0.9, 0.999)
    >>> float(b1p)
    0.809999942779541
    """
    betas = [_as_float32(beta1), _as_float32(beta2)]
    powers = (beta1_power, beta2_power)
    if (
        betas[0] is None
        or betas[1] is None
        or beta1_power.dtype != torch.float32
        or beta2_power.dtype != torch.float32
        or not beta1_power.is_cpu
        or not beta2_power.is_cpu
    ):
        rule.advance_accumulators(beta1_power, beta2_power, beta1, beta2)
        return
    for power, beta in zip(powers, betas, strict=True):
        address = _address(power)  # (see float32_value)
        cell = ctypes.c_float.from_address(address) if address else None
        value = float(power.item()) if cell is None else cell.value
        new = _f32_ftz(_f32_ftz(value) * _f32_ftz(beta))  # type: ignore[arg-type]
        if cell is None:
            power.fill_(new)
        else:
            # Like the kernels' writes to θ, m and v (and torch's fused Adam's to
            # its parameters) this leaves the version counter alone: bumping it
            # cost ~40 µs a step, cold.
            cell.value = new
