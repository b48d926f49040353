"""The update rule of TensorFlow's Adam, written once and readably.

This module is the executable specification of tfadam: every fast kernel is
tested bit for bit against the functions here, and the functions here are
tested bit for bit against TensorFlow. It favours clarity over speed.

Arithmetic happens in the variable's dtype ``T``, every operation rounded to
``T`` in the order TensorFlow evaluates it, the way TF's CPU kernels do it
(see :class:`TFArithmetic`: float16/bfloat16 through float32, and subnormal
numbers flushed to zero).

Scalars that enter the elementwise rules are carried in :class:`Coefficients`
as Python floats that hold values exactly representable in ``T`` (a Python
float is a double, so it holds any float16, bfloat16, float32 or float64 value
without loss). Multiplying a ``T`` tensor by such a float rounds once, to ``T``.

Example:
    >>> import torch
    >>> from tfadam import rule
    >>> theta, g = torch.ones(3), torch.full((3,), 0.5)
    >>> m, v = torch.zeros(3), torch.zeros(3)
    >>> c = rule.tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                           beta1_power=0.9, beta2_power=0.999,
    ...                           dtype=torch.float32)
    >>> rule.dense_update(theta, m, v, g, c)
    >>> theta
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Numerics = Literal["eager", "graph"]
HyperValue = float | torch.Tensor


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded IEEE square root of ``x``, in ``x``'s dtype.

    Rounding trap: on CPU, torch 2.13's ``torch.sqrt`` is not correctly
    rounded (about 17% of float32 and 1% of float64 inputs are an ulp off).
    A square root taken in float64 and rounded once to a narrower format is
    correctly rounded even when the float64 result is an ulp off, because the
    square root of a p-bit number never lies within 2**-(2p+2) of a rounding
    midpoint. float64 itself goes through numpy, whose sqrt is IEEE.
    CUDA's ``sqrt`` is IEEE already.

    >>> exact_sqrt(torch.tensor([4.0, 2.0]))
    tensor([2.0000, 1.4142])
    """
    if x.device.type != "cpu":
        return torch.sqrt(x)
    if x.dtype == torch.float64:
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))
    return torch.sqrt(x.double()).to(x.dtype)


