"""TF1's Adam update rule (``tf.compat.v1.train.AdamOptimizer``), written once and readably.

This module is the executable specification of tfadam: every fast kernel is
tested bit for bit against the functions here, and the functions here are
tested bit for bit against TensorFlow. It favours clarity over speed. It
reads in the order TF executes an apply call:

1. **Coefficients** (:func:`tf1_coefficients`): the step's scalars from the
   hyperparameters and the ``beta_power`` accumulators, per variable dtype.
2. **Dense update** (:func:`dense_update`): TF's fused ``ApplyAdam`` kernel.
3. **Sparse update**: duplicate rows summed (:func:`deduplicate`), then
   every row decays and moves (:func:`sparse_update`), or LazyAdam's
   touched rows only (:func:`lazy_sparse_update`).
4. **Nesterov** (:func:`nesterov_numerator`) and **AMSGrad**
   (:func:`amsgrad_vhat`): the two kernel options, as TF's kernel varies the
   dense update.
5. **Accumulators** (:func:`advance_accumulators`): ``beta_power *= β``,
   after every variable has moved.

Arithmetic happens in the variable's dtype ``T``, every operation rounded to
``T`` in the order TensorFlow evaluates it, as :class:`tfadam.tfmath.TFArithmetic`
specifies (float16/bfloat16 through float32, subnormals flushed to zero, NaN
bits as x86 makes them). Keras' rule is beside this one, in :mod:`tfadam.keras_rule`.

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

import torch

from .tfmath import TFArithmetic

Numerics = Literal["eager", "graph"]
HyperValue = float | torch.Tensor


# --- 1. Coefficients: the step's scalars ----------------------------------------------


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


def cast_scalar(value: HyperValue, dtype: torch.dtype) -> torch.Tensor:
    """A hyperparameter as TF1 meets it in dtype ``T``: a Python number becomes
    float32 first (TF's convert_to_tensor), then ``T`` (TF's Cast); a tensor is cast.

    >>> cast_scalar(0.1, torch.float64).item() == float(torch.tensor(0.1))
    True
    """
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
    b1p, b2p = cast_scalar(beta1_power, dtype), cast_scalar(beta2_power, dtype)
    b1, b2 = cast_scalar(beta1, dtype), cast_scalar(beta2, dtype)
    alpha = t.div(t.mul(cast_scalar(lr, dtype), t.sqrt(t.sub(1.0, b2p))), t.sub(1.0, b1p))
    return Coefficients(
        alpha=alpha.item(),
        beta1=b1.item(),
        beta2=b2.item(),
        one_minus_beta1=t.sub(1.0, b1).item(),
        one_minus_beta2=t.sub(1.0, b2).item(),
        epsilon=cast_scalar(epsilon, dtype).item(),
    )


# --- 2. The dense update: TF's fused ApplyAdam kernel ---------------------------------


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

    With ``nesterov`` the last line's ``m`` is :func:`nesterov_numerator`;
    with AMSGrad (``vhat`` given) its ``v`` is :func:`amsgrad_vhat`.

    >>> theta, m, v = torch.ones(2), torch.zeros(2), torch.zeros(2)
    >>> c = tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                      beta1_power=0.9, beta2_power=0.999, dtype=torch.float32)
    >>> dense_update(theta, m, v, torch.tensor([1.0, -1.0]), c)
    >>> theta, m
    (tensor([0.9000, 1.1000]), tensor([ 0.1000, -0.1000]))
    """
    t = TFArithmetic(theta.dtype)
    swapped = vhat is not None and amsgrad_swaps_additions(theta.dtype)
    m.copy_(t.add(m, t.mul(t.sub(g, m), c.one_minus_beta1), swapped=swapped))
    v.copy_(t.add(v, t.mul(t.sub(t.mul(g, g), v), c.one_minus_beta2), swapped=swapped))
    second_moment = v if vhat is None else amsgrad_vhat(t, vhat, v)
    denominator = t.add(t.sqrt(second_moment), c.epsilon)
    numerator = nesterov_numerator(t, g, m, c) if nesterov else m
    theta.copy_(t.sub(theta, t.div(t.mul(numerator, c.alpha), denominator)))


