"""Keras 3's Adam (``keras.optimizers.Adam``, TensorFlow backend), written once and readably.

The Keras counterpart of :mod:`tfadam.rule`, and the specification the Keras
face (:mod:`tfadam.keras`) runs. It reads in Keras' order:

1. **Hyperparameters**: Keras meets a Python number in two ways that round
   differently (:func:`keras_cast`, :func:`keras_literal`); a typed one (a
   NumPy scalar, a 0-dim array or tensor) keeps its dtype, and each op
   computes in the promoted dtype (:func:`keras_result_type`,
   :func:`keras_one_minus`, :func:`keras_operand`).
2. **Coefficients** from the iteration counter (:func:`keras_coefficients`):
   ``β^t`` is a power (:func:`tf_scalar_power`), not TF1's running product.
   :class:`Iterations` serves them to the engine (Keras' ``Schedule``).
3. **The update** (:func:`keras_update`): TF1's dense update but for three
   places (:func:`differs_from_tf1`). The engine runs it for a plan with
   ``Options(rule="keras")``: :func:`keras_only_update` where it differs,
   TF1's kernels elsewhere.
4. **The transforms** Keras applies around the update, in its order:
   loss-scale unscaling, gradient accumulation, clipping (with the norms
   summed in Eigen's order, :func:`tf_sum`), decoupled weight decay before
   the update, the moving average after it. Each has a named function over
   one step's gradients or variables (``unscale_all``, ``accumulate_all`` /
   ``accumulated_gradients``, ``clip_all``, ``decay_all``,
   ``moving_average_all``).
5. **The policy**: each transform as the engine runs it (a
   :class:`tfadam.engine.Transform`: :class:`LossScale`,
   :class:`Accumulation`, :class:`ClipGradients`, :class:`WeightDecay`,
   :class:`MovingAverage`), composed in Keras' order by :class:`KerasPolicy`.
   :mod:`tfadam.keras` builds one per apply call from its configuration and
   runs ``engine.execute(plan, Iterations(...), policy.transforms)``.

Every operation is rounded to ``T`` (the gradient's and variable's dtype) in
Keras' order, with :mod:`tfadam.tfmath`'s primitives where TF's ops differ
from torch's (correctly rounded square roots, NaN bits, flushed squares).

Example:
    >>> import torch
    >>> c = keras_coefficients(lr=torch.tensor(0.1), beta_1=0.9, beta_2=0.999,
    ...                        epsilon=1e-7, iterations=0, dtype=torch.float32)
    >>> theta, m, v = torch.ones(2), torch.zeros(2), torch.zeros(2)
    >>> keras_update(theta, m, v, torch.tensor([1.0, -1.0]), c)
    >>> theta
    tensor([0.9000, 1.1000])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .rule import Coefficients, HyperValue, cast_scalar, deduplicate
from .sparse import IndexedSlices
from .tfmath import TFArithmetic, exact_sqrt, flush_subnormal

Gradient = torch.Tensor | IndexedSlices

# --- 1. Python numbers ----------------------------------------------------------------


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
    return cast_scalar(value, dtype)


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


# A typed hyperparameter (NumPy scalar, 0-dim array, tensor; a 0-dim torch tensor of
# its dtype here) is not a Python number to Keras: ``1 - beta_1`` is computed in
# its own dtype (NumPy's or TF's arithmetic), and ``ops.multiply(t, x)`` computes
# in ``result_type(T, dtype(x))``, wider than ``T`` where x's dtype is; the
# result is cast back to ``T`` when it is assigned (``tf.cast`` in assign_add).


def keras_result_type(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Keras' type promotion of two float dtypes (``dtypes.result_type``).

    The wider of the two; float16 with bfloat16 is float32 (neither holds
    the other).

    >>> keras_result_type(torch.float16, torch.bfloat16), keras_result_type(
    ...     torch.float32, torch.float64)
    (torch.float32, torch.float64)
    """
    if a == b:
        return a
    if {a, b} == {torch.float16, torch.bfloat16}:
        return torch.float32
    return a if a.itemsize > b.itemsize else b


def keras_one_minus(beta: HyperValue) -> HyperValue:
    """``1 - β`` as Keras' Adam writes it (in Python, outside any op).

    A Python number gives a Python double (rounded later, as a literal);
    a typed β gives ``1 - β`` in β's own dtype, rounded once, as NumPy's or
    TF's scalar arithmetic does.

    >>> keras_one_minus(0.9) == 1 - 0.9
    True
    >>> keras_one_minus(torch.tensor(0.9, dtype=torch.float16))
    tensor(0.1001, dtype=torch.float16)
    """
    if isinstance(beta, torch.Tensor):
        return TFArithmetic(beta.dtype).sub(1.0, beta.detach().cpu().reshape(()))
    return 1 - beta


