"""Hyperparameters: numbers, 0-dim tensors or zero-argument callables.

TF1's ``_prepare`` evaluates each hyperparameter once per apply call, before
any variable is touched, and converts Python numbers to float32 tensors; each
update then casts them to the variable's dtype (see :mod:`tfadam.rule`).

Example:
    >>> import torch
    >>> resolve(lambda: torch.tensor(0.5), "lr")
    tensor(0.5000)
    >>> resolve(1e-3, "lr")
    0.001
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels.scalars import round_to

Hyper = float | int | torch.Tensor | Callable[[], "float | int | torch.Tensor"]
Resolved = float | torch.Tensor

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def resolve(value: Hyper, name: str) -> Resolved:
    """Evaluate a hyperparameter: call it if callable, check it is a real scalar.

    Returns a Python float or a detached 0-dim CPU tensor (its dtype kept:
    TF casts a tensor hyperparameter from its own dtype, numbers from float32).
    Raises ``ValueError``/``TypeError`` naming ``name`` for anything else.
    """
    if callable(value) and not isinstance(value, torch.Tensor):
        try:
            value = value()
        except Exception as error:
            raise ValueError(
                f"hyperparameter {name}: its callable {value!r} raised "
                f"{type(error).__name__}: {error}. A callable hyperparameter is evaluated "
                "once per step and must return a number or a 0-dim tensor."
            ) from error
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(
            f"hyperparameter {name} must be a number, a 0-dim tensor or a zero-argument "
            f"callable returning one; got {type(value).__name__} {value!r}."
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


@dataclass(frozen=True)
class Resolution:
    """The four hyperparameters of one apply call, evaluated and checked."""

    lr: Resolved
    beta1: Resolved
    beta2: Resolved
    epsilon: Resolved


def resolve_all(lr: Hyper, beta1: Hyper, beta2: Hyper, epsilon: Hyper, where: str) -> Resolution:
    """Evaluate and check lr, β1, β2, ε; ``where`` names them in errors."""
    # Four floats seen before need no new checks: the common step. Keyed by
    # the bits, so that 0.0 and -0.0 (different to TF's arithmetic) stay apart.
    floats = type(lr) is float and type(beta1) is float and type(beta2) is float
    key = _FOUR.pack(lr, beta1, beta2, epsilon) if floats and type(epsilon) is float else None
    known = _valid.get(key) if key is not None else None  # one lookup: another thread may clear
    if known is not None:
        return known
    values = Resolution(
        lr=resolve(lr, f"{where}lr"),
        beta1=resolve(beta1, f"{where}beta1"),
        beta2=resolve(beta2, f"{where}beta2"),
        epsilon=resolve(epsilon, f"{where}epsilon"),
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
