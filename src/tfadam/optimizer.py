"""``tfadam.Adam``: TF's Adam as a real ``torch.optim.Optimizer``.

Each param group behaves as one TF1 ``AdamOptimizer``: its own float32
``beta1_power``/``beta2_power`` accumulators (kept in the group, so that
``state_dict()`` carries them), shared by the group's parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import engine
from .hyper import Hyper

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]


class Adam(torch.optim.Optimizer):
    r"""TensorFlow's Adam (``tf.compat.v1.train.AdamOptimizer``), bit for bit.

    With :math:`\beta_1^t, \beta_2^t` the group's float32 accumulators
    (starting at :math:`\beta_1, \beta_2`, multiplied by them after each step)::

        alpha = lr * sqrt(1 - β2^t) / (1 - β1^t)
        m = m + (g - m) * (1 - β1)
        v = v + (g*g - v) * (1 - β2)
        θ = θ - (m * alpha) / (sqrt(v) + ε)

    every operation rounded to the parameter's dtype, as TF does. ε is
    "epsilon hat", added after the bias correction (unlike ``torch.optim.Adam``).

    Args:
        params: parameters or param groups (dicts), as for any torch optimizer.
        lr, betas, eps: numbers, 0-dim tensors or zero-argument callables
            (evaluated once per step).
        amsgrad: TF's ``ApplyAdamWithAmsgrad``.
        nesterov: TF's ``use_nesterov``.
        sparse: ``"dense"`` (TF1: sparse gradients decay every row) or ``"lazy"``.
        numerics: ``"eager"`` or ``"graph"`` (TF1 graph-mode rounding of sparse
            updates; use it to resume a TF1 ``Session`` run).

    A group whose parameters all have ``grad is None`` is skipped, accumulators
    included. Sparse COO gradients (``nn.Embedding(sparse=True)``) are accepted.

    Example:
        >>> import torch, tfadam
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = tfadam.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -1.0])
        >>> opt.step()
        >>> w.detach()
        tensor([0.9000, 1.1000])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Hyper = 1e-3,
        betas: tuple[Hyper, Hyper] = (0.9, 0.999),
        eps: Hyper = 1e-8,
        *,
        amsgrad: bool = False,
        nesterov: bool = False,
        sparse: engine.SparseMode = "dense",
        numerics: str = "eager",
    ) -> None:
        engine.Options(amsgrad, nesterov, sparse, numerics)  # type: ignore[arg-type]
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            amsgrad=amsgrad,
            nesterov=nesterov,
            sparse=sparse,
            numerics=numerics,
        )
        super().__init__(params, defaults)

    # torch.compile runs the step eagerly (a graph break): the kernels are C
    # called through ctypes, which dynamo cannot trace, and tracing the
    # validation only burns compile time and recompiles.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Adam step on every group; validates all groups before touching any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        for index, group in enumerate(self.param_groups):
            updates = self._updates(index, group)
            if not updates:
                continue
            where = f"param_groups[{index}] "
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"{where}betas must be a pair (beta1, beta2); got {betas!r}.")
            hyper = engine.resolve_all(group["lr"], betas[0], betas[1], group["eps"], where)
            options = engine.Options(
                group["amsgrad"], group["nesterov"], group["sparse"], group["numerics"]
            )
            accumulators = _accumulators_of(group, where)
            plans.append((group, engine.prepare(updates, hyper, options), accumulators))
        for group, plan, accumulators in plans:
            accumulators = engine.execute(plan, accumulators)
            group["beta1_power"] = accumulators.beta1_power
            group["beta2_power"] = accumulators.beta2_power
        return loss

    def _updates(self, index: int, group: dict[str, Any]) -> list[engine.Update]:
        names = group.get("param_names")
        updates = []
        for position, param in enumerate(group["params"]):
            if param.grad is None:
                continue
            label = f"param_groups[{index}]['params'][{position}]"
            if names is not None:
                label += f" ({names[position]!r})"
            updates.append(engine.Update(param, param.grad, self.state[param], label))
        return updates


def _accumulators_of(group: dict[str, Any], where: str) -> engine.Accumulators | None:
    powers = [group.get("beta1_power"), group.get("beta2_power")]
    if powers[0] is None and powers[1] is None:
        return None
    for key, power in zip(("beta1_power", "beta2_power"), powers, strict=False):
        if (
            not isinstance(power, torch.Tensor)
            or power.dtype != torch.float32
            or power.numel() != 1
        ):
            raise ValueError(
                f"{where}{key} must be a float32 scalar tensor (TF keeps the beta-power "
                f"accumulators in float32); got {power!r}. Was the state_dict edited or "
                "saved by another optimizer?"
            )
    return engine.Accumulators(*powers)
