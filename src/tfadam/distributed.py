"""tfadam with ``torch.distributed``: DDP, ZeRO, FSDP2 and distributed checkpoints.

:class:`tfadam.Adam` needs nothing special under ``DistributedDataParallel``,
``ZeroRedundancyOptimizer`` or FSDP2 (``fully_shard``): each process updates
the parameters, or the DTensor shards, it holds, and the group accumulators
advance identically on every rank. This module holds the one thing that does
need care, materialising the optimizer state before
``torch.distributed.checkpoint`` (DCP) looks at it; the README's "Scaling out" section has
the full recipe.
"""

from __future__ import annotations

import torch

from . import engine

__all__ = ["init_state"]


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the slots and accumulators a first step would create, without stepping.

    DCP's ``get_optimizer_state_dict``/``set_optimizer_state_dict`` (and
    ``get_state_dict``) find an optimizer with empty state and materialise it
    by calling ``step()`` with zero gradients and ``lr=0``. That leaves θ, m
    and v as they were, but, as in TF, every step multiplies the accumulators
    by β: the first real step would then use β^2's bias correction (torch's
    own Adam likewise counts the step; pytorch issue 164929). Calling this
    right after creating the optimizer makes the state exist, so DCP takes no
    step. The state is the one TF1 creates when it builds the update op: m
    and v are zeros like each parameter that requires grad (DTensor slots for
    DTensor parameters, so that DCP saves them sharded), and each group's
    accumulators start at β1 and β2 as evaluated now. State that already
    exists is left alone, so calling it again, or after a step, changes
    nothing.

    Args:
        optimizer: a :class:`tfadam.Adam`.

    Example:
        >>> import torch, tfadam
        >>> from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = tfadam.Adam(model.parameters(), lr=0.01)
        >>> init_state(opt)
        >>> state = get_optimizer_state_dict(model, opt)  # takes no step now
        >>> float(opt.param_groups[0]["beta1_power"])
        0.8999999761581421
    """
    from .optimizer import Adam

    if not isinstance(optimizer, Adam):
        raise TypeError(
            f"init_state expects a tfadam.Adam, got {type(optimizer).__name__}; other "
            "optimizers keep their state their own way."
        )
    for index, group in enumerate(optimizer.param_groups):
        where = f"param_groups[{index}] "
        options = engine.Options(
            group["amsgrad"], group["nesterov"], group["sparse"], group["numerics"]
        )
        if group.get("beta1_power") is None and group.get("beta2_power") is None:
            betas = group["betas"]
            hyper = engine.resolve_all(group["lr"], betas[0], betas[1], group["eps"], where)
            accumulators = engine.Accumulators.create(hyper.beta1, hyper.beta2)
            group["beta1_power"] = accumulators.beta1_power
            group["beta2_power"] = accumulators.beta2_power
        with torch.no_grad():
            for param in group["params"]:
                if param.requires_grad:
                    engine.create_slots(param, optimizer.state[param], options)
