"""Kernels: implementations of :mod:`tfadam.rule`, chosen per call.

A kernel receives tensors and :class:`~tfadam.rule.Coefficients` — never a
param group or an optimizer. :func:`dense_step` and :func:`sparse_step` pick
the fastest implementation that handles the given tensors and fall back to
:mod:`tfadam.kernels.reference`, which handles everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rule
from . import reference


def dense_step(
    thetas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor] | None,
    c: rule.Coefficients,
    *,
    nesterov: bool = False,
) -> None:
    """Dense Adam on tensors of one dtype and device (see :func:`rule.dense_update`)."""
    reference.dense_step(thetas, grads, ms, vs, vhats, c, nesterov=nesterov)


def sparse_step(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    c: rule.Coefficients,
    *,
    lazy: bool = False,
    numerics: rule.Numerics = "eager",
) -> None:
    """Sparse Adam with raw (possibly repeated) row indices, already range-checked."""
    reference.sparse_step(theta, m, v, indices, values, c, lazy=lazy, numerics=numerics)