def keras_operand(value: HyperValue, dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """A hyperparameter as a Keras op meets it beside a ``T`` tensor: its value and the op's dtype.

    A Python number converts as a literal (:func:`keras_literal`) and the op
    computes in ``T``; a typed value keeps its dtype ``D`` (a subnormal read
    as zero, as TF's kernels do) and the op computes in
    ``keras_result_type(T, D)``. The value is exact in that dtype.

    >>> keras_operand(1e-7, torch.float16)
    (1.1920928955078125e-07, torch.float16)
    >>> keras_operand(torch.tensor(1e-7, dtype=torch.float64), torch.float16)
    (1e-07, torch.float64)
    """
    if isinstance(value, torch.Tensor):
        typed = flush_subnormal(value.detach().cpu().reshape(()))
        return typed.item(), keras_result_type(dtype, typed.dtype)
    return keras_literal(value, dtype).item(), dtype


# The transforms meet a hyperparameter inside TF ops (``g / scale``,
# ``tf.clip_by_value``, ``tf.clip_by_norm``), which convert it to the gradient's
# dtype ``T``: a Python number as a literal, a NumPy value rounded once from its
# own dtype (NumPy's conversion: no float32 step, no flush), a TF tensor only if
# it is ``T`` already (a 0-dim torch tensor stands for one here).
KerasScalar = float | np.generic | np.ndarray | torch.Tensor


def keras_convert(value: KerasScalar, dtype: torch.dtype) -> torch.Tensor:
    """``convert_to_tensor(value, T)`` as a TF op does it for its second operand.

    >>> x = 1 + 2**-11 + 2**-40  # float32 rounds it to a float16 tie
    >>> keras_convert(np.float64(x), torch.float16).item(), keras_literal(x, torch.float16).item()
    (1.0009765625, 1.0)
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().reshape(()).to(dtype)  # a T tensor (checked by the face)
    if isinstance(value, (np.generic, np.ndarray)):
        return _round_once(float(np.asarray(value).astype(np.float64)), dtype)
    return keras_literal(value, dtype)


def _round_once(x: float, dtype: torch.dtype) -> torch.Tensor:
    """The double ``x`` rounded once (to nearest, ties to even) to ``dtype``."""
    if dtype == torch.float64:
        return torch.tensor(x, dtype=torch.float64)
    if dtype == torch.float16:  # NumPy converts double to half directly
        return torch.from_numpy(np.array(x, np.float64).astype(np.float16))
    # Rounding to float32 toward zero with a sticky last bit ("round to odd")
    # keeps a later rounding to a narrower format (bfloat16) a single rounding.
    narrow = np.float32(x)
    if not math.isfinite(x) or float(narrow) == x or dtype == torch.float32:
        return torch.tensor(float(narrow), dtype=torch.float32).to(dtype)
    if abs(float(narrow)) > abs(x):
        narrow = np.nextafter(narrow, np.float32(0))
    odd = np.array(narrow).view(np.int32) | 1
    return torch.tensor(float(odd.view(np.float32)), dtype=torch.float32).to(dtype)


def keras_cast_from(value: KerasScalar, dtype: torch.dtype) -> torch.Tensor:
    """``tf.cast(value, T)`` of a typed value: TF's Cast from its own dtype (:func:`keras_cast`).

    >>> keras_cast_from(np.array(1 + 2**-11 + 2**-40), torch.float16).item()
    1.0
    """
    if isinstance(value, (np.generic, np.ndarray)):
        value = keras_typed(value)
    return keras_cast(value, dtype)  # type: ignore[arg-type]


# --- 2. Coefficients from the iteration counter ---------------------------------------


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


@dataclass(frozen=True)
class KerasCoefficients(Coefficients):
    """:class:`Coefficients`, and the dtypes Keras' type promotion computes three ops in.

    ``None`` means ``T`` (a Python number, or a typed value whose dtype ``T``
    holds). Otherwise (e.g. ``beta_1=np.float64(0.9)`` for a float32
    variable) the op computes in that wider dtype and its result is cast to
    ``T`` on assignment; :func:`keras_update` does so, TF1's kernel cannot.

    Attributes:
        momentum_dtype: of ``(g - m) * (1 - β1)``.
        velocity_dtype: of ``(g² - v) * (1 - β2)``.
        denominator_dtype: of ``sqrt(v) + ε`` and of the division by it.
    """

    momentum_dtype: torch.dtype | None = None
    velocity_dtype: torch.dtype | None = None
    denominator_dtype: torch.dtype | None = None

    @property
    def promoted(self) -> bool:
        """Whether some op computes in a dtype wider than ``T``."""
        dtypes = (self.momentum_dtype, self.velocity_dtype, self.denominator_dtype)
        return any(dtype is not None for dtype in dtypes)


def keras_coefficients(
    *,
    lr: HyperValue,
    beta_1: HyperValue,
    beta_2: HyperValue,
    epsilon: HyperValue,
    iterations: int,
    dtype: torch.dtype,
) -> KerasCoefficients:
    """The scalar prelude of Keras 3's ``Adam.update_step``, in dtype ``T``::

        t = T(iterations + 1)                       # int64 counter cast (via float32 unless f64)
        β1^t = pow(T(β1), t)                        # tf.pow, C library, see tf_scalar_power
        alpha = (T(lr) * sqrt(T(1) - β2^t)) / (T(1) - β1^t)
        one_minus_beta = 1 - β                      # see keras_one_minus, keras_operand
        epsilon = ε                                 # see keras_operand

    ``lr`` is the learning rate as Keras holds it (a float32 tensor for a
    float learning rate, a schedule's output) or a Python number (a callable's
    output), cast with :func:`keras_cast`, as are the βs (a Python β through
    float32). For a Python β, ``1 - β`` is rounded once from double (TF1
    rounds β first), and ``β^t`` is a power, not a running product: for
    float32 both change the bits. A typed β or ε (a 0-dim tensor of its
    dtype) enters its ops in the promoted dtype, recorded in the result's
    ``*_dtype`` fields.

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
    one_minus_beta1, momentum_dtype = keras_operand(keras_one_minus(beta_1), dtype)
    one_minus_beta2, velocity_dtype = keras_operand(keras_one_minus(beta_2), dtype)
    eps, denominator_dtype = keras_operand(epsilon, dtype)

    def wider(op_dtype: torch.dtype) -> torch.dtype | None:
        return None if op_dtype == dtype else op_dtype

    return KerasCoefficients(
        alpha=alpha.item(),
        beta1=b1.item(),
        beta2=b2.item(),
        one_minus_beta1=one_minus_beta1,
        one_minus_beta2=one_minus_beta2,
        epsilon=eps,
        momentum_dtype=wider(momentum_dtype),
        velocity_dtype=wider(velocity_dtype),
        denominator_dtype=wider(denominator_dtype),
    )


@dataclass(frozen=True)
class Iterations:
    """Keras' schedule (a :class:`tfadam.engine.Schedule`): coefficients from the counter.

    ``step`` is the update's iteration, Keras' ``optimizer.iterations`` (apply
    calls so far, floor-divided by the gradient accumulation steps), read
    before the step; :meth:`advance` adds one to ``counter``, Keras' int64
    count of apply calls, once per call.

    >>> counter = torch.zeros((), dtype=torch.int64)
    >>> schedule = Iterations(counter, 0, torch.tensor(0.001), 0.9, 0.999, 1e-7)
    >>> schedule.coefficients(torch.float32) == keras_coefficients(
    ...     lr=torch.tensor(0.001), beta_1=0.9, beta_2=0.999, epsilon=1e-7, iterations=0,
    ...     dtype=torch.float32)
    True
    >>> schedule.advance(); int(counter)
    1
    """

    counter: torch.Tensor
    step: int
    learning_rate: HyperValue | None  # None on a call that only accumulates
    beta_1: HyperValue
    beta_2: HyperValue
    epsilon: HyperValue

    def coefficients(self, dtype: torch.dtype) -> KerasCoefficients:
        assert self.learning_rate is not None, "a call that only accumulates has no update"
        return keras_coefficients(
            lr=self.learning_rate,
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            epsilon=self.epsilon,
            iterations=self.step,
            dtype=dtype,
        )

    def advance(self) -> None:
        self.counter.add_(1)


# --- 3. The update --------------------------------------------------------------------


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
    """Keras' ``Adam.update_step`` on one variable, in place, each op one TF op::

        m = m + T((g - m) * (1 - β1))                in T, or in R1 (see below)
        v = v + T((g_squared - v) * (1 - β2))        g_squared = g*g unless given
        vhat = tf_maximum(vhat, v)                   (amsgrad; then v := vhat below)
        θ = θ - T((m * alpha) / (sqrt(v) + ε))       the sum and quotient in T, or in Re

    This is :func:`tfadam.rule.dense_update` except in three places. An IndexedSlices
    gradient with repeated indices: Keras squares its values *before* TF
    densifies them, so ``g_squared`` holds summed squares, not the square of the
    sum (pass both densified, see :func:`keras_densify`). AMSGrad: Keras takes
    ``tf.maximum``, which keeps a NaN's own bits (:func:`tf_maximum`), and its
    additions are not swapped (TF1's fused AMSGrad kernel swaps them). Typed
    hyperparameters wider than ``T``: the ops that meet them compute in the
    promoted dtype (``c.momentum_dtype`` ...), then ``T(...)`` is TF's Cast
    (float64 to float16 or bfloat16 through float32). Every operation rounds
    as TF's CPU ops do (:class:`tfadam.tfmath.TFArithmetic`: subnormals
    flushed to zero, measured against live Keras).
    """
    dtype = theta.dtype
    t = TFArithmetic(dtype)
    momentum_dtype, velocity_dtype, denominator_dtype = _op_dtypes(c, dtype)

    def scaled(x: torch.Tensor, factor: float, op_dtype: torch.dtype) -> torch.Tensor:
        if op_dtype == dtype:
            return t.mul(x, factor)
        return t.cast(TFArithmetic(op_dtype).mul(x, factor))

    m.copy_(t.add(m, scaled(t.sub(g, m), c.one_minus_beta1, momentum_dtype)))
    square = t.mul(g, g) if g_squared is None else g_squared
    v.copy_(t.add(v, scaled(t.sub(square, v), c.one_minus_beta2, velocity_dtype)))
    if vhat is not None:
        vhat.copy_(tf_maximum(vhat, v))
    root = t.sqrt(v if vhat is None else vhat)
    if denominator_dtype == dtype:
        step = t.div(t.mul(m, c.alpha), t.add(root, c.epsilon))
    else:
        wide = TFArithmetic(denominator_dtype)
        step = t.cast(wide.div(t.mul(m, c.alpha), wide.add(root, c.epsilon)))
    theta.copy_(t.sub(theta, step))


def _op_dtypes(c: Coefficients, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes of :func:`keras_update`'s three promoted ops (``T`` where not promoted)."""
    if not isinstance(c, KerasCoefficients):
        return dtype, dtype, dtype
    found = (c.momentum_dtype, c.velocity_dtype, c.denominator_dtype)
    return tuple(dtype if op_dtype is None else op_dtype for op_dtype in found)


def differs_from_tf1(g: Gradient, amsgrad: bool, c: Coefficients | None = None) -> bool:
    """Whether Keras' update of ``g`` is not TF1's dense update (:func:`keras_update`'s places).

    Everywhere else TF1's fused kernel (:func:`tfadam.rule.dense_update`, run
    by the engine on the densified gradient) computes Keras' update bit for bit.
    ``c`` (the variable dtype's coefficients) tells whether a typed
    hyperparameter promotes an op beyond ``T``.

    >>> differs_from_tf1(IndexedSlices(torch.ones(2, 1), torch.tensor([0, 0]), (3, 1)), False)
    True
    >>> differs_from_tf1(torch.ones(3), False), differs_from_tf1(torch.ones(3), True)
    (False, True)
    >>> c = keras_coefficients(lr=torch.tensor(0.1), beta_1=torch.tensor(0.9, dtype=torch.float64),
    ...                        beta_2=0.999, epsilon=1e-7, iterations=0, dtype=torch.float32)
    >>> differs_from_tf1(torch.ones(3), False, c)
    True
    """
    if amsgrad:
        return True
    if isinstance(c, KerasCoefficients) and c.promoted:
        return True
    if isinstance(g, IndexedSlices):
        return bool(torch.unique(g.indices).numel() != g.indices.numel())
    return False


def keras_only_update(
    theta: torch.Tensor,
    g: Gradient,
    m: torch.Tensor,
    v: torch.Tensor,
    c: Coefficients,
    *,
    vhat: torch.Tensor | None = None,
) -> None:
    """:func:`keras_update` of one variable whose update :func:`differs_from_tf1`.

    ``m``, ``v`` and ``vhat`` (AMSGrad) are Keras' ``momentum``, ``velocity``
    and ``velocity_hat``. An IndexedSlices with repeated rows passes its
    summed squares as ``g_squared``. The engine calls this for an update
    of a plan with ``Options(rule="keras")``.

    >>> theta, m, v = torch.ones(3, 1), torch.zeros(3, 1), torch.zeros(3, 1)
    >>> c = keras_coefficients(lr=torch.tensor(0.1), beta_1=0.9, beta_2=0.999,
    ...                        epsilon=1e-7, iterations=0, dtype=torch.float32)
    >>> g = IndexedSlices(torch.tensor([[3.0], [4.0]]), torch.tensor([1, 1]), (3, 1))
    >>> keras_only_update(theta, g, m, v, c)
    >>> v.flatten()  # (1 - β2) * (3² + 4²), not (3 + 4)²
    tensor([0.0000, 0.0250, 0.0000])
    """
    g_squared = None
    if isinstance(g, IndexedSlices):
        if bool(torch.unique(g.indices).numel() != g.indices.numel()):
            squares = TFArithmetic(theta.dtype).mul(g.values, g.values)
            g_squared = keras_densify(g.indices, squares, theta.shape)
        g = keras_densify(g.indices, g.values, theta.shape)
    keras_update(theta, m, v, g, c, g_squared=g_squared, vhat=vhat)


# --- 4a. Loss scaling and gradient accumulation ---------------------------------------


def keras_unscale(g: torch.Tensor, loss_scale_factor: KerasScalar) -> torch.Tensor:
    """``loss_scale_factor``: ``g / T(scale)`` (:func:`keras_convert`), before anything else."""
    return g / keras_convert(loss_scale_factor, g.dtype)


def keras_accumulate(accumulator: torch.Tensor, g: torch.Tensor) -> None:
    """Gradient accumulation between updates, in place: ``acc = acc + g``."""
    accumulator.copy_(accumulator + g)


def keras_accumulated_gradient(
    g: torch.Tensor, accumulator: torch.Tensor, steps: int
) -> torch.Tensor:
    """The gradient of an accumulation update step: ``(g + acc) / T(steps)``."""
    return (g + accumulator) / keras_literal(steps, g.dtype)


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


def densify(g: Gradient, shape: Sequence[int]) -> torch.Tensor:
    """``g`` as a dense tensor: an IndexedSlices through :func:`keras_densify`, else itself."""
    if isinstance(g, IndexedSlices):
        return keras_densify(g.indices, g.values, shape)
    return g


def unscale_all(
    grads: Sequence[torch.Tensor], loss_scale_factor: KerasScalar
) -> list[torch.Tensor]:
    """Transform 1, ``loss_scale_factor``: every gradient through :func:`keras_unscale`."""
    return [keras_unscale(g, loss_scale_factor) for g in grads]


def accumulate_all(
    accumulators: Sequence[torch.Tensor], grads: Sequence[Gradient], shapes: Sequence[Sequence[int]]
) -> None:
    """Transform 2, a call that does not update: every gradient into its accumulator.

    >>> acc = [torch.zeros(2)]
    >>> accumulate_all(acc, [torch.ones(2)], [(2,)]); accumulate_all(acc, [torch.ones(2)], [(2,)])
    >>> acc[0]
    tensor([2., 2.])
    """
    for accumulator, g, shape in zip(accumulators, grads, shapes, strict=True):
        keras_accumulate(accumulator, densify(g, shape))


def accumulated_gradients(
    grads: Sequence[Gradient],
    accumulators: Sequence[torch.Tensor],
    shapes: Sequence[Sequence[int]],
    steps: int,
) -> list[torch.Tensor]:
    """Transform 2, the call that updates: each gradient is the mean of the last ``steps``.

    The accumulators are zeroed after the update (:func:`reset_accumulators`).
    """
    return [
        keras_accumulated_gradient(densify(g, shape), accumulator, steps)
        for g, accumulator, shape in zip(grads, accumulators, shapes, strict=True)
    ]


def reset_accumulators(accumulators: Sequence[torch.Tensor]) -> None:
    """After an accumulated update: every accumulator back to zero."""
    for accumulator in accumulators:
        accumulator.zero_()


# --- 4b. Clipping, with TF's sums and extrema -----------------------------------------


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


def keras_squared_norm(g: torch.Tensor, max_threads: int) -> torch.Tensor:
    """``reduce_sum(g * g)``: squares rounded to ``T`` (flushed, as TF), then :func:`tf_sum`."""
    return tf_sum(flush_subnormal(g * g), max_threads)


def keras_clip_by_norm(
    values: torch.Tensor, clipnorm: KerasScalar, max_threads: int
) -> torch.Tensor:
    """``clipnorm`` (the TF backend calls ``tf.clip_by_norm(values, clipnorm)``)::

        l2sum = reduce_sum(values * values)
        l2norm = sqrt(l2sum) if l2sum > 0 else l2sum
        clipped = (values * T(clipnorm)) / max(l2norm, T(clipnorm))

    For an IndexedSlices ``values`` are its rows as given: a repeated index
    counts once per occurrence, before any summing. ``T(clipnorm)``: TF
    converts a Python number or NumPy scalar (``np.isscalar``) as an operand
    (:func:`keras_convert`) and casts anything else, a 0-dim array or a
    tensor of any dtype, with ``tf.cast`` (:func:`keras_cast_from`).
    """
    if isinstance(clipnorm, (np.ndarray, torch.Tensor)):
        c = keras_cast_from(clipnorm, values.dtype)
    else:
        c = keras_convert(clipnorm, values.dtype)
    l2sum = keras_squared_norm(values, max_threads)
    l2norm = exact_sqrt(l2sum) if bool(l2sum > 0) else l2sum
    return (values * c) / tf_maximum(l2norm, c)


def keras_clip_by_value(values: torch.Tensor, clipvalue: KerasScalar) -> torch.Tensor:
    """``clipvalue`` (``tf.clip_by_value(values, -v, v)``): ``max(min(values, v), -v)``.

    ``v`` and ``-v`` (negated in their own type) as TF converts them (:func:`keras_convert`).
    """
    high = keras_convert(clipvalue, values.dtype)
    low = keras_convert(-clipvalue, values.dtype)
    return tf_maximum(tf_minimum(values, high), low)


def keras_global_norm_scale(
    squared_norms: Sequence[torch.Tensor], clipnorm: KerasScalar, max_threads: int
) -> torch.Tensor:
    """``global_clipnorm``: the factor Keras multiplies every gradient by::

        norm = sqrt(reduce_sum(stack(squared_norms)))
        scale = T(clipnorm) * min(T(1) / norm, T(1 / clipnorm)) + (norm - norm)

    ``1 / clipnorm`` is a Python double, rounded once, for a Python number;
    for a typed one it is computed in its own dtype ``D``, which Keras then
    meets in ``result_type(T, D)`` — only ``T`` itself works (otherwise the
    sum with ``norm - norm`` fails in TF; the face refuses it before).
    ``norm - norm`` makes the scale NaN when the norm is not finite.
    """
    total = tf_sum(torch.stack(list(squared_norms)), max_threads)
    dtype = total.dtype
    norm = exact_sqrt(total)
    one = torch.ones((), dtype=dtype)
    if isinstance(clipnorm, (int, float)) and not isinstance(clipnorm, np.generic):
        inverse = keras_literal(1.0 / clipnorm, dtype)
    else:
        typed = keras_typed(clipnorm)
        inverse = TFArithmetic(typed.dtype).div(1.0, typed).to(dtype)  # exact: D fits in T
    smaller = tf_minimum(one / norm, inverse)
    return keras_convert(clipnorm, dtype) * smaller + (norm - norm)


def keras_typed(value: np.generic | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A typed value (NumPy scalar or array, tensor) as a 0-dim CPU tensor of its dtype.

    >>> keras_typed(np.float16(0.5))
    tensor(0.5000, dtype=torch.float16)
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().reshape(())
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).reshape(())
    return torch.from_numpy(np.array(array)).reshape(())


@dataclass(frozen=True)
class Clipping:
    """Transform 3: which of Keras' clipping options is set (at most one; ``None`` or 0: off)."""

    clipnorm: KerasScalar | None = None
    clipvalue: KerasScalar | None = None
    global_clipnorm: KerasScalar | None = None


def clip_all(
    grads: Sequence[Gradient],
    shapes: Sequence[Sequence[int]],
    clipping: Clipping,
    max_threads: int,
) -> list[Gradient]:
    """Transform 3: Keras' ``_clip_gradients`` on one step's gradients.

    ``clipnorm`` clips each gradient (an IndexedSlices' rows as given,
    :func:`keras_clip_by_norm`); ``global_clipnorm`` scales all by
    :func:`keras_global_norm_scale` (an IndexedSlices' squares are summed
    densified, and the product densifies it); ``clipvalue`` clips each element.

    >>> clip_all([torch.tensor([3.0, -4.0])], [(2,)], Clipping(clipnorm=1.0), max_threads=1)
    [tensor([ 0.6000, -0.8000])]
    """
    if clipping.clipnorm and clipping.clipnorm > 0:
        return [_on_values(g, keras_clip_by_norm, clipping.clipnorm, max_threads) for g in grads]
    if clipping.global_clipnorm and clipping.global_clipnorm > 0:
        squared = []
        for g, shape in zip(grads, shapes, strict=True):
            if isinstance(g, IndexedSlices):
                # ops.square keeps the IndexedSlices; ops.sum then densifies the squares.
                squares = flush_subnormal(g.values * g.values)
                squared.append(tf_sum(keras_densify(g.indices, squares, shape), max_threads))
            else:
                squared.append(keras_squared_norm(g, max_threads))
        scale = keras_global_norm_scale(squared, clipping.global_clipnorm, max_threads)
        # `v * scale` turns an IndexedSlices into a dense tensor.
        return [densify(g, shape) * scale for g, shape in zip(grads, shapes, strict=True)]
    if clipping.clipvalue and clipping.clipvalue > 0:
        return [_on_values(g, keras_clip_by_value, clipping.clipvalue) for g in grads]
    return list(grads)


def _on_values(g: Gradient, clip: Callable[..., torch.Tensor], *args: Any) -> Gradient:
    if isinstance(g, IndexedSlices):
        return IndexedSlices(clip(g.values, *args), g.indices, g.dense_shape)
    return clip(g, *args)


# --- 4c. Weight decay (before the update) and the moving average (after) --------------


def keras_weight_decay(theta: torch.Tensor, weight_decay: torch.Tensor, lr: torch.Tensor) -> None:
    """Decoupled weight decay, before the Adam step, in place: ``θ = θ - (θ * wd) * lr``.

    ``weight_decay`` and ``lr`` are ``T`` scalars (:func:`keras_cast`).
    """
    theta.sub_((theta * weight_decay) * lr)


def keras_ema_update(
    average: torch.Tensor, theta: torch.Tensor, ema_momentum: HyperValue, first_step: bool
) -> None:
    """``use_ema``, after the step, in place::

        momentum = T(iterations != 0) * ema_momentum
        average = T(momentum * average + (1 - momentum) * θ)

    so the first step copies θ (momentum 0). The ops compute in ``T`` for a
    Python number (converted as a literal); a typed ``ema_momentum`` (a 0-dim
    tensor of its dtype ``D``) makes them compute in ``result_type(T, D)``,
    and the assignment casts the result to ``T`` (:func:`keras_operand`).
    """
    dtype = theta.dtype
    value, op_dtype = keras_operand(ema_momentum, dtype)
    if op_dtype == dtype:
        momentum = torch.tensor(0.0 if first_step else value, dtype=dtype)
        one = torch.ones((), dtype=dtype)
        average.copy_(momentum * average + (one - momentum) * theta)
        return
    wide = TFArithmetic(op_dtype)
    momentum = wide.operand(0.0 if first_step else value)
    kept = wide.mul(momentum, average)
    moved = wide.mul(wide.sub(1.0, momentum), theta)
    average.copy_(TFArithmetic(dtype).cast(wide.add(kept, moved)))


def decay_all(
    thetas: Sequence[torch.Tensor],
    weight_decay: HyperValue,
    learning_rates: Sequence[HyperValue | None],
) -> None:
    """Transform 4, before the update: :func:`keras_weight_decay` of each variable, in place.

    ``learning_rates[i]`` is the learning rate Keras read for ``thetas[i]``
    (None: the variable is excluded from weight decay); both are cast to the
    variable's dtype (:func:`keras_cast`).

    >>> theta = torch.ones(2)
    >>> decay_all([theta], 0.5, [torch.tensor(0.1)]); theta
    tensor([0.9500, 0.9500])
    """
    for theta, lr in zip(thetas, learning_rates, strict=True):
        if lr is not None:
            dtype = theta.dtype
            keras_weight_decay(theta, keras_cast(weight_decay, dtype), keras_cast(lr, dtype))


def moving_average_all(
    averages: Sequence[torch.Tensor],
    thetas: Sequence[torch.Tensor],
    ema_momentum: HyperValue,
    iterations: int,
    overwrite_frequency: int | None,
) -> None:
    """Transform 5, after the update: :func:`keras_ema_update` of every variable, in place.

    ``iterations`` is Keras' counter before this call's increment; every
    ``overwrite_frequency``-th call the averages are copied into the variables.
    """
    for average, theta in zip(averages, thetas, strict=True):
        keras_ema_update(average, theta, ema_momentum, iterations == 0)
    if overwrite_frequency and (iterations + 1) % overwrite_frequency == 0:
        for average, theta in zip(averages, thetas, strict=True):
            theta.copy_(average)


# --- 5. The policy: the transforms as the engine runs them, in Keras' order ------------


class KerasTransform:
    """One of Keras' transforms as :func:`tfadam.engine.execute` runs it (an ``engine.Transform``).

    Each hook does nothing here; a transform overrides the ones it needs:
    ``gradients`` (computes, writes nothing unless it returns None: no update
    this call), ``before_update``, ``after_update(updated)``.
    """

    def gradients(self, grads: Sequence[Gradient]) -> Sequence[Gradient] | None:
        return grads

    def before_update(self) -> None:
        return None

    def after_update(self, updated: bool) -> None:
        return None


@dataclass(frozen=True, eq=False)
class LossScale(KerasTransform):
    """Transform 1, first of all: every gradient divided by ``factor`` (:func:`unscale_all`).

    >>> LossScale(2.0).gradients([torch.tensor([3.0])])
    [tensor([1.5000])]
    """

    factor: KerasScalar

    def gradients(self, grads: Sequence[Gradient]) -> list[torch.Tensor]:
        return unscale_all(grads, self.factor)  # type: ignore[arg-type]  # (dense: the face checks)


@dataclass(frozen=True, eq=False)
class Accumulation(KerasTransform):
    """Transform 2, ``gradient_accumulation_steps``: Keras updates every ``steps``-th call.

    A call that does not update (``updates`` false) adds its gradients to
    ``accumulators`` (:func:`accumulate_all`, one per gradient) and stops the
    step; the call that updates uses the mean of the last ``steps`` gradients
    (:func:`accumulated_gradients`), and after its update every accumulator of
    the optimizer (``every_accumulator``) is zeroed (:func:`reset_accumulators`).

    >>> acc = torch.zeros(2)
    >>> first = Accumulation([acc], [(2,)], steps=2, updates=False, every_accumulator=[acc])
    >>> first.gradients([torch.ones(2)]) is None, acc
    (True, tensor([1., 1.]))
    >>> second = Accumulation([acc], [(2,)], steps=2, updates=True, every_accumulator=[acc])
    >>> second.gradients([torch.full((2,), 3.0)])
    [tensor([2., 2.])]
    >>> second.after_update(True); acc
    tensor([0., 0.])
    """

    accumulators: Sequence[torch.Tensor]
    shapes: Sequence[Sequence[int]]
    steps: int
    updates: bool
    every_accumulator: Sequence[torch.Tensor]

    def gradients(self, grads: Sequence[Gradient]) -> list[torch.Tensor] | None:
        if not self.updates:
            accumulate_all(self.accumulators, grads, self.shapes)
            return None
        return accumulated_gradients(grads, self.accumulators, self.shapes, self.steps)

    def after_update(self, updated: bool) -> None:
        if updated:
            reset_accumulators(self.every_accumulator)


@dataclass(frozen=True, eq=False)
class ClipGradients(KerasTransform):
    """Transform 3: ``clipnorm``, ``global_clipnorm`` or ``clipvalue`` (:func:`clip_all`).

    >>> ClipGradients(Clipping(clipvalue=0.5), [(2,)], max_threads=1).gradients(
    ...     [torch.tensor([1.0, -0.25])])
    [tensor([ 0.5000, -0.2500])]
    """

    clipping: Clipping
    shapes: Sequence[Sequence[int]]
    max_threads: int

    def gradients(self, grads: Sequence[Gradient]) -> list[Gradient]:
        return clip_all(grads, self.shapes, self.clipping, self.max_threads)


@dataclass(frozen=True, eq=False)
class WeightDecay(KerasTransform):
    """Transform 4, before the update: decoupled weight decay (:func:`decay_all`).

    ``learning_rates[i]``: the learning rate Keras read for ``thetas[i]``, or
    None where the variable is excluded from weight decay.

    >>> theta = torch.ones(2)
    >>> WeightDecay([theta], 0.5, [torch.tensor(0.1)]).before_update(); theta
    tensor([0.9500, 0.9500])
    """

    thetas: Sequence[torch.Tensor]
    weight_decay: HyperValue
    learning_rates: Sequence[HyperValue | None]

    def before_update(self) -> None:
        decay_all(self.thetas, self.weight_decay, self.learning_rates)


@dataclass(frozen=True, eq=False)
class MovingAverage(KerasTransform):
    """Transform 5, after every call (an update or not): ``use_ema`` (:func:`moving_average_all`).

    ``iterations``: Keras' counter before the call; ``averages`` and
    ``thetas``: every variable of the optimizer, not only this call's.

    >>> average, theta = torch.zeros(2), torch.ones(2)
    >>> MovingAverage([average], [theta], 0.99, iterations=0,
    ...               overwrite_frequency=None).after_update(True); average
    tensor([1., 1.])
    """

    averages: Sequence[torch.Tensor]
    thetas: Sequence[torch.Tensor]
    ema_momentum: HyperValue
    iterations: int
    overwrite_frequency: int | None

    def after_update(self, updated: bool) -> None:
        moving_average_all(
            self.averages, self.thetas, self.ema_momentum, self.iterations, self.overwrite_frequency
        )


@dataclass(frozen=True)
class KerasPolicy:
    """Keras' transforms for one apply call, in Keras' order (``BaseOptimizer.apply``).

    The fields are in that order; an absent transform is None. Keras' order:
    unscale the gradients, accumulate them (or use the accumulated mean),
    clip them, decay the weights, update (the engine), reset the
    accumulators, move the average, count the call (the schedule).

    >>> theta, acc = torch.ones(2), torch.zeros(2)
    >>> policy = KerasPolicy(
    ...     loss_scale=LossScale(4.0),
    ...     accumulation=Accumulation([acc], [(2,)], 2, updates=False, every_accumulator=[acc]))
    >>> [type(t).__name__ for t in policy.transforms]
    ['LossScale', 'Accumulation']
    """

    loss_scale: LossScale | None = None
    accumulation: Accumulation | None = None
    clipping: ClipGradients | None = None
    weight_decay: WeightDecay | None = None
    moving_average: MovingAverage | None = None

    @property
    def transforms(self) -> tuple[KerasTransform, ...]:
        """The transforms present, in Keras' order: what ``engine.execute`` takes."""
        found = (
            self.loss_scale,
            self.accumulation,
            self.clipping,
            self.weight_decay,
            self.moving_average,
        )
        return tuple(t for t in found if t is not None)
