"""The update rule of TensorFlow's Adam, written once and readably.

This module is the executable specification of tfadam: every fast kernel is
tested bit for bit against the functions here, and the functions here are
tested bit for bit against TensorFlow. It favours clarity over speed.

Arithmetic happens in the variable's dtype ``T``, every operation rounded to
``T`` in the order TensorFlow evaluates it. For float16 and bfloat16, torch
computes each elementwise operation in float32 and rounds the result, which
equals correctly rounded ``T`` arithmetic for ``+ - * / sqrt``.

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
    return value.detach().to(device="cpu", dtype=dtype)


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
    one = torch.ones((), dtype=dtype)
    b1p, b2p = _scalar(beta1_power, dtype), _scalar(beta2_power, dtype)
    b1, b2 = _scalar(beta1, dtype), _scalar(beta2, dtype)
    alpha = (_scalar(lr, dtype) * exact_sqrt(one - b2p)) / (one - b1p)
    return Coefficients(
        alpha=alpha.item(),
        beta1=b1.item(),
        beta2=b2.item(),
        one_minus_beta1=(one - b1).item(),
        one_minus_beta2=(one - b2).item(),
        epsilon=_scalar(epsilon, dtype).item(),
    )


def advance_accumulators(
    beta1_power: torch.Tensor, beta2_power: torch.Tensor, beta1: HyperValue, beta2: HyperValue
) -> None:
    """After each apply call: ``beta_power = float32(beta_power * float32(β))``, in place.

    The accumulators are float32 whatever the variables' dtype (TF keeps them
    as float32 non-slot variables).
    """
    beta1_power.mul_(_scalar(beta1, torch.float32))
    beta2_power.mul_(_scalar(beta2, torch.float32))


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
    m.add_((g - m) * c.one_minus_beta1)
    v.add_((g * g - v) * c.one_minus_beta2)
    if vhat is not None:
        torch.maximum(vhat, v, out=vhat)
    denominator = exact_sqrt(v if vhat is None else vhat) + c.epsilon
    numerator = g * c.one_minus_beta1 + c.beta1 * m if nesterov else m
    theta.sub_((numerator * c.alpha) / denominator)


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
    constant folding makes of the eager form when β2 is a constant.
    """
    m.mul_(c.beta1)
    m.index_add_(0, rows, values * c.one_minus_beta1)
    v.mul_(c.beta2)
    if numerics == "graph":
        v_increment = values * (values * c.one_minus_beta2)
    else:
        v_increment = (values * values) * c.one_minus_beta2
    v.index_add_(0, rows, v_increment)
    theta.sub_((c.alpha * m) / (exact_sqrt(v) + c.epsilon))


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
    m_rows = c.beta1 * m[rows] + c.one_minus_beta1 * values
    v_rows = c.beta2 * v[rows] + c.one_minus_beta2 * (values * values)
    m[rows] = m_rows
    v[rows] = v_rows
    theta[rows] = theta[rows] - (c.alpha * m_rows) / (exact_sqrt(v_rows) + c.epsilon)
