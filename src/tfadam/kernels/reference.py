"""The reference kernels: :mod:`tfadam.rule` applied tensor by tensor.

Correct on every device, layout and dtype; the fast kernels are proven
bitwise-equal to these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rule
from ..sparse import deduplicate


def dense_step(
    thetas: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    ms: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    vhats: Sequence[torch.Tensor] | None,
    c: rule.Coefficients,
    *,
    nesterov: bool,
) -> None:
    for i, theta in enumerate(thetas):
        vhat = None if vhats is None else vhats[i]
        rule.dense_update(theta, ms[i], vs[i], grads[i], c, nesterov=nesterov, vhat=vhat)


def sparse_step(
    theta: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    c: rule.Coefficients,
    *,
    lazy: bool,
    numerics: rule.Numerics,
) -> None:
    rows, summed = deduplicate(indices, values)
    if lazy:
        rule.lazy_sparse_update(theta, m, v, rows, summed, c)
    else:
        rule.sparse_update(theta, m, v, rows, summed, c, numerics=numerics)