class TFArithmetic:
    """Elementwise arithmetic as TF's CPU kernels do it, for variables of dtype ``T``.

    * Each operation is computed in float32 for float16 and bfloat16 (in ``T``
      otherwise) and rounded to ``T``; that equals correctly rounded ``T``
      arithmetic for ``+ - * / sqrt``.
    * TF quirk, measured on the oracle: TF runs its kernels with the CPU's
      flush-to-zero and denormals-are-zero modes on. A subnormal operand counts
      as a zero of its sign, a subnormal result becomes one — for float32,
      float64 and bfloat16 (computed in float32). float16 is unaffected: its
      subnormals are normal numbers in float32. It shows e.g. in ``beta1_power``
      (0.5**150 is 0 in TF) and in rows whose m, v decay for many steps.

    * Conversions between ``T`` and float32 keep NaN bits as TF's do (x86's
      F16C for float16, Eigen's bfloat16 rounding); torch's own conversions
      make every float16 NaN 0x7fffffff and every float32 NaN bfloat16 0xffff.

    Operands are tensors or Python floats (coefficients, exact ``T`` values).

    >>> t = TFArithmetic(torch.float32)
    >>> t.mul(torch.tensor([1e-38, -1e-38, 1.0]), 0.5)
    tensor([0.0000, -0.0000, 0.5000])
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.flushes = dtype != torch.float16
        self.tiny = torch.finfo(self.compute).tiny

    def operand(self, x: torch.Tensor | float) -> torch.Tensor:
        """``x`` in the compute dtype, a subnormal read as zero."""
        if not isinstance(x, torch.Tensor):
            return self._flush(torch.tensor(x, dtype=self.compute))
        if x.dtype == torch.float16 and self.compute == torch.float32:
            return _float16_to_float32(x)
        return self._flush(x.to(self.compute))

    def cast(self, x: torch.Tensor | float) -> torch.Tensor:
        """``x`` rounded to ``T`` (TF's Cast)."""
        return self._result(self.operand(x))

    def add(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        return self._result(self.operand(a) + self.operand(b))

    def sub(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        return self._result(self.operand(a) - self.operand(b))

    def mul(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        return self._result(self.operand(a) * self.operand(b))

    def div(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        return self._result(self.operand(a) / self.operand(b))

    def sqrt(self, a: torch.Tensor) -> torch.Tensor:
        return self._result(exact_sqrt(self.operand(a)))

    def rsqrt(self, a: torch.Tensor) -> torch.Tensor:
        """``1 / sqrt(a)``: TF's Rsqrt for float16, bfloat16 and float64. (TF's
        float32 Rsqrt is a hardware approximation refined by Newton's method.)"""
        return self._result(1 / exact_sqrt(self.operand(a)))

    def maximum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._result(torch.maximum(self.operand(a), self.operand(b)))

    def _flush(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flushes:
            return x
        return torch.where(x.abs() < self.tiny, x * 0, x)  # x * 0 keeps the sign

    def _result(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flush(x)
        if self.dtype == torch.bfloat16 and x.dtype == torch.float32:
            return _float32_to_bfloat16(x)
        return x.to(self.dtype)


def _float16_to_float32(x: torch.Tensor) -> torch.Tensor:
    """As x86 ``vcvtph2ps``: a NaN keeps its sign and payload and becomes quiet."""
    wide = x.to(torch.float32)
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return wide
    half = x.view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((half >> 15) << 31) | 0x7FC00000 | ((half & 0x3FF) << 13)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return torch.where(nan, bits.view(torch.float32), wide)


def _float32_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """As Eigen's ``float_to_bfloat16_rtne``: a NaN becomes ±0x7fc0 (sign kept)."""
    narrow = x.to(torch.bfloat16)
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return narrow
    negative = (x.view(torch.int32) < 0).to(torch.int16)
    bits = torch.where(
        negative.bool(),
        torch.tensor(0xFFC0 - 2**16, dtype=torch.int16),
        torch.tensor(0x7FC0, dtype=torch.int16),
    )
    return torch.where(nan, bits.view(torch.bfloat16), narrow)


@dataclass(frozen=True)
class Coefficients:
    """The scalars of one Adam step for one variable dtype, each exactly a ``T``.

    Attributes:
        alpha: the bias-corrected step size, ``lr * sqrt(1 - β2^t) / (1 - β1^t)``
            (TF names it ``alpha`` in the dense kernel and ``lr`` in the sparse
            path; it is the same number).
        beta1, beta2: the decay rates.
        one_minus_beta1, one_minus_beta2: ``1 - β`` as the rule rounds them.
        epsilon: ε-hat, added to ``sqrt(v)``.
    """

    alpha: float
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    epsilon: float


def _scalar(value: HyperValue, dtype: torch.dtype) -> torch.Tensor:
    """A Python number becomes float32 first (TF's convert_to_tensor), then ``T``."""
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=torch.float32)
    return TFArithmetic(dtype).cast(value.detach().to("cpu").reshape(()))


def tf1_coefficients(
    *,
    lr: HyperValue,
    beta1: HyperValue,
    beta2: HyperValue,
    epsilon: HyperValue,
    beta1_power: HyperValue,
    beta2_power: HyperValue,
    dtype: torch.dtype,
) -> Coefficients:
    """TF1's ``_prepare`` + the kernel's scalar prelude, in dtype ``T``::

        b1p, b2p = T(beta1_power), T(beta2_power)
        alpha = (T(lr) * sqrt(T(1) - b2p)) / (T(1) - b1p)
        one_minus_beta = T(1) - T(β)

    Python numbers are float32 before they are ``T``: for a float64 variable
    ``lr=0.01`` is used as ``float64(float32(0.01))``, as in TF.

    >>> c = tf1_coefficients(lr=0.01, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                      beta1_power=0.9, beta2_power=0.999, dtype=torch.float64)
    >>> c.alpha == float(torch.tensor(0.01)) * (1 - float(torch.tensor(0.999))) ** 0.5 / (
    ...     1 - float(torch.tensor(0.9)))
    True
    """
    t = TFArithmetic(dtype)
    b1p, b2p = _scalar(beta1_power, dtype), _scalar(beta2_power, dtype)
    b1, b2 = _scalar(beta1, dtype), _scalar(beta2, dtype)
    alpha = t.div(t.mul(_scalar(lr, dtype), t.sqrt(t.sub(1.0, b2p))), t.sub(1.0, b1p))
    return Coefficients(
        alpha=alpha.item(),
        beta1=b1.item(),
        beta2=b2.item(),
        one_minus_beta1=t.sub(1.0, b1).item(),
        one_minus_beta2=t.sub(1.0, b2).item(),
        epsilon=_scalar(epsilon, dtype).item(),
    )


def advance_accumulators(
    beta1_power: torch.Tensor, beta2_power: torch.Tensor, beta1: HyperValue, beta2: HyperValue
) -> None:
    """After each apply call: ``beta_power = float32(beta_power * float32(β))``, in place.

    The accumulators are float32 whatever the variables' dtype (TF keeps them
    as float32 non-slot variables); like every TF op the product flushes
    subnormals to zero.
    """
    t = TFArithmetic(torch.float32)
    beta1_power.copy_(t.mul(beta1_power, _scalar(beta1, torch.float32)))
    beta2_power.copy_(t.mul(beta2_power, _scalar(beta2, torch.float32)))


def dense_update(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    c: Coefficients,
    *,
    nesterov: bool = False,
    vhat: torch.Tensor | None = None,
) -> None:
    """TF's fused ``ApplyAdam`` kernel on one variable, in place::

        m = m + (g - m) * (1 - β1)
        v = v + (g*g - v) * (1 - β2)
        θ = θ - (m * alpha) / (sqrt(v) + ε)

    nesterov replaces ``m`` in the last line by ``g*(1 - β1) + β1*m`` (the
    updated ``m``); amsgrad (``vhat`` given) keeps ``vhat = max(vhat, v)`` and
    divides by ``sqrt(vhat) + ε``.
    """
    t = TFArithmetic(theta.dtype)
    m.copy_(t.add(m, t.mul(t.sub(g, m), c.one_minus_beta1)))
    v.copy_(t.add(v, t.mul(t.sub(t.mul(g, g), v), c.one_minus_beta2)))
    if vhat is not None:
        vhat.copy_(t.maximum(vhat, v))
    denominator = t.add(t.sqrt(v if vhat is None else vhat), c.epsilon)
    if nesterov:
        numerator = t.add(t.mul(g, c.one_minus_beta1), t.mul(c.beta1, m))
    else:
        numerator = m
    theta.copy_(t.sub(theta, t.div(t.mul(numerator, c.alpha), denominator)))


def sparse_update(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    c: Coefficients,
    *,
    numerics: Numerics = "eager",
) -> None:
    """TF1 ``_apply_sparse`` on deduplicated rows: every row decays and moves::

        m = m * β1;   m[rows] = m[rows] + values * (1 - β1)
        v = v * β2;   v[rows] = v[rows] + (values * values) * (1 - β2)      eager
                      v[rows] = v[rows] + values * (values * (1 - β2))      graph
        θ = θ - (alpha * m) / (sqrt(v) + ε)

    ``rows`` must be unique and ``values`` summed per row (see
    :func:`tfadam.sparse.deduplicate`). The graph form is what Grappler's
    constant folding makes of the eager form when β2 is a constant; measured
    on the oracle, it does so for float32 and float64 variables only (float16
    and bfloat16 keep the eager rounding in a ``Session`` too). When ε is 0 in
    ``T`` (1e-8 is, in float16), Grappler also drops the ``+ ε`` and rewrites
    ``x / sqrt(v)`` as ``x * rsqrt(v)``; tfadam follows, exactly for float16,
    bfloat16 and float64 (see :meth:`TFArithmetic.rsqrt` for float32).
    """
    t = TFArithmetic(theta.dtype)
    m.copy_(t.mul(m, c.beta1))
    m[rows] = t.add(m[rows], t.mul(values, c.one_minus_beta1))
    v.copy_(t.mul(v, c.beta2))
    if numerics == "graph" and theta.dtype in (torch.float32, torch.float64):
        v_increment = t.mul(values, t.mul(values, c.one_minus_beta2))
    else:
        v_increment = t.mul(t.mul(values, values), c.one_minus_beta2)
    v[rows] = t.add(v[rows], v_increment)
    if numerics == "graph" and c.epsilon == 0:
        step = t.mul(t.mul(c.alpha, m), t.rsqrt(v))
    else:
        step = t.div(t.mul(c.alpha, m), t.add(t.sqrt(v), c.epsilon))
    theta.copy_(t.sub(theta, step))


def lazy_sparse_update(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    c: Coefficients,
) -> None:
    """LazyAdam on deduplicated rows: untouched rows keep θ, m and v::

    m[u] = β1 * m[u] + (1 - β1) * values
    v[u] = β2 * v[u] + (1 - β2) * (values * values)
    θ[u] = θ[u] - (alpha * m[u]) / (sqrt(v[u]) + ε)
    """
    t = TFArithmetic(theta.dtype)
    m_rows = t.add(t.mul(c.beta1, m[rows]), t.mul(c.one_minus_beta1, values))
    v_rows = t.add(t.mul(c.beta2, v[rows]), t.mul(c.one_minus_beta2, t.mul(values, values)))
    m[rows] = m_rows
    v[rows] = v_rows
    step = t.div(t.mul(c.alpha, m_rows), t.add(t.sqrt(v_rows), c.epsilon))
    theta[rows] = t.sub(theta[rows], step)
