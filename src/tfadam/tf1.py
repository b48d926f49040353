"""``tfadam.AdamOptimizer``: the calling convention of TF1's AdamOptimizer.

Variables are torch tensors (``nn.Parameter`` or plain leaf tensors), updated
in place. Slots ``m`` and ``v`` are created the first time a variable is
updated; the float32 accumulators ``beta1_power``/``beta2_power`` at the first
apply call. A variable first updated at a later call starts from the
accumulators' current values, as in TF.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from . import engine, guard
from .hyper import Hyper
from .sparse import IndexedSlices

GradAndVar = tuple[engine.Gradient | None, torch.Tensor]


class AdamOptimizer:
    """TF1's ``tf.compat.v1.train.AdamOptimizer`` on torch tensors, bit for bit.

    Args:
        learning_rate, beta1, beta2, epsilon: numbers, 0-dim tensors or
            zero-argument callables (evaluated once per apply call).
        use_locking: serialise concurrent ``apply_gradients`` calls, so the
            result equals the serial order of them given by the sequence
            numbers ``apply_gradients`` returns. Without it, concurrent calls
            race (see docs/reliability.md).
        name: the optimizer's name (used in slot names, as TF does).
        numerics: ``"eager"`` (TF2 eager) or ``"graph"`` (a TF1 ``Session``).
        amsgrad, nesterov, sparse: TF kernel options beyond TF1's optimizer,
            see :class:`tfadam.Adam`.
        nonfinite: ``"propagate"`` (TF) or ``"raise"``: scan every gradient
            first and raise :class:`tfadam.NonFiniteGradientError` naming the
            call (and ``global_step``) and the variable, changing nothing.

    Example:
        >>> import torch, tfadam
        >>> w = torch.ones(3)
        >>> step = torch.tensor(0)
        >>> opt = tfadam.AdamOptimizer(learning_rate=0.1)
        >>> opt.apply_gradients([(torch.tensor([1.0, 0.0, -1.0]), w)], global_step=step)
        0
        >>> w, int(step)
        (tensor([0.9000, 1.0000, 1.1000]), 1)
        >>> opt.get_slot(w, "m")
        tensor([ 0.1000,  0.0000, -0.1000])
    """

    def __init__(
        self,
        learning_rate: Hyper = 0.001,
        beta1: Hyper = 0.9,
        beta2: Hyper = 0.999,
        epsilon: Hyper = 1e-8,
        use_locking: bool = False,
        name: str = "Adam",
        *,
        numerics: str = "eager",
        amsgrad: bool = False,
        nesterov: bool = False,
        sparse: engine.SparseMode = "dense",
        nonfinite: engine.Nonfinite = "propagate",
    ) -> None:
        if not name:
            raise ValueError("Must specify the optimizer name")
        self._hyper: dict[str, Hyper] = dict(
            lr=learning_rate, beta1=beta1, beta2=beta2, epsilon=epsilon
        )
        self._options = engine.Options(amsgrad, nesterov, sparse, numerics, nonfinite)  # type: ignore[arg-type]
        self._use_locking = use_locking
        self._name = name
        self._lock = threading.Lock()
        # Keyed by the variable tensor itself (torch hashes tensors by identity).
        self._slots: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self._accumulators: engine.Accumulators | None = None
        self._applied = 0  # apply calls that took effect: the next call's sequence number

    def get_name(self) -> str:
        return self._name

    @property
    def use_locking(self) -> bool:
        return self._use_locking

    def apply_gradients(
        self,
        grads_and_vars: Iterable[GradAndVar],
        global_step: torch.Tensor | None = None,
        name: str | None = None,
    ) -> int:
        """Apply one Adam step to each variable whose gradient is not None.

        ``grads_and_vars`` pairs (gradient, variable); a gradient is a dense
        tensor, a torch sparse COO tensor, an :class:`IndexedSlices` or None.
        ``global_step`` (an integer 0-dim tensor) is incremented by one.
        Everything is validated before anything is modified.

        Returns the call's sequence number: 0 for the first call that took
        effect, then 1, 2, ... (a call that raises takes none). With
        ``use_locking=True`` it is assigned under the lock, so replaying the
        calls serially in this order reproduces the state bit for bit.
        """
        pairs = list(grads_and_vars)
        if not pairs:
            raise ValueError("No variables provided.")
        updates = []
        for position, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    f"grads_and_vars[{position}] must be a (gradient, variable) pair; got "
                    f"{type(pair).__name__}."
                )
            grad, var = pair
            if grad is None:
                continue
            updates.append(engine.Update(var, grad, {}, _label(position, var)))
        if not updates:
            shapes = ", ".join(_label(i, var) for i, (_, var) in enumerate(pairs))
            raise ValueError(
                f"No gradients provided for any variable: {shapes}. Check that the loss "
                "depends on the variables (compute_gradients returns None for unused ones)."
            )
        if global_step is not None:
            _check_global_step(global_step)
        with self._lock if self._use_locking else nullcontext():
            _check_distinct(updates)
            _check_not_views_of_slotted(updates, self._slots)
            # A non-tensor may be unhashable; prepare() names it properly.
            updates = [
                engine.Update(u.param, u.grad, self._slots.get(u.param, {}), u.name)
                if isinstance(u.param, torch.Tensor)
                else u
                for u in updates
            ]
            hyper = engine.resolve_all(**self._hyper, where="")
            when = f"apply_gradients #{self._applied}"
            if global_step is not None and self._options.nonfinite == "raise":
                when += f" (global_step {int(global_step)})"  # a device sync: only if asked
            accumulators = self._accumulators or engine.Accumulators.create(
                hyper.beta1, hyper.beta2
            )
            plan = engine.prepare(
                updates, hyper, self._options, accumulators=accumulators, when=when
            )
            guard.warn_numerics(self, plan.hyper, plan.dtypes)
            # The step and its record commit together: an interrupt waits for both.
            with engine.atomic():
                engine.execute(plan, engine.BetaPowers(plan))
                self._accumulators = accumulators
                for update in plan.updates:
                    self._slots[update.param] = update.state  # type: ignore[assignment]
                if global_step is not None:
                    global_step.add_(1)
                sequence = self._applied
                self._applied += 1
        return sequence

    def compute_gradients(
        self,
        loss: torch.Tensor | Callable[[], torch.Tensor],
        var_list: Sequence[torch.Tensor] | None = None,
        grad_loss: torch.Tensor | None = None,
        **_unused: Any,
    ) -> list[GradAndVar]:
        """Gradients of ``loss`` (a tensor or a callable returning one).

        ``var_list`` defaults to every leaf tensor requiring grad that the
        loss depends on (TF's trainable variables). A variable the loss does
        not depend on gets gradient None, as in TF.
        """
        if callable(loss) and not isinstance(loss, torch.Tensor):
            with torch.enable_grad():
                loss = loss()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a tensor or a callable returning one; got {loss!r}.")
        if var_list is None:
            var_list = _leaves_of(loss)
        var_list = list(var_list)
        if not var_list:
            raise ValueError("No variables to optimize.")
        for position, var in enumerate(var_list):
            if not isinstance(var, torch.Tensor) or not var.dtype.is_floating_point:
                raise TypeError(
                    f"{_label(position, var)} is not a floating torch tensor; Adam optimizes "
                    "float16, bfloat16, float32 and float64 variables."
                )
            if not var.requires_grad:
                raise ValueError(
                    f"{_label(position, var)} does not require grad; set "
                    "var.requires_grad_(True) or leave it out of var_list."
                )
        grads = torch.autograd.grad(
            loss,
            var_list,
            grad_outputs=grad_loss,
            allow_unused=True,
        )
        return list(zip(grads, var_list, strict=False))

    def minimize(
        self,
        loss: torch.Tensor | Callable[[], torch.Tensor],
        global_step: torch.Tensor | None = None,
        var_list: Sequence[torch.Tensor] | None = None,
        grad_loss: torch.Tensor | None = None,
        name: str | None = None,
        **_unused: Any,
    ) -> int:
        """``compute_gradients`` then ``apply_gradients``; returns its sequence number."""
        grads_and_vars = self.compute_gradients(loss, var_list=var_list, grad_loss=grad_loss)
        if all(grad is None for grad, _ in grads_and_vars):
            raise ValueError(
                "No gradients provided for any variable, check your graph for ops that do not "
                "support gradients, between the variables and the loss."
            )
        return self.apply_gradients(grads_and_vars, global_step=global_step, name=name)

    def get_slot_names(self) -> list[str]:
        """``["m", "v"]`` (plus ``"vhat"`` with amsgrad)."""
        return self._options.slot_names

    def get_slot(self, var: torch.Tensor, name: str) -> torch.Tensor | None:
        """The slot ``name`` of ``var``, or None for an unknown variable or name."""
        return self._slots.get(var, {}).get(name)

    def variables(self) -> list[torch.Tensor]:
        """The accumulators (``beta1_power``, ``beta2_power``) then every slot."""
        found = []
        if self._accumulators is not None:
            found += [self._accumulators.beta1_power, self._accumulators.beta2_power]
        for slots in self._slots.values():
            found += [slots[name] for name in self._options.slot_names if name in slots]
        return found

    def _get_beta_accumulators(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """TF1's name for the float32 ``(beta1_power, beta2_power)``; None before a step."""
        if self._accumulators is None:
            return None
        return self._accumulators.beta1_power, self._accumulators.beta2_power

    def slots_of(self, var: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The slots of ``var`` by name (the tensors themselves), or None if it has none yet."""
        slots = self._slots.get(var)
        return None if slots is None else dict(slots)

    def export_state(self) -> dict[str, Any]:
        """The optimizer's state: its tensors themselves, not copies.

        ``{"beta1_power", "beta2_power", "slots"}``: the float32 accumulators
        (None before the first apply call) and ``{variable: {slot: tensor}}``.
        :meth:`import_state` takes it back.
        """
        powers = self._get_beta_accumulators()
        return {
            "beta1_power": None if powers is None else powers[0],
            "beta2_power": None if powers is None else powers[1],
            "slots": {var: dict(slots) for var, slots in self._slots.items()},
        }

    def import_state(self, state: dict[str, Any]) -> None:
        """Replace the whole state by ``state`` (as :meth:`export_state` gives it), all or nothing.

        Slots are copied. Checked as a step checks (:func:`tfadam.guard.check_state`)
        before anything is replaced; accumulators of None (a state from before the
        first apply call) need empty slots.
        """
        self._load(state["beta1_power"], state["beta2_power"], state["slots"], replace=True)

    def restore(
        self,
        beta1_power: float | torch.Tensor,
        beta2_power: float | torch.Tensor,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        """Set the accumulators and (optionally) slots, e.g. from a TF checkpoint.

        Slots are copied; each must match its variable's shape, dtype and
        device. All or nothing: checked as a step checks, before anything is set.

        >>> import torch, tfadam
        >>> opt = tfadam.AdamOptimizer()
        >>> opt.restore(1.5, 2.0)
        Traceback (most recent call last):
        ...
        ValueError: beta1_power is 1.5, outside [0, 1) (it is a product of betas in [0, 1)); TF \
keeps the beta-power accumulators as scalars in [0, 1), in β's dtype. Was the state edited or \
saved by another optimizer?
        """
        self._load(beta1_power, beta2_power, slots or {}, replace=False)

    def _load(
        self,
        beta1_power: Any,
        beta2_power: Any,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        *,
        replace: bool,
    ) -> None:
        names = self._options.slot_names
        new_slots: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for position, (var, named) in enumerate(slots.items()):
            label = _label(position, var)
            if not isinstance(named, dict) or not set(named) <= set(names):
                raise ValueError(
                    f"{label}: slots {sorted(named) if isinstance(named, dict) else named!r}; "
                    f"this optimizer keeps {names}."
                )
            for slot, tensor in named.items():
                if not isinstance(tensor, torch.Tensor):
                    raise TypeError(
                        f"{label}: its optimizer slot {slot!r} is a {type(tensor).__name__}, "
                        "not a tensor."
                    )
            new_slots[var] = {name: tensor.detach().clone() for name, tensor in named.items()}
        if beta1_power is None and beta2_power is None:
            if new_slots:
                raise ValueError("slots without beta-power accumulators: load a complete state.")
            accumulators = None
        else:
            for key, power in (("beta1_power", beta1_power), ("beta2_power", beta2_power)):
                if not isinstance(power, (int, float, torch.Tensor)) or isinstance(power, bool):
                    raise TypeError(f"{key} is a {type(power).__name__}, not a number or tensor.")
                if isinstance(power, torch.Tensor) and (power.is_meta or power.numel() != 1):
                    raise ValueError(
                        f"{key} is a tensor of shape {tuple(power.shape)} on {power.device}; "
                        "pass a number or a one-element tensor with a value."
                    )
            accumulators = engine.Accumulators.create(beta1_power, beta2_power)
        merged = new_slots if replace else {**self._slots, **new_slots}
        labels = {var: _label(position, var) for position, var in enumerate(new_slots)}
        engine.check_state(
            [
                (var, named, labels.get(var) or _held_label(var), self._options)
                for var, named in merged.items()
            ],
            []
            if accumulators is None
            else [(accumulators.beta1_power, accumulators.beta2_power, "")],
        )
        with engine.atomic():
            self._accumulators = accumulators
            self._slots = merged


def _label(position: int, var: Any) -> str:
    if isinstance(var, torch.Tensor):
        return f"variable #{position} (shape {tuple(var.shape)}, {var.dtype})"
    return f"variable #{position} ({type(var).__name__})"


def _held_label(var: torch.Tensor) -> str:
    return f"a variable this optimizer already holds (shape {tuple(var.shape)}, {var.dtype})"


def _check_global_step(global_step: Any) -> None:
    if (
        not isinstance(global_step, torch.Tensor)
        or global_step.dim() != 0
        or global_step.dtype.is_floating_point
        or global_step.dtype.is_complex
        or global_step.dtype == torch.bool
        or global_step.is_meta
    ):
        raise TypeError(
            f"global_step must be an integer 0-dim tensor (e.g. torch.tensor(0)); got "
            f"{global_step!r}."
        )
    problem = guard.unwritable(global_step)
    if problem:
        raise ValueError(f"global_step {problem}")


def _check_distinct(updates: Sequence[engine.Update]) -> None:
    seen: dict[int, str] = {}
    for update in updates:
        key = id(update.param)
        if key in seen:
            raise ValueError(
                f"{update.name} appears twice in grads_and_vars (also as {seen[key]}); "
                "pass each variable once."
            )
        seen[key] = update.name


def _check_not_views_of_slotted(
    updates: Sequence[engine.Update], slots: dict[torch.Tensor, dict[str, torch.Tensor]]
) -> None:
    # Slots belong to a tensor object; each `w.T` is a new one, which would get
    # fresh zero slots while w's (restored, say) stay unused.
    for update in updates:
        var = update.param
        base = getattr(var, "_base", None) if isinstance(var, torch.Tensor) else None
        # (A view of part of a variable is refused later, as memory two variables share.)
        if base is not None and var not in slots and base in slots and var.numel() == base.numel():
            raise ValueError(
                f"{update.name} is a view of a variable that has Adam slots (a new tensor "
                "object each time, e.g. weight.T); pass the variable itself, with its "
                "gradient in its layout."
            )


def _leaves_of(loss: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``loss`` depends on, in graph order."""
    found: list[torch.Tensor] = []
    if loss.grad_fn is None:
        return [loss] if loss.requires_grad else found
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor) and all(variable is not f for f in found):
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


__all__ = ["AdamOptimizer", "IndexedSlices"]
