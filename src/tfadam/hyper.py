"""Hyperparameters: numbers, NumPy scalars, 0-dim tensors or zero-argument callables.

TF1's ``_prepare`` evaluates each hyperparameter once per apply call, before
any variable is touched, and converts it with ``convert_to_tensor``; each
update then casts it to the variable's dtype ``T`` (see :mod:`tfadam.rule`).
The dtype that conversion gives is the hyperparameter's *source dtype*, and
TF's rule, measured on the oracle (tensorflow-cpu 2.21), is:

=====================================  ============  ===========================
hyperparameter (or callable's value)    source dtype  ``beta1_power``/``beta2_power``
=====================================  ============  ===========================
Python float or int                    float32       float32
``np.float16(x)``                      float16       float16
``np.float32(x)``                      float32       float32
``np.float64(x)``, ``np.array(x)``     float64       float64
0-dim torch tensor of dtype D          D             D
=====================================  ============  ===========================

* ``T(x)`` is TF's Cast from the source dtype: float64 to float16/bfloat16
  goes through float32 (two roundings), and a result subnormal in float32,
  float64 or bfloat16 is flushed to zero.
* TF creates each accumulator from β's value at the first apply call, in β's
  source dtype, and advances it after every call by ``beta_power * β`` in
  that dtype (flush-to-zero, as every TF op). So a NumPy float64 β gives a
  float64 accumulator, and every element of a float64 variable differs from
  what a Python float β gives.
* If β's source dtype later differs from its accumulator's, TF fails its
  ``Mul`` ("expected to be a float tensor but is a double tensor") after the
  variables moved; tfadam refuses the call before anything moves
  (:func:`accumulator_mismatch`).

Example:
    >>> import numpy as np, torch
    >>> resolve(lambda: torch.tensor(0.5), "lr")
    tensor(0.5000)
    >>> resolve(1e-3, "lr")
    0.001
    >>> resolve(np.float64(0.9), "beta1"), resolve(np.array(0.01), "lr").dtype
    (tensor(0.9000, dtype=torch.float64), torch.float64)
    >>> source_dtype(0.9), source_dtype(resolve(np.float16(0.9), "beta1"))
    (torch.float32, torch.float16)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .kernels.scalars import round_to

Hyper = (
    float
    | int
    | np.floating
    | np.ndarray
    | torch.Tensor
    | Callable[[], "float | int | np.floating | np.ndarray | torch.Tensor"]
)
Resolved = float | torch.Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve(value: Hyper, name: str) -> Resolved:
    """Evaluate a hyperparameter: call it if callable, check it is a real scalar.

    Returns a Python float or a detached 0-dim CPU tensor (its dtype kept:
    TF casts a tensor hyperparameter from its own dtype, numbers from float32).
    A NumPy scalar or 0-dim array becomes a 0-dim tensor of its dtype (what
    TF's ``convert_to_tensor`` makes of it): ``np.float64(0.9)`` is not the
    Python float 0.9 to TF, although it is a subclass of ``float``.
    Raises ``ValueError``/``TypeError`` naming ``name`` for anything else.
    """
    return _converted(_called(value, name), name)


def _called(value: Hyper, name: str) -> object:
    if callable(value) and not isinstance(value, torch.Tensor):
        try:
            return value()
        except Exception as error:
            raise ValueError(
                f"hyperparameter {name}: its callable {value!r} raised "
                f"{type(error).__name__}: {error}. A callable hyperparameter is evaluated "
                "once per step and must return a number or a 0-dim tensor."
            ) from error
    return value


def _converted(value: object, name: str) -> Resolved:
    if isinstance(value, (np.ndarray, np.generic)):
        value = _from_numpy(value, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(
            f"hyperparameter {name} must be a number, a NumPy float scalar, a 0-dim tensor "
            f"or a zero-argument callable returning one; got {type(value).__name__} {value!r}."
        )
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0:
            raise ValueError(
                f"hyperparameter {name} must be a scalar (0-dim tensor); got a tensor of "
                f"shape {tuple(value.shape)}. Pass e.g. tensor.reshape(()) or a float."
            )
        if value.is_meta or value.is_complex():
            raise TypeError(
                f"hyperparameter {name} is a {value.dtype} tensor on {value.device}; it must "
                "hold a real value (a float, or a real 0-dim tensor on a device with data)."
            )
        if value.dtype not in _FLOATING:
            value = value.to(torch.float32)
        return value.detach().to("cpu")
    return float(value)


def _from_numpy(value: np.ndarray | np.generic, name: str) -> object:
    """What TF's ``convert_to_tensor`` makes of a NumPy scalar or 0-dim array, in torch."""
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(
            f"hyperparameter {name} must be a scalar; got a NumPy array of shape "
            f"{array.shape}. Pass e.g. array.reshape(()) or a float."
        )
    if array.dtype.name == "bfloat16":  # ml_dtypes, as TF's own NumPy bfloat16
        return torch.tensor(array.view(np.int16).item(), dtype=torch.int16).view(torch.bfloat16)
    if array.dtype.kind == "f" and array.dtype.itemsize in (2, 4, 8):
        return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    if array.dtype.kind in "iu":
        return int(array)  # an integer tensor to TF, cast to T like the number it holds
    return value  # bool, complex, strings, longdouble: refused by the caller, named


def source_dtype(value: Resolved) -> torch.dtype:
    """The dtype TF's ``convert_to_tensor`` gives a resolved hyperparameter.

    A Python number is float32 (TF: an int is int32, but the only integer
    valid as β is 0, which is the same accumulator value in either dtype).
    """
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32


def accumulator_mismatch(
    beta1: Resolved, beta2: Resolved, beta1_power: torch.Tensor, beta2_power: torch.Tensor
) -> str | None:
    """Why TF could not advance these accumulators by these βs, or None.

    TF advances ``beta_power`` by ``beta_power * β``, which needs both in
    one dtype; the accumulator keeps the dtype β had when it was created.

    >>> accumulator_mismatch(0.9, 0.999, torch.tensor(0.9), torch.tensor(0.999)) is None
    True
    >>> accumulator_mismatch(torch.tensor(0.9, dtype=torch.float64), 0.999,
    ...                      torch.tensor(0.9), torch.tensor(0.999))[:55]
    'beta1 is torch.float64 but beta1_power is torch.float32'
    """
    for label, beta, power in (("beta1", beta1, beta1_power), ("beta2", beta2, beta2_power)):
        if source_dtype(beta) != power.dtype:
            return (
                f"{label} is {source_dtype(beta)} but {label}_power is {power.dtype}: TF keeps "
                "each beta-power accumulator in the dtype β had when it was created (a Python "
                "float: float32; a NumPy float64: float64) and cannot multiply it by a β of "
                f"another dtype. Pass β as before (e.g. float({label})), or start a new optimizer."
            )
    return None


@dataclass(frozen=True)
class Resolution:
    """The four hyperparameters of one apply call, evaluated and checked.

    ``beta2_constant``: β2 was a number or a NumPy value (a constant in a TF1
    graph, which Grappler folds), not a tensor (TF: a variable or placeholder).
    """

    lr: Resolved
    beta1: Resolved
    beta2: Resolved
    epsilon: Resolved
    beta2_constant: bool = True


def resolve_all(lr: Hyper, beta1: Hyper, beta2: Hyper, epsilon: Hyper, where: str) -> Resolution:
    """Evaluate and check lr, β1, β2, ε; ``where`` names them in errors."""
    # Four floats seen before need no new checks: the common step. Keyed by
    # the bits, so that 0.0 and -0.0 (different to TF's arithmetic) stay apart.
    floats = type(lr) is float and type(beta1) is float and type(beta2) is float
    key = _FOUR.pack(lr, beta1, beta2, epsilon) if floats and type(epsilon) is float else None
    known = _valid.get(key) if key is not None else None  # one lookup: another thread may clear
    if known is not None:
        return known
    beta2_value = _called(beta2, f"{where}beta2")
    values = Resolution(
        lr=resolve(lr, f"{where}lr"),
        beta1=resolve(beta1, f"{where}beta1"),
        beta2=_converted(beta2_value, f"{where}beta2"),
        epsilon=resolve(epsilon, f"{where}epsilon"),
        beta2_constant=not isinstance(beta2_value, torch.Tensor),
    )
    _check(values.lr, f"{where}lr", lambda x: x >= 0, ">= 0 and finite")
    _check(values.epsilon, f"{where}epsilon", lambda x: x >= 0, ">= 0 and finite")
    for beta, label in ((values.beta1, "beta1"), (values.beta2, "beta2")):
        _check(beta, f"{where}{label}", lambda x: 0 <= x < 1, "in [0, 1)")
    if key is not None:
        if len(_valid) >= 64:  # a schedule's learning rates: keep the recent ones
            _valid.clear()
        _valid[key] = values
    return values


_FOUR = struct.Struct("4d")
_valid: dict[bytes, Resolution] = {}


def _check(value: Resolved, name: str, ok: Callable[[float], bool], wanted: str) -> None:
    # A Python number is used as float32: β = 0.99999999 is 1.0 to TF.
    number = float(value) if isinstance(value, torch.Tensor) else round_to(value, torch.float32)
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(
            f"hyperparameter {name}={number!r} makes the Adam update undefined; it must be "
            f"{wanted}."
        )
