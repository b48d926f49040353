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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import compat

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
        root = torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))
    else:
        root = torch.sqrt(x.double()).to(x.dtype)
    if x.dtype in _DEFAULT_NAN:
        # The square root of a negative number (-inf too) is x86's default NaN,
        # sign set, as in TF (measured); torch's sqrt gives +NaN.
        negative = x < 0
        if bool(negative.any()):
            bits = torch.tensor(_DEFAULT_NAN[x.dtype], dtype=_INT_OF[x.dtype]).view(x.dtype)
            root = torch.where(negative, bits, root)
    return root


# x86's default NaN (what an invalid operation returns): sign set, quiet, no
# payload; and the bit that makes a NaN quiet. In the compute dtypes only.
_DEFAULT_NAN = {torch.float32: -0x00400000, torch.float64: -0x0008000000000000}
_QUIET_BIT = {torch.float32: 0x00400000, torch.float64: 1 << 51}
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """Zero (keeping the sign) where ``x`` is subnormal in its dtype.

    TF's CPU kernels run with the x86 flush-to-zero mode on; this applies it
    to a result (float16 is exempt: TF computes it in float32, where no
    float16 value is subnormal).
    """
    if x.dtype == torch.float16:
        return x
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x.abs() < tiny, x * 0, x)


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

    def add(
        self, a: torch.Tensor | float, b: torch.Tensor | float, *, swapped: bool = False
    ) -> torch.Tensor:
        """``a + b``; where both are NaN, ``a``'s NaN (``b``'s if ``swapped``: TF's
        compiler swapped the operands)."""
        a, b = self.operand(a), self.operand(b)
        return self._result(_first_nan(b, a, a + b) if swapped else _first_nan(a, b, a + b))

    def sub(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        a, b = self.operand(a), self.operand(b)
        return self._result(_first_nan(a, b, a - b))

    def mul(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        a, b = self.operand(a), self.operand(b)
        return self._result(_first_nan(a, b, a * b))

    def div(self, a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
        a, b = self.operand(a), self.operand(b)
        return self._result(_first_nan(a, b, a / b))

    def sqrt(self, a: torch.Tensor) -> torch.Tensor:
        return self._result(exact_sqrt(self.operand(a)))

    def rsqrt(self, a: torch.Tensor) -> torch.Tensor:
        """``1 / sqrt(a)``: TF's Rsqrt for float16, bfloat16 and float64. (TF's
        float32 Rsqrt is a hardware approximation refined by Newton's method.)"""
        return self._result(1 / exact_sqrt(self.operand(a)))

    def maximum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Eigen's ``cwiseMax`` in TF's AMSGrad kernel: ``b if a < b else a``.

        Measured on the oracle: a NaN ``b`` (a NaN gradient's ``v``) leaves
        ``a`` (``vhat``) as it was, unlike ``torch.maximum``, which propagates it.
        """
        a, b = self.operand(a), self.operand(b)
        return self._result(torch.where(a < b, b, a))

    def _flush(self, x: torch.Tensor) -> torch.Tensor:
        return flush_subnormal(x) if self.flushes else x

    def _result(self, x: torch.Tensor) -> torch.Tensor:
        x = self._flush(x)
        if self.dtype == torch.bfloat16 and x.dtype == torch.float32:
            return _float32_to_bfloat16(x)
        if self.dtype == torch.float16 and x.dtype == torch.float32:
            return compat.float32_to_float16(x)  # NaN bits differ between torch versions
        return x.to(self.dtype)


def _first_nan(a: torch.Tensor, b: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` where ``a`` and ``b`` are both NaN replaced by ``a``'s NaN, made quiet.

    x86's rule for two NaN operands (SSE/AVX ``op dst, a, b`` returns ``a``'s),
    applied in the order TF's source writes each operation; measured on the
    oracle, TF follows it except where its compiler swapped operands or Eigen's
    loop position decides (see the README). Torch's own kernels give no such
    guarantee: for ``a + b`` or ``a - b`` their choice can depend on the
    element's position (vectorised body or scalar tail).
    """
    if a.dim() == 0 and b.dim() == 0 and not (bool(torch.isnan(a)) and bool(torch.isnan(b))):
        return result
    both = torch.isnan(a) & torch.isnan(b)
    if not bool(both.any()):
        return result
    quiet_bits = a.expand_as(result).contiguous().view(_INT_OF[a.dtype]) | _QUIET_BIT[a.dtype]
    a_quiet = quiet_bits.view(a.dtype)
    return torch.where(both, a_quiet, result)


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


# --- Keras 3 (TF2): tf.keras.optimizers.Adam with the TensorFlow backend -------------
#
# Keras meets Python numbers in two ways, and they round differently:
# ``ops.cast(x, T)`` is ``tf.cast``, which makes a float32 tensor first (so a
# float64 variable sees float64(float32(x)), as in TF1); an arithmetic op
# (``ops.multiply(t, x)``, ``t + x``) converts ``x`` straight to ``T`` when ``T``
# is float64 and through float32 otherwise.


def keras_cast(value: HyperValue, dtype: torch.dtype) -> torch.Tensor:
    """``ops.cast(value, T)``: a Python number becomes float32, then ``T``; a tensor is cast.

    >>> keras_cast(0.01, torch.float64).item() == float(torch.tensor(0.01))
    True
    """
    return _scalar(value, dtype)


def keras_literal(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A Python number as a Keras arithmetic op converts it for a ``T`` tensor.

    float64 keeps the double; float32 rounds it once; float16 and bfloat16
    round it to float32 first (TF converts Python floats through float32).

    >>> keras_literal(1 - 0.999, torch.float64).item() == 1 - 0.999
    True
    >>> one_minus_beta = torch.tensor(1.0) - torch.tensor(0.9)  # TF1 rounds β first
    >>> keras_literal(1 - 0.9, torch.float32).item() == one_minus_beta.item()
    False
    """
    if dtype == torch.float64:
        return torch.tensor(float(value), dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float32).to(dtype)


def tf_scalar_power(base: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``tf.pow`` of two 0-dim ``T`` tensors, as TF's CPU kernel computes it.

    On a single element Eigen calls the C library: ``pow`` for float64,
    ``powf`` for float32, and ``T(powf(float(a), float(b)))`` for float16 and
    bfloat16; the result is flushed to zero when subnormal. Python's
    ``math.pow`` and numpy's float32 scalar power call those same functions.
    ``torch.pow`` does not (it is vectorised differently), so it is not used.

    >>> tf_scalar_power(torch.tensor(0.9), torch.tensor(3.0)).item() == float(
    ...     np.float32(0.9) ** np.float32(3))
    True
    """
    dtype = base.dtype
    if dtype == torch.float64:
        result = torch.tensor(math.pow(base.item(), exponent.item()), dtype=torch.float64)
    else:
        with np.errstate(all="ignore"):
            value = np.float32(base.item()) ** np.float32(exponent.item())
        result = torch.tensor(float(value), dtype=torch.float32)
    return flush_subnormal(result).to(dtype)


# Eigen's full sum, as TF 2.21's x86-64 CPU build runs ``tf.reduce_sum(x)`` (AVX
# packets: 8 floats, 4 doubles, 8 halves; bfloat16 is summed as float32 and
# rounded once). Keras' clipnorm and global_clipnorm take norms with it, and
# float addition is not associative, so the order below is part of the rule.
_PACKET = {torch.float16: 8, torch.float32: 8, torch.float64: 4}
_LEAF = {torch.float16: 200, torch.float32: 1024, torch.float64: 1024}
# Eigen's cost model (TensorCostModel): cycles per coefficient = bytes * 11/64 (L2
# load) + compute, where the reducer's compute cost is the default 10 per packet.
_COST_PER_COEFF = {
    torch.float16: 2 * 11 / 64 + 10 / 8,
    torch.bfloat16: 2 * 11 / 64 / 8 + 1 / 8 + 10 / 8,  # through a float32 cast
    torch.float32: 4 * 11 / 64 + 10 / 8,
    torch.float64: 8 * 11 / 64 + 10 / 4,
}


def _predux(lanes: np.ndarray) -> np.floating:
    """Eigen's horizontal sum of one AVX packet: halves added, then SSE's pairs."""
    if lanes.dtype == np.float16:  # Packet8h: summed as float32, rounded once
        return np.float16(_predux(lanes.astype(np.float32)))
    half = lanes[: lanes.size // 2] + lanes[lanes.size // 2 :]
    if half.size == 4:
        return (half[0] + half[2]) + (half[1] + half[3])
    return half[0] + half[1]


def _sum_leaf(x: np.ndarray, packet: int) -> np.floating:
    """``InnerMostDimReducer`` without the tree: 4 packet accumulators, a tail."""
    n, start = x.size, 0
    accumulator = np.zeros(packet, x.dtype)
    if n >= 4 * packet:
        start = (n // (4 * packet)) * 4 * packet
        # numpy adds along a leading axis row by row: each lane in order.
        lanes = np.add.reduce(x[:start].reshape(-1, 4, packet), axis=0)
        accumulator = ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3]
    while start + packet <= n:
        accumulator = accumulator + x[start : start + packet]
        start += packet
    scalar = x.dtype.type(0)
    for value in x[start:]:
        scalar = x.dtype.type(scalar + value)
    return x.dtype.type(scalar + _predux(accumulator))


def _sum_tree(x: np.ndarray, first: int, n: int, packet: int, leaf: int) -> np.floating:
    """Eigen's tree reduction: halves split on a packet boundary above ``packet*leaf``."""
    if n <= packet * leaf:
        return _sum_leaf(x[first : first + n], packet)
    split = packet * -(-(first + -(-n // 2)) // packet)
    left = min(split - first, n)
    total = x.dtype.type(0) + _sum_tree(x, first, left, packet, leaf)
    if left < n:
        total = x.dtype.type(total + _sum_tree(x, split, n - left, packet, leaf))
    return total


def tf_sum(x: torch.Tensor, max_threads: int) -> torch.Tensor:
    """``tf.reduce_sum(x)`` over every element, in TF's CPU order, as a 0-dim tensor.

    Eigen splits the sum over up to ``max_threads`` threads (TF's intra-op
    pool: by default one per CPU) when its cost model says it pays: blocks of
    ``n // threads`` elements, each a tree of packet sums, added in order
    after the remainder. The result depends on that thread count.

    >>> tf_sum(torch.arange(10.0), max_threads=1)
    tensor(45.)
    """
    dtype = x.dtype
    work = torch.float32 if dtype == torch.bfloat16 else dtype
    values = x.detach().reshape(-1).to("cpu", work).numpy()
    packet, leaf, n = _PACKET[work], _LEAF[work], values.size
    threads = int((n * _COST_PER_COEFF[dtype] - 100000) / 100000 + 0.9)
    threads = max(1, min(max_threads, threads))
    with np.errstate(all="ignore"):
        if threads == 1:
            total = _sum_tree(values, 0, n, packet, leaf)
        else:
            block = n // threads
            blocks = n // block
            total = values.dtype.type(0)
            if blocks * block < n:
                total = _sum_tree(values, blocks * block, n - blocks * block, packet, leaf)
            for i in range(blocks):
                total = values.dtype.type(total + _sum_tree(values, i * block, block, packet, leaf))
    return torch.tensor(total, dtype=work).to(dtype)


def keras_coefficients(
    *,
    lr: HyperValue,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    iterations: int,
    dtype: torch.dtype,
) -> Coefficients:
    """The scalar prelude of Keras 3's ``Adam.update_step``, in dtype ``T``::

        t = T(iterations + 1)                       # int64 counter cast (via float32 unless f64)
        β1^t = pow(T(float32(β1)), t)               # tf.pow, C library, see tf_scalar_power
        alpha = (T(lr) * sqrt(T(1) - β2^t)) / (T(1) - β1^t)
        one_minus_beta = T(1 - β)                   # 1 - β in Python double, then converted
        epsilon = T(ε)                              # converted as a literal

    ``lr`` is the learning rate as Keras holds it (a float32 tensor for a
    float learning rate, a schedule's output) or a Python number (a callable's
    output), cast with :func:`keras_cast`. Unlike TF1, ``1 - β`` is rounded
    once from double (TF1 rounds β first), and ``β^t`` is a power, not a
    running product: for float32 both change the bits.

    >>> c = keras_coefficients(lr=torch.tensor(0.001), beta_1=0.9, beta_2=0.999,
    ...                        epsilon=1e-7, iterations=0, dtype=torch.float32)
    >>> c.one_minus_beta1 == float(torch.tensor(1 - 0.9)), c.one_minus_beta1 == float(
    ...     torch.tensor(1.0) - torch.tensor(0.9))
    (True, False)
    """
    one = torch.ones((), dtype=dtype)
    step_type = torch.float64 if dtype == torch.float64 else torch.float32
    step = torch.tensor(float(iterations + 1), dtype=step_type).to(dtype)
    b1, b2 = keras_cast(beta_1, dtype), keras_cast(beta_2, dtype)
    beta1_power = tf_scalar_power(b1, step)
    beta2_power = tf_scalar_power(b2, step)
    alpha = (keras_cast(lr, dtype) * exact_sqrt(one - beta2_power)) / (one - beta1_power)
    return Coefficients(
        alpha=alpha.item(),
        beta1=b1.item(),
        beta2=b2.item(),
        one_minus_beta1=keras_literal(1 - beta_1, dtype).item(),
        one_minus_beta2=keras_literal(1 - beta_2, dtype).item(),
        epsilon=keras_literal(epsilon, dtype).item(),
    )


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
    # TF quirk (measured): in its float32/float64 AMSGrad kernel the compiled
    # code adds these two the other way round, so where m (v) and the increment
    # are both NaN, the increment's NaN wins.
    swapped = vhat is not None and theta.dtype in (torch.float32, torch.float64)
    m.copy_(t.add(m, t.mul(t.sub(g, m), c.one_minus_beta1), swapped=swapped))
    v.copy_(t.add(v, t.mul(t.sub(t.mul(g, g), v), c.one_minus_beta2), swapped=swapped))
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


# --- Keras 3 (TF2): what Keras does around the Adam update --------------------------
#
# Each function below is one piece of Keras' ``BaseOptimizer`` / ``TFOptimizer``
# arithmetic, every operation rounded to ``T`` (the gradient's and variable's
# dtype) in Keras' order. Python numbers enter as :func:`keras_literal` (an
# arithmetic op) or :func:`keras_cast` (``ops.cast``), exactly as Keras meets them.


def tf_maximum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``tf.maximum`` on CPU (Eigen, PropagateNaN): a NaN operand comes back with its own bits.

    ``torch.maximum`` returns a canonical NaN instead, which changes the sign
    bit of NaNs made by ``inf - inf``. On equal values the second operand wins.

    >>> nan = torch.tensor([float("nan")]).neg()
    >>> tf_maximum(torch.tensor([1.0]), nan).view(torch.int32) == nan.view(torch.int32)
    tensor([True])
    """
    b = b.to(a.device)
    return torch.where(a.isnan(), a, torch.where(b.isnan() | ~(a > b), b, a))


def tf_minimum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``tf.minimum`` on CPU: as :func:`tf_maximum`, taking the smaller value."""
    b = b.to(a.device)
    return torch.where(a.isnan(), a, torch.where(b.isnan() | ~(a < b), b, a))


def keras_unscale(g: torch.Tensor, loss_scale_factor: float) -> torch.Tensor:
    """``loss_scale_factor``: ``g / T(scale)``, before anything else touches ``g``."""
    return g / keras_literal(loss_scale_factor, g.dtype)


def keras_densify(
    indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int], *, square: bool = False
) -> torch.Tensor:
    """An IndexedSlices as TF turns it into a tensor (``unsorted_segment_sum``).

    Each row is accumulated from zero in order of occurrence; untouched rows
    are zero. With ``square=True`` the rows are squared *before* they are
    summed, as ``ops.square`` does to an IndexedSlices (it squares the values).

    >>> keras_densify(torch.tensor([1, 1]), torch.tensor([[1.0], [2.0]]), (3, 1), square=True)
    tensor([[0.],
            [5.],
            [0.]])
    """
    rows, summed = deduplicate(indices, values * values if square else values)
    dense = values.new_zeros(tuple(shape))
    dense[rows] = summed
    return dense


def keras_squared_norm(g: torch.Tensor, max_threads: int) -> torch.Tensor:
    """``reduce_sum(g * g)``: squares rounded to ``T`` (flushed, as TF), then :func:`tf_sum`."""
    return tf_sum(flush_subnormal(g * g), max_threads)


def keras_clip_by_norm(values: torch.Tensor, clipnorm: float, max_threads: int) -> torch.Tensor:
    """``clipnorm`` (the TF backend calls ``tf.clip_by_norm(values, clipnorm)``)::

        l2sum = reduce_sum(values * values)
        l2norm = sqrt(l2sum) if l2sum > 0 else l2sum
        clipped = (values * T(clipnorm)) / max(l2norm, T(clipnorm))

    For an IndexedSlices ``values`` are its rows as given: a repeated index
    counts once per occurrence, before any summing.
    """
    c = keras_literal(clipnorm, values.dtype)
    l2sum = keras_squared_norm(values, max_threads)
    l2norm = exact_sqrt(l2sum) if bool(l2sum > 0) else l2sum
    return (values * c) / tf_maximum(l2norm, c)


def keras_clip_by_value(values: torch.Tensor, clipvalue: float) -> torch.Tensor:
    """``clipvalue`` (``tf.clip_by_value(values, -v, v)``): ``max(min(values, v), -v)``."""
    high = keras_literal(clipvalue, values.dtype)
    low = keras_literal(-clipvalue, values.dtype)
    return tf_maximum(tf_minimum(values, high), low)


def keras_global_norm_scale(
    squared_norms: Sequence[torch.Tensor], clipnorm: float, max_threads: int
) -> torch.Tensor:
    """``global_clipnorm``: the factor Keras multiplies every gradient by::

        norm = sqrt(reduce_sum(stack(squared_norms)))
        scale = T(clipnorm) * min(T(1) / norm, T(1 / clipnorm)) + (norm - norm)

    ``1 / clipnorm`` is a Python double, rounded once; ``norm - norm`` makes
    the scale NaN when the norm is not finite.
    """
    total = tf_sum(torch.stack(list(squared_norms)), max_threads)
    dtype = total.dtype
    norm = exact_sqrt(total)
    one = torch.ones((), dtype=dtype)
    smaller = tf_minimum(one / norm, keras_literal(1.0 / clipnorm, dtype))
    return keras_literal(clipnorm, dtype) * smaller + (norm - norm)


def keras_weight_decay(theta: torch.Tensor, weight_decay: torch.Tensor, lr: torch.Tensor) -> None:
    """Decoupled weight decay, before the Adam step, in place: ``θ = θ - (θ * wd) * lr``.

    ``weight_decay`` and ``lr`` are ``T`` scalars (:func:`keras_cast`).
    """
    theta.sub_((theta * weight_decay) * lr)


def keras_accumulate(accumulator: torch.Tensor, g: torch.Tensor) -> None:
    """Gradient accumulation between updates, in place: ``acc = acc + g``."""
    accumulator.copy_(accumulator + g)


def keras_accumulated_gradient(
    g: torch.Tensor, accumulator: torch.Tensor, steps: int
) -> torch.Tensor:
    """The gradient of an accumulation update step: ``(g + acc) / T(steps)``."""
    return (g + accumulator) / keras_literal(steps, g.dtype)


def keras_ema_update(
    average: torch.Tensor, theta: torch.Tensor, ema_momentum: float, first_step: bool
) -> None:
    """``use_ema``, after the step, in place::

        momentum = T(iterations != 0) * T(ema_momentum)
        average = momentum * average + (T(1) - momentum) * θ

    so the first step copies θ (momentum 0).
    """
    dtype = theta.dtype
    momentum = torch.zeros((), dtype=dtype) if first_step else keras_literal(ema_momentum, dtype)
    one = torch.ones((), dtype=dtype)
    average.copy_(momentum * average + (one - momentum) * theta)


def keras_update(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    c: Coefficients,
    *,
    g_squared: torch.Tensor | None = None,
    vhat: torch.Tensor | None = None,
) -> None:
    """Keras' ``Adam.update_step`` on one variable, in place::

        m = m + (g - m) * (1 - β1)
        v = v + (g_squared - v) * (1 - β2)           g_squared = g*g unless given
        vhat = tf_maximum(vhat, v)                   (amsgrad; then v := vhat below)
        θ = θ - (m * alpha) / (sqrt(v) + ε)

    This is :func:`dense_update` except in two places. An IndexedSlices
    gradient with repeated indices: Keras squares its values *before* TF
    densifies them, so ``g_squared`` holds summed squares, not the square of the
    sum (pass both densified, see :func:`keras_densify`). AMSGrad: Keras takes
    ``tf.maximum``, which keeps a NaN's own bits (:func:`tf_maximum`).
    """
    m.add_((g - m) * c.one_minus_beta1)
    v.add_(((g * g if g_squared is None else g_squared) - v) * c.one_minus_beta2)
    if vhat is not None:
        vhat.copy_(tf_maximum(vhat, v))
    theta.sub_((m * c.alpha) / (exact_sqrt(v if vhat is None else vhat) + c.epsilon))