# --- 3. The sparse update: IndexedSlices ----------------------------------------------


def deduplicate(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique rows and the sum of each row's values, in order of occurrence.

    TF (``unsorted_segment_sum``) accumulates each unique index's rows from
    zero, in the order they occur, rounding every addition to the gradient's
    dtype (as :class:`TFArithmetic` does) — for float16 and
    bfloat16 that differs from summing in float32 (as ``index_add_`` does).
    So the sum is built in rounds: round ``r`` adds every row's ``r``-th
    occurrence. The order of the returned rows is
    irrelevant to the update (rows are independent); they come sorted.
    """
    arithmetic = TFArithmetic(values.dtype)
    rows, position = torch.unique(indices, sorted=True, return_inverse=True)
    summed = values.new_zeros((rows.numel(), *values.shape[1:]))
    if indices.numel() == 0:
        return rows, summed
    order = torch.argsort(position, stable=True)  # occurrences grouped by row, in order
    row_of = position[order]
    counts = torch.bincount(position, minlength=rows.numel())
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=indices.device) - first[row_of]
    for r in range(int(counts.max())):
        chosen = rank == r
        targets = row_of[chosen]  # unique within a round
        summed[targets] = arithmetic.add(summed[targets], values[order[chosen]])
    return rows, summed


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


# --- 4. The kernel options: Nesterov and AMSGrad --------------------------------------


def nesterov_numerator(
    t: TFArithmetic, g: torch.Tensor, m: torch.Tensor, c: Coefficients
) -> torch.Tensor:
    """TF's ``use_nesterov``: the step's numerator is ``g*(1 - β1) + β1*m``, not ``m``.

    ``m`` is the updated first moment (TF's kernel reads it after the update).

    >>> t = TFArithmetic(torch.float32)
    >>> c = Coefficients(0.1, 0.5, 0.9, 0.5, 0.1, 0.0)
    >>> nesterov_numerator(t, torch.tensor([2.0]), torch.tensor([4.0]), c)
    tensor([3.])
    """
    return t.add(t.mul(g, c.one_minus_beta1), t.mul(c.beta1, m))


def amsgrad_vhat(t: TFArithmetic, vhat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """TF's ``ApplyAdamWithAmsgrad``: ``vhat = max(vhat, v)`` in place; the step divides by it.

    The maximum is Eigen's ``cwiseMax`` (:meth:`TFArithmetic.maximum`): a NaN
    ``v`` leaves ``vhat`` as it was.

    >>> vhat = torch.tensor([1.0, 3.0])
    >>> amsgrad_vhat(TFArithmetic(torch.float32), vhat, torch.tensor([2.0, float("nan")]))
    tensor([2., 3.])
    """
    vhat.copy_(t.maximum(vhat, v))
    return vhat


def amsgrad_swaps_additions(dtype: torch.dtype) -> bool:
    """Whether TF's AMSGrad kernel adds ``m + increment`` (and ``v``'s) the other way round.

    TF quirk (measured): in its float32/float64 AMSGrad kernel the compiled
    code adds these two the other way round, so where m (v) and the increment
    are both NaN, the increment's NaN wins.

    >>> amsgrad_swaps_additions(torch.float32), amsgrad_swaps_additions(torch.bfloat16)
    (True, False)
    """
    return dtype in (torch.float32, torch.float64)


# --- 5. After the update: the beta-power accumulators ---------------------------------


def advance_accumulators(
    beta1_power: torch.Tensor, beta2_power: torch.Tensor, beta1: HyperValue, beta2: HyperValue
) -> None:
    """After each apply call: ``beta_power = A(beta_power * β)``, in place, in its dtype ``A``.

    ``A`` is β's dtype as TF converts it (float32 for a Python float, whatever
    the variables' dtype; float64 for a NumPy float64, see :mod:`tfadam.hyper`);
    like every TF op the product flushes subnormals to zero.
    """
    for power, beta in ((beta1_power, beta1), (beta2_power, beta2)):
        t = TFArithmetic(power.dtype)
        power.copy_(t.mul(power, cast_scalar(beta, power.dtype)))
