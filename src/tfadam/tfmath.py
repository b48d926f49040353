"""How TensorFlow's CPU kernels round: the arithmetic model under every rule.

tfadam's promise is TF's bits, so the first thing to specify is what one TF
operation does to them. On x86-64, for a variable of dtype ``T``:

1. **One rounding per operation.** ``+ - * / sqrt`` are computed in ``T``
   (float16 and bfloat16 in float32, then rounded once to ``T``, which equals
   correctly rounded ``T`` arithmetic for these operations).
2. **Flush-to-zero.** TF runs its kernels with the CPU's flush-to-zero and
   denormals-are-zero modes on: a subnormal operand counts as a zero of its
   sign, a subnormal result becomes one (:func:`flush_subnormal`). float16
   is exempt: its subnormals are normal numbers in float32.
3. **NaN bits.** A NaN operand comes back quiet with its sign and payload;
   where both operands are NaN, the first one's (x86's rule); an invalid
   operation (``inf - inf``, ``sqrt(-1)``) gives x86's default NaN, sign set.
4. **Conversions** between ``T`` and float32 keep NaN bits as TF's do
   (:func:`float16_to_float32`, :func:`float32_to_bfloat16`).
5. **Square roots are correctly rounded** (:func:`exact_sqrt`); torch's CPU
   ``sqrt`` is not.

:class:`TFArithmetic` bundles these into the operations the rules are written
in (:mod:`tfadam.rule` for TF1, :mod:`tfadam.keras_rule` for Keras).

Example:
    >>> import torch
    >>> t = TFArithmetic(torch.float32)
    >>> t.mul(torch.tensor([1e-38, 3.0]), 0.5)  # 5e-39 is subnormal: flushed
    tensor([0.0000, 1.5000])
"""

from __future__ import annotations

import numpy as np
import torch

from . import compat

__all__ = [
    "TFArithmetic",
    "exact_sqrt",
    "float16_to_float32",
    "float32_to_bfloat16",
    "flush_subnormal",
]

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

    >>> flush_subnormal(torch.tensor([1e-39, -1e-39, 1.5]))
    tensor([0.0000, -0.0000, 1.5000])
    """
    if x.dtype == torch.float16:
        return x
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x.abs() < tiny, x * 0, x)


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


def float16_to_float32(x: torch.Tensor) -> torch.Tensor:
    """As x86 ``vcvtph2ps``: a NaN keeps its sign and payload and becomes quiet.

    >>> hex(float16_to_float32(torch.tensor([0xFC01 - 0x10000], dtype=torch.int16)
    ...     .view(torch.float16)).view(torch.int32).item() & 0xFFFFFFFF)
    '0xffc02000'
    """
    wide = x.to(torch.float32)
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return wide
    half = x.view(torch.int16).to(torch.int64) & 0xFFFF
    bits = ((half >> 15) << 31) | 0x7FC00000 | ((half & 0x3FF) << 13)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return torch.where(nan, bits.view(torch.float32), wide)


def float32_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """As Eigen's ``float_to_bfloat16_rtne``: a NaN becomes ±0x7fc0 (sign kept).

    >>> nan = torch.tensor([-0x00400001], dtype=torch.int32).view(torch.float32)
    >>> hex(float32_to_bfloat16(nan).view(torch.int16).item() & 0xFFFF)
    '0xffc0'
    """
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


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded IEEE square root of ``x``, in ``x``'s dtype.

    Rounding trap: on CPU, torch 2.13's ``torch.sqrt`` is not correctly
    rounded (about 17% of float32 and 1% of float64 inputs are an ulp off).
    A square root taken in float64 and rounded once to a narrower format is
    correctly rounded even when the float64 result is an ulp off, because the
    square root of a p-bit number never lies within 2**-(2p+2) of a rounding
    midpoint. float64 itself goes through numpy, whose sqrt is IEEE.
    On any other device the root is taken on the CPU and moved back (moves
    are exact): CUDA documents its ``sqrt`` as IEEE, but no measurement here
    proves it, and CUDA's NaN for a negative input is not x86's.

    >>> exact_sqrt(torch.tensor([4.0, 2.0]))
    tensor([2.0000, 1.4142])
    """
    if x.device.type == "meta":  # no values: only the shape and dtype matter
        return torch.sqrt(x)
    if x.device.type != "cpu":
        return exact_sqrt(x.detach().to("cpu")).to(x.device)
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
            return float16_to_float32(x)
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
            return float32_to_bfloat16(x)
        if self.dtype == torch.float16 and x.dtype == torch.float32:
            return compat.float32_to_float16(x)  # NaN bits differ between torch versions
        return x.to(self.dtype)
