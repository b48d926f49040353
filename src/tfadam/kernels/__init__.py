"""Kernels: implementations of :mod:`tfadam.rule`, chosen per call.

A kernel receives tensors and :class:`~tfadam.rule.Coefficients` — never a
param group or an optimizer. :func:`dense_step` and :func:`sparse_step` pick
the fastest implementation that handles the given tensors:

* CPU: the fused C kernels of :mod:`tfadam.kernels.cpu` (compiled on first
  use, see :mod:`tfadam.kernels.native`), for plain tensors in a dense layout;
* CUDA: :mod:`tfadam.kernels.cuda` (multi-tensor torch ops, each rounding once);
* anything else (other devices, tensor subclasses such as DTensor, layouts
  the C loop cannot walk, no C compiler): :mod:`tfadam.kernels.reference`.

All of them give the same bits; the tests prove it with ``==`` on integer views.
The per-step scalars (:func:`tf1_coefficients`, :func:`advance_accumulators`)
come from :mod:`tfadam.kernels.scalars`: the rule's numbers without torch ops.

Example:
    >>> import torch
    >>> from tfadam import kernels, rule
    >>> theta, g, m, v = torch.ones(3), torch.ones(3), torch.zeros(3), torch.zeros(3)
    >>> c = rule.tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                           beta1_power=0.9, beta2_power=0.999, dtype=torch.float32)
    >>> kernels.dense_step([theta], [g], [m], [v], None, c)
    >>> theta
    tensor([0.9000, 0.9000, 0.9000])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import torch

from .. import rule
from ..eager import eager_only
from . import cpu, cuda, reference
from .scalars import advance_accumulators, float32_value, tf1_coefficients

__all__ = [
    "advance_accumulators",
    "dense_step",
    "float32_value",
    "sparse_step",
    "tf1_coefficients",
]

# Plain tensors only: a tensor subclass (DTensor, FakeTensor, ...) may have no
# storage behind data_ptr(), or its own idea of in-place ops.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _plain(tensors: Iterable[torch.Tensor]) -> bool:
    return _PLAIN.issuperset(map(type, tensors))


@eager_only
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
    """Dense Adam on tensors of one dtype and device (see :func:`rule.dense_update`)::

        m = m + (g - m) * (1 - β1)
        v = v + (g*g - v) * (1 - β2)
        θ = θ - (m * alpha) / (sqrt(v) + ε)

    every operation rounded to the dtype, in place, for each tensor.
    """
    if not thetas:
        return
    device = thetas[0].device.type
    plain = _plain(chain(thetas, grads, ms, vs, vhats or ()))
    if plain and device == "cpu" and cpu.available():
        skipped = cpu.dense_step(thetas, grads, ms, vs, vhats, c, nesterov=nesterov)
        if skipped:
            reference.dense_step(
                [thetas[i] for i in skipped],
                [grads[i] for i in skipped],
                [ms[i] for i in skipped],
                [vs[i] for i in skipped],
                None if vhats is None else [vhats[i] for i in skipped],
                c,
                nesterov=nesterov,
            )
        return
    if plain and device == "cuda":
        cuda.dense_step(thetas, grads, ms, vs, vhats, c, nesterov=nesterov)
        return
    reference.dense_step(thetas, grads, ms, vs, vhats, c, nesterov=nesterov)


@eager_only
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
    """Sparse Adam with raw (possibly repeated) row indices, already range-checked.

    Duplicate rows are summed as TF does (from zero, in order of occurrence,
    rounding each addition), then :func:`rule.sparse_update` (every row decays
    and moves) or, with ``lazy``, :func:`rule.lazy_sparse_update` (touched rows only).
    """
    # Grappler folds float32/float64 only (see rule.sparse_update); its
    # x * rsqrt(v) form when ε is 0 in T is rare and left to the reference.
    folded = numerics == "graph" and theta.dtype in (torch.float32, torch.float64)
    graph_rsqrt = numerics == "graph" and c.epsilon == 0 and not lazy
    if (
        not graph_rsqrt
        and theta.device.type == "cpu"
        and _plain((theta, m, v, indices, values))
        and cpu.available()
        and cpu.sparse_step(
            theta, m, v, indices, values, c, lazy=lazy, numerics="graph" if folded else "eager"
        )
    ):
        return
    reference.sparse_step(theta, m, v, indices, values, c, lazy=lazy, numerics=numerics)
