"""The CUDA path: :mod:`tfadam.rule` as multi-tensor torch ops on the GPU.

Each ``torch._foreach_*`` call below performs ONE arithmetic operation per
element (a subtraction, a product by a scalar, a square root, a quotient),
so every operation is rounded to the dtype exactly where the rule rounds it,
whatever the CUDA compiler contracts inside a kernel: there is nothing to
fuse into an FMA within one rounding. (Where torch's foreach kernels take an
``alpha``, we pass none: ``a + 1*b`` by an FMA is still ``a + b`` rounded once.)
CUDA's ``sqrt`` and division are IEEE (torch does not build with
``--use_fast_math``), and float16/bfloat16 ops compute in float32 and round
once, as on the CPU. So this path is meant to be bitwise-equal to the CPU
reference; it is UNMEASURED: no GPU was available when it was written, and
its tests skip themselves without one.

It makes ~10 passes over memory where a fused kernel would make one: correct
first; a fused Triton kernel (with FMA contraction off) is the next step.
Sparse updates on CUDA use the reference kernels.

Example (needs a GPU):
    >>> import torch
    >>> from tfadam import rule
    >>> from tfadam.kernels import cuda
    >>> if torch.cuda.is_available():
    ...     t, g, m, v = (torch.ones(3, device="cuda") for _ in range(4))
    ...     c = rule.tf1_coefficients(lr=0.1, beta1=0.9, beta2=0.999, epsilon=1e-8,
    ...                               beta1_power=0.9, beta2_power=0.999, dtype=t.dtype)
    ...     cuda.dense_step([t], [g], [m], [v], None, c, nesterov=False)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rule


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
    """:func:`tfadam.rule.dense_update` for every tensor, one rounding per op."""
    thetas, grads, ms, vs = list(thetas), list(grads), list(ms), list(vs)
    # m = m + (g - m) * (1 - β1)
    step = torch._foreach_sub(grads, ms)
    torch._foreach_mul_(step, c.one_minus_beta1)
    torch._foreach_add_(ms, step)
    # v = v + (g*g - v) * (1 - β2)
    step = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(step, vs)
    torch._foreach_mul_(step, c.one_minus_beta2)
    torch._foreach_add_(vs, step)
    if vhats is not None:
        torch._foreach_maximum_(list(vhats), vs)
    # denominator = sqrt(v or vhat) + ε
    denominator = torch._foreach_sqrt(vs if vhats is None else list(vhats))
    torch._foreach_add_(denominator, c.epsilon)
    if nesterov:
        # g*(1 - β1) + β1*m
        numerator = torch._foreach_mul(grads, c.one_minus_beta1)
        torch._foreach_add_(numerator, torch._foreach_mul(ms, c.beta1))
    else:
        numerator = torch._foreach_mul(ms, 1.0)  # a copy: m itself must not change
    # θ = θ - (numerator * alpha) / denominator
    torch._foreach_mul_(numerator, c.alpha)
    torch._foreach_div_(numerator, denominator)
    torch._foreach_sub_(thetas, numerator)
