"""The engine every face calls: validate into a plan, then execute it.

One apply call (TF1's ``apply_gradients``, one param group of
``tfadam.Adam.step``, one Keras ``apply_gradients``) runs in two phases with a
hard line between them:

1. :func:`prepare` checks every variable, gradient, slot and accumulator
   (through :mod:`tfadam.guard`, the validation layer) and returns an
   immutable :class:`Plan`. Everything that can fail for a reason in the
   input fails here, and nothing is modified.
2. :func:`execute` runs a plan: creates missing slots, takes the
   coefficients from the face's :class:`Schedule` (TF1's :class:`BetaPowers`,
   Keras' iteration counter), runs the kernels (:mod:`tfadam.kernels`) and
   advances the schedule. It performs arithmetic only, with the interrupts
   of :mod:`tfadam.interrupts` held, so a step is applied entirely or not at all.

What a face does around the update (Keras' loss scaling, gradient
accumulation, clipping, weight decay, moving average) enters :func:`execute`
as a sequence of transforms (:class:`Transform`), run in their order in the
same held block: the step and its transforms commit together.

Example:
    >>> import torch
    >>> theta = torch.zeros(3)
    >>> state: dict = {}
    >>> plan = prepare([Update(theta, torch.ones(3), state, "theta")],
    ...                resolve_all(0.1, 0.9, 0.999, 1e-8, ""), Options(),
    ...                accumulators=Accumulators.create(0.9, 0.999))
    >>> execute(plan, BetaPowers(plan))
    >>> theta, float(plan.accumulators.beta1_power)
    (tensor([-0.1000, -0.1000, -0.1000]), 0.809999942779541)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from operator import attrgetter, is_, itemgetter
from typing import Any, Protocol

import numpy as np
import torch

from . import guard, keras_rule, kernels, rule
from .guard import FLOATING, PLAIN, Gradient, Nonfinite, Options, SparseMode
from .hyper import Resolution, accumulator_mismatch, resolve_all
from .interrupts import held
from .layouts import Layouts
from .sparse import IndexedSlices

__all__ = [
    "Accumulators",
    "BetaPowers",
    "FLOATING",
    "Gradient",
    "Nonfinite",
    "Options",
    "Plan",
    "Schedule",
    "SparseMode",
    "Steady",
    "Transform",
    "Update",
    "atomic",
    "check_state",
    "create_slots",
    "execute",
    "prepare",
    "resolve_all",
    "reuse",
]

check_state = guard.check_state


def atomic() -> AbstractContextManager[None]:
    """A block that an interrupt cannot split (see :mod:`tfadam.interrupts`).

    :func:`execute` runs in one; a face wraps its own bookkeeping of a step
    (storing new slots, counting the step) together with :func:`execute` in
    another, so that the step and its record commit together.
    """
    return held()


@dataclass
class Accumulators:
    """``beta1_power``, ``beta2_power``: 0-dim tensors in β's dtype (see :mod:`tfadam.hyper`)."""

    beta1_power: torch.Tensor
    beta2_power: torch.Tensor

    @classmethod
    def create(cls, beta1: float | torch.Tensor, beta2: float | torch.Tensor) -> Accumulators:
        def start(beta: float | torch.Tensor) -> torch.Tensor:
            # A Python number is float32 to TF; a tensor or NumPy value keeps its dtype.
            dtype = torch.float32 if type(beta) in (int, float) else torch.as_tensor(beta).dtype
            return torch.as_tensor(beta).detach().to("cpu", dtype).clone().reshape(())

        return cls(start(beta1), start(beta2))

    def check(self, hyper: Resolution) -> None:
        """Raise where the accumulators are unusable, or not in the dtype TF gives β."""
        guard.check_accumulators(self.beta1_power, self.beta2_power, "")
        mismatch = accumulator_mismatch(hyper.beta1, hyper.beta2, *_powers(self))
        if mismatch:  # TF fails here only after the variables moved
            raise TypeError(mismatch)


def _powers(accumulators: Accumulators | None) -> tuple[torch.Tensor, ...]:
    """The accumulators' tensors (none without accumulators)."""
    if accumulators is None:
        return ()
    return (accumulators.beta1_power, accumulators.beta2_power)


class Update(tuple):
    """One variable in one apply call: its gradient, its slots, its name for errors.

    An immutable record. It is a tuple so that a face can build thousands of
    them at C speed (:meth:`many`); it compares by identity, like the tensors
    it holds. ``name`` may be given as a function that makes it: a step over
    thousands of parameters needs a name only when something is wrong.

    >>> u = Update(torch.zeros(2), torch.ones(2), {}, lambda: "w")
    >>> u.name, u.grad
    ('w', tensor([1., 1.]))
    """

    __slots__ = ()

    def __new__(
        cls,
        param: torch.Tensor,
        grad: Gradient,
        state: MutableMapping[str, torch.Tensor],
        name: str | Callable[[], str],
    ) -> Update:
        return tuple.__new__(cls, (param, grad, state, name))

    @classmethod
    def many(
        cls,
        params: Iterable[torch.Tensor],
        grads: Iterable[Gradient],
        states: Iterable[MutableMapping[str, torch.Tensor]],
        names: Iterable[str | Callable[[], str]],
    ) -> list[Update]:
        """``[Update(*fields) for fields in zip(...)]``, without a Python call per update."""
        return list(
            map(partial(tuple.__new__, cls), zip(params, grads, states, names, strict=True))
        )

    param: torch.Tensor = property(itemgetter(0))  # type: ignore[assignment]
    grad: Gradient = property(itemgetter(1))  # type: ignore[assignment]
    state: MutableMapping[str, torch.Tensor] = property(itemgetter(2))  # type: ignore[assignment]

    @property
    def name(self) -> str:
        name = self[3]
        return name if isinstance(name, str) else name()

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle: the fields, not one tuple
        return tuple(self)

    __eq__ = object.__eq__  # type: ignore[assignment]
    __ne__ = object.__ne__  # type: ignore[assignment]
    __hash__ = object.__hash__  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Update({self.name}, {_describe(self.param)})"


class Schedule(Protocol):
    """Where a face's coefficients come from, and what it advances after a step.

    TF1 (:class:`BetaPowers`): from the float32 beta-power accumulators, which
    are multiplied by β after the step. Keras: from the iteration counter.
    ``coefficients`` may be called for each dtype of the plan before any write;
    ``advance`` is called once, after the last write of the step.
    """

    def coefficients(self, dtype: torch.dtype) -> rule.Coefficients: ...

    def advance(self) -> None: ...


class BetaPowers:
    """TF1's schedule: coefficients from a plan's ``beta1_power``/``beta2_power``.

    ``alpha = lr * sqrt(1 - β2^t) / (1 - β1^t)`` with the accumulators as
    ``β^t`` (:func:`tfadam.rule.tf1_coefficients`); :meth:`advance` multiplies
    each accumulator by its β, in the accumulator's dtype (β's, as TF converts it).
    """

    def __init__(self, plan: Plan) -> None:
        if plan.accumulators is None:
            raise ValueError("BetaPowers needs a plan prepared with accumulators=...")
        self._hyper = plan.hyper
        self._accumulators = plan.accumulators
        # float32 accumulators (a Python β's: the common case) are read once for
        # all dtypes: each read is a walk through torch's cold code. Others (a
        # NumPy or tensor β's dtype) stay tensors, which the rule casts as TF does.
        powers: tuple[Any, Any] = (plan.accumulators.beta1_power, plan.accumulators.beta2_power)
        if powers[0].dtype == torch.float32 and powers[1].dtype == torch.float32:
            powers = (kernels.float32_value(powers[0]), kernels.float32_value(powers[1]))
        self._powers = powers

    def coefficients(self, dtype: torch.dtype) -> rule.Coefficients:
        hyper = self._hyper
        return kernels.tf1_coefficients(
            lr=hyper.lr,
            beta1=hyper.beta1,
            beta2=hyper.beta2,
            epsilon=hyper.epsilon,
            beta1_power=self._powers[0],
            beta2_power=self._powers[1],
            dtype=dtype,
        )

    def advance(self) -> None:
        accumulators = self._accumulators
        kernels.advance_accumulators(
            accumulators.beta1_power, accumulators.beta2_power, self._hyper.beta1, self._hyper.beta2
        )


class Transform(Protocol):
    """A named step a face takes around the update; :func:`execute` runs its hooks.

    With ``execute(plan, schedule, transforms)`` a call runs, all under the
    held interrupts (one commit)::

        grads = plan's gradients
        for t in transforms: grads = t.gradients(grads)   # until one returns None
        if grads is None:                                 # this call does not update
            for t in transforms: t.after_update(False)
        else:
            (the transformed gradients are checked as prepare checks any)
            for t in transforms: t.before_update()
            the update, with the schedule's coefficients
            for t in transforms: t.after_update(True)
        schedule.advance()                                # once per call, either way

    ``gradients`` computes, and writes nothing, unless it returns None: a
    call that only accumulates (Keras' ``gradient_accumulation_steps``) writes
    its accumulators there, and no update follows. So every check of the
    update comes before its first write. ``before_update`` writes before the
    update (Keras' decoupled weight decay); ``after_update`` after it (Keras'
    moving average, resetting accumulators). Keras' transforms are in
    :mod:`tfadam.keras_rule` (``KerasPolicy``).

    >>> class Log:  # a Transform that changes nothing and says when it runs
    ...     def gradients(self, grads):
    ...         print("gradients"); return grads
    ...     def before_update(self):
    ...         print("before the update")
    ...     def after_update(self, updated):
    ...         print("after the update:", updated)
    >>> theta = torch.zeros(3)
    >>> plan = prepare([Update(theta, torch.ones(3), {}, "theta")],
    ...                resolve_all(0.1, 0.9, 0.999, 1e-8, ""), Options(),
    ...                accumulators=Accumulators.create(0.9, 0.999))
    >>> execute(plan, BetaPowers(plan), [Log()])
    gradients
    before the update
    after the update: True
    >>> theta
    tensor([-0.1000, -0.1000, -0.1000])
    """

    def gradients(self, grads: Sequence[Gradient]) -> Sequence[Gradient] | None: ...

    def before_update(self) -> None: ...

    def after_update(self, updated: bool) -> None: ...


@dataclass(frozen=True)
class Plan:
    """A validated apply call, ready to run; nothing is modified yet.

    Attributes:
        updates: every update, each checked (sparse gradients as
            :class:`IndexedSlices`).
        hyper, options: the call's hyperparameters and the optimizer's options.
        dense: ``((device, dtype), updates)`` for each group of dense updates.
        sparse: the updates with sparse gradients.
        fresh: the updates whose state has no slots yet (:func:`execute`
            creates them).
        accumulators: TF1's beta powers (checked), or None for a face that
            keeps no accumulators.
        written: every tensor the plan writes (variables, existing slots,
            accumulators), for checking later plans of the same step against.
        steady: where every update is dense and plain on the CPU and its slots
            exist, what :func:`reuse` needs to run the next step's plan
            without preparing it again; else None.
        grads: the gradients, in the order of ``steady``'s variables (with
            ``steady`` only).
    """

    updates: tuple[Update, ...]
    hyper: Resolution
    options: Options
    dense: tuple[tuple[tuple[torch.device, torch.dtype], tuple[Update, ...]], ...]
    sparse: tuple[Update, ...]
    fresh: tuple[Update, ...]
    accumulators: Accumulators | None
    written: tuple[torch.Tensor, ...]
    steady: Steady | None = None
    grads: Sequence[torch.Tensor] = ()
    grad_pointers: Any = None  # (an array of ``grads``' addresses, once gathered)

    @property
    def dtypes(self) -> list[torch.dtype]:
        """The variables' dtypes, each once."""
        found = [dtype for (_, dtype), _ in self.dense]
        return list(dict.fromkeys(found + [u.param.dtype for u in self.sparse]))


@dataclass(frozen=True, eq=False)
class Steady:
    """What a prepared plan leaves for the next step: its structure, no gradient.

    Between two steps of a training loop nothing structural changes: the same
    variables, the same slot tensors at the same addresses, the same options;
    only the gradients are new. :func:`reuse` confirms that much (layouts
    and addresses read in one C++ call a list: :class:`tfadam.layouts.Layouts`,
    :mod:`tfadam.kernels.addresses`) and checks the new gradients, which is what
    :func:`prepare` would find; the disjointness of the written tensors,
    proven once, then still holds. A steady plan's dense step runs on a
    :class:`tfadam.kernels.DenseBatch`, whose pointers are gathered once.
    """

    params: tuple[torch.Tensor, ...]
    states: tuple[MutableMapping[str, torch.Tensor], ...]
    slots: tuple[tuple[torch.Tensor, ...], ...]  # one column per slot name
    names: tuple[str | Callable[[], str], ...]
    dtype: torch.dtype
    nbytes: np.ndarray  # of each variable (and of its gradient)
    laid_out: tuple[torch.Tensor, ...]  # the variables, then the slots
    variables: Layouts  # their layouts (dtype, shape, strides...) and addresses
    gradients: Layouts  # the gradients' layouts (plain, contiguous, each of its variable's shape)
    options: Options
    powers: tuple[torch.Tensor, ...]  # the accumulators (identity)
    power_pointers: tuple[int, ...]  # and their addresses (``.data = x`` keeps the identity)
    earlier: tuple[Steady, ...]  # the earlier plans' of the same step, when this was made
    written: tuple[torch.Tensor, ...]
    starts: np.ndarray  # byte ranges written by this plan and the earlier ones, by start
    ends: np.ndarray
    batch: kernels.DenseBatch

    @classmethod
    def of(
        cls,
        updates: Sequence[Update],
        written: tuple[torch.Tensor, ...],
        options: Options,
        accumulators: Accumulators | None,
        earlier: Sequence[Plan],
    ) -> Steady | None:
        """The steady part of a plan of checked, dense, plain CPU updates of one dtype; or None."""
        before = tuple(plan.steady for plan in earlier)
        if any(s is None for s in before):
            return None  # an earlier plan of this step may change the next time
        params = tuple(map(_PARAM, updates))
        states = tuple(map(_STATE, updates))
        slots = tuple(tuple(map(itemgetter(name), states)) for name in options.slot_names)
        grads = list(map(_GRAD, updates))
        if not all(map(_is_contiguous, grads)):
            return None
        batch = kernels.dense_batch(
            params, slots[0], slots[1], slots[2] if options.amsgrad else None
        )
        # The slots too: `m.data = m.data.t()` moves no address, yet changes what the kernels do.
        laid_out = (*params, *(t for column in slots for t in column))
        variables = Layouts.of(laid_out, fixed=True)
        gradients = Layouts.of(grads, fixed=False)
        if batch is None or variables is None or gradients is None:
            return None
        if variables.hold(laid_out) != batch.addresses():  # (what it checks is what it writes)
            return None
        powers = _powers(accumulators)
        ranges = [*written, *(t for s in before for t in s.written)]  # type: ignore[union-attr]
        starts = np.array(list(map(_data_ptr, ranges)), dtype=np.uint64)
        ends = starts + np.array(list(map(_NBYTES, ranges)), dtype=np.uint64)
        order = np.argsort(starts, kind="stable")
        return cls(
            params,
            states,
            slots,
            tuple(u[3] for u in updates),
            params[0].dtype,
            np.array(list(map(_NBYTES, params)), dtype=np.uint64),
            laid_out,
            variables,
            gradients,
            options,
            powers,
            tuple(map(_data_ptr, powers)),
            before,  # type: ignore[arg-type]
            written,
            starts[order],
            np.maximum.accumulate(ends[order]),
            batch,
        )


def reuse(
    steady: Steady,
    params: Sequence[torch.Tensor],
    grads: Sequence[Any],
    states: Sequence[Any],
    hyper: Resolution,
    options: Options,
    *,
    accumulators: Accumulators | None = None,
    earlier: Sequence[Plan] = (),
    when: str = "apply call",
) -> Plan | None:
    """The plan :func:`prepare` would make for this step, if nothing structural changed; else None.

    Confirms that the variables, their state dicts and slot tensors are the
    ones ``steady`` was made from, still of its dtype, contiguous and at its
    addresses; that the options and accumulators are the same and the earlier
    plans of the step were reused too; and checks the new gradients as
    :func:`prepare` does (plain, dense, contiguous, on the CPU, the variable's
    dtype and shape, sharing no memory with a tensor the step writes). On
    None, :func:`prepare` checks everything again and names what is wrong.
    Modifies nothing.

    >>> theta, state = torch.zeros(3), {}
    >>> hyper, acc = resolve_all(0.1, 0.9, 0.999, 1e-8, ""), Accumulators.create(0.9, 0.999)
    >>> for _ in range(2):  # the second plan, with slots, has a steady part
    ...     plan = prepare([Update(theta, torch.ones(3), state, "theta")], hyper, Options(),
    ...                    accumulators=acc, reusable=True)
    ...     execute(plan, BetaPowers(plan))
    >>> plan.steady is None or reuse(plan.steady, [theta], [torch.ones(3)], [state], hyper,
    ...                               Options(), accumulators=acc) is not None
    True
    >>> plan.steady is None or reuse(plan.steady, [theta], [torch.ones(4)], [state], hyper,
    ...                               Options(), accumulators=acc) is None  # another shape
    True
    """
    if (
        options != steady.options
        or len(params) != len(steady.params)
        or len(earlier) != len(steady.earlier)
        or not all(map(is_, (plan.steady for plan in earlier), steady.earlier))
        or not all(map(is_, params, steady.params))
        or not all(map(is_, states, steady.states))
    ):
        return None
    powers = _powers(accumulators)
    if (
        len(powers) != len(steady.powers)
        or not all(map(is_, powers, steady.powers))
        or tuple(map(_data_ptr, powers)) != steady.power_pointers
    ):
        return None
    if accumulators is not None:
        accumulators.check(hyper)
    dtype, slot_names = steady.dtype, options.slot_names
    try:
        if set(map(len, states)) != {len(slot_names)} or not all(
            all(map(is_, map(itemgetter(name), states), column))
            for name, column in zip(slot_names, steady.slots, strict=True)
        ):
            return None
        # `.data = ...`, `set_()` and `share_memory_()` keep a tensor's identity
        # but may move its memory, or change its layout even at the same
        # address (`p.data = p.data[:3]`): the layouts and addresses say.
        # (the very tensors of steady.laid_out: their identities are confirmed above)
        if steady.variables.hold(steady.laid_out) is None:
            return None
        grad_pointers = steady.gradients.hold(grads)
        if grad_pointers is None:
            return None
    except (KeyError, TypeError, RuntimeError):
        return None
    starts = np.frombuffer(grad_pointers, dtype=np.uint64)
    ends = starts + steady.nbytes
    # Written ranges by start, with a running maximum of their ends: a gradient
    # [s, e) overlaps one iff the last range starting before e ends after s.
    below = np.searchsorted(steady.starts, ends, side="left")
    reach = np.where(below > 0, steady.ends[np.maximum(below - 1, 0)], np.uint64(0))
    if bool(np.any((reach > starts) & (ends > starts))):
        return None  # prepare names the gradient that shares memory with what
    if options.nonfinite == "raise":
        guard.check_finite(zip(grads, map(_name_of, steady.names), strict=True), when)
    updates = _Updates(steady, grads)
    return Plan(
        updates,  # type: ignore[arg-type]
        hyper,
        options,
        (((torch.device("cpu"), dtype), updates),),  # type: ignore[arg-type]
        (),
        (),
        accumulators,
        steady.written,
        steady,
        grads,
        grad_pointers,
    )


class _Updates(Sequence[Update]):
    """A reused plan's updates, made only if someone looks (names in a later plan's error)."""

    def __init__(self, steady: Steady, grads: Sequence[torch.Tensor]) -> None:
        self._steady, self._grads = steady, grads
        self._made: list[Update] | None = None

    def __len__(self) -> int:
        return len(self._grads)

    def __getitem__(self, index: Any) -> Any:
        if self._made is None:
            s = self._steady
            self._made = Update.many(s.params, self._grads, s.states, s.names)
        return self._made[index]


def _name_of(name: str | Callable[[], str]) -> str:
    return name if isinstance(name, str) else name()


def prepare(
    updates: Sequence[Update],
    hyper: Resolution,
    options: Options,
    *,
    accumulators: Accumulators | None = None,
    earlier: Sequence[Plan] = (),
    when: str = "apply call",
    reusable: bool = False,
) -> Plan:
    """Check everything a step will read or write; raise ``TypeError``/``ValueError`` naming it.

    Checks each update (:func:`tfadam.guard.checked_gradient`), the
    accumulators if given (float32 scalars in [0, 1)), and that no two
    tensors the step writes — of this plan, or of the ``earlier`` plans of the
    same step (other param groups) — share memory, nor a gradient with one
    of them. With ``nonfinite="raise"``, scans every gradient (``when``
    names the call in its error, e.g. ``"step() #12"``). With ``reusable``,
    the plan carries its :class:`Steady` part where it has one, for
    :func:`reuse` at the next step (a face asks where its last step prepared
    the same variables). Modifies nothing.
    """
    if accumulators is not None:
        accumulators.check(hyper)
    common = _uniformly_plain(updates, options)
    if common is not None:
        key, slots_complete = common
        checked = tuple(updates)
        dense = ((key, checked),) if checked else ()
        sparse: tuple[Update, ...] = ()
        fresh = () if slots_complete else checked
    else:
        checked = tuple(map(partial(_checked, options=options), updates))
        groups: dict[tuple[torch.device, torch.dtype], list[Update]] = {}
        for update in checked:
            if not isinstance(update.grad, IndexedSlices):
                groups.setdefault((update.param.device, update.param.dtype), []).append(update)
        dense = tuple((key, tuple(members)) for key, members in groups.items())
        sparse = tuple(u for u in checked if isinstance(u.grad, IndexedSlices))
        slots = options.slot_names[0]
        fresh = tuple(u for u in checked if slots not in u.state)
    written = _written(checked, accumulators)
    # The fast path has seen every variable, slot and gradient on one device;
    # the accumulators live on the CPU.
    on_cpu = (
        common is not None
        and common[0][0].type == "cpu"
        and (
            accumulators is None
            or (accumulators.beta1_power.is_cpu and accumulators.beta2_power.is_cpu)
        )
    )
    _check_disjoint(checked, written, earlier, on_cpu and not earlier)
    if options.nonfinite == "raise":
        guard.check_finite(((u.grad, u.name) for u in checked), when)
    steady = None
    if reusable and on_cpu and not fresh and dense and options.rule == "tf1":
        steady = Steady.of(checked, written, options, accumulators, earlier)
    if steady is None:
        return Plan(checked, hyper, options, dense, sparse, fresh, accumulators, written)
    grads = list(map(_GRAD, checked))
    return Plan(checked, hyper, options, dense, sparse, fresh, accumulators, written, steady, grads)


def _written(
    updates: Sequence[Update], accumulators: Accumulators | None
) -> tuple[torch.Tensor, ...]:
    params = list(map(_PARAM, updates))
    slots = [
        tensor
        for state in map(_STATE, updates)
        for tensor in state.values()
        if isinstance(tensor, torch.Tensor)
    ]
    return (*params, *slots, *_powers(accumulators))


def _check_disjoint(
    updates: Sequence[Update],
    written: tuple[torch.Tensor, ...],
    earlier: Sequence[Plan],
    one_device: bool,
) -> None:
    plans = [(plan.updates, plan.written) for plan in earlier]
    before = [t for plan in earlier for t in plan.written]
    reads = [u.grad.values if isinstance(u.grad, IndexedSlices) else u.grad for u in updates]
    # In the step's order (earlier groups first), so that errors name the later tensor first.
    tensors = [*before, *written, *reads]
    count = len(before) + len(written)

    def name(index: int) -> str:
        if index < len(before):
            for members, group in plans:
                if index < len(group):
                    return _written_name(members, group, index)
                index -= len(group)
        if index < count:
            return _written_name(updates, written, index - len(before))
        return f"the gradient of {updates[index - count].name}"

    guard.check_disjoint(tensors, count, name, one_device=one_device)


def _written_name(updates: Sequence[Update], written: Sequence[torch.Tensor], index: int) -> str:
    """The name of ``written[index]``, where ``written`` is ``_written(updates, ...)``.

    Or a reused plan's, made when the states were read: their slots may since
    have been reordered (``state["m"] = state.pop("m")``), which moves no slot.
    """
    if index < len(updates):
        return updates[index].name
    position = index - len(updates)
    slots = [(k, u) for u in updates for k, t in u.state.items() if isinstance(t, torch.Tensor)]
    if position < len(slots):
        slot, update = slots[position]
        if update.state[slot] is not written[index]:
            slot, update = next((k, u) for k, u in slots if u.state[k] is written[index])
        return f"optimizer slot {slot!r} of {update.name}"
    power = ("beta1_power", "beta2_power")[position - len(slots)]
    return f"the {power} of {updates[0].name}'s group" if updates else f"the {power}"


def execute(plan: Plan, schedule: Schedule, transforms: Sequence[Transform] = ()) -> None:
    """Run a prepared plan: the arithmetic of one step, then ``schedule.advance()``.

    With ``Options(rule="keras")`` each update is Keras 3's (see
    :func:`_keras_updates`). ``transforms`` run around the update in their
    order (see :class:`Transform`). Cannot fail on input (:func:`prepare` has
    checked it all). Runs inside :func:`atomic`: an interrupt arriving
    meanwhile is handled after the step, which is then complete.
    """
    options = plan.options
    with atomic(), torch.no_grad():
        if transforms:
            transformed = _transformed(plan, transforms)
            if transformed is None:  # a call without an update (it accumulated)
                for transform in transforms:
                    transform.after_update(False)
                schedule.advance()
                return
            plan = transformed
        # Every coefficient before any write: the schedule reads its state once.
        coefficients = {dtype: schedule.coefficients(dtype) for dtype in plan.dtypes}
        for update in plan.fresh:
            create_slots(update.param, update.state, options)
        for transform in transforms:
            transform.before_update()
        if options.rule == "keras":
            _keras_updates(plan, coefficients)
            for transform in transforms:
                transform.after_update(True)
            schedule.advance()
            return
        steady = plan.steady
        if steady is not None:
            steady.batch.step(
                plan.grads,
                plan.grad_pointers or kernels.pointers(plan.grads),
                coefficients[steady.dtype],
                nesterov=options.nesterov,
            )
        for (_, dtype), group in () if steady is not None else plan.dense:
            states = list(map(_STATE, group))
            kernels.dense_step(
                _local(list(map(_PARAM, group))),
                _local(list(map(_GRAD, group))),
                _local(list(map(_M, states))),
                _local(list(map(_V, states))),
                _local(list(map(_VHAT, states))) if options.amsgrad else None,
                coefficients[dtype],
                nesterov=options.nesterov,
            )
        # Grappler folds only constants: a β2 given as a tensor (TF: a variable or
        # placeholder) keeps the eager rounding in a TF1 Session too (measured).
        numerics = options.numerics if plan.hyper.beta2_constant else "eager"
        for u in plan.sparse:
            assert isinstance(u.grad, IndexedSlices)
            if options.amsgrad:
                _amsgrad_sparse(u, coefficients[u.param.dtype], options)
                continue
            kernels.sparse_step(
                u.param,
                u.state["m"],
                u.state["v"],
                u.grad.indices,
                u.grad.values,
                coefficients[u.param.dtype],
                lazy=options.sparse == "lazy",
                numerics=numerics,
            )
        for transform in transforms:
            transform.after_update(True)
        schedule.advance()


def _transformed(plan: Plan, transforms: Sequence[Transform]) -> Plan | None:
    """``plan`` with its gradients through ``transforms`` (see :class:`Transform`); None: no update.

    Gradients a transform replaced are new tensors (a quotient, a clipped
    copy, a densified IndexedSlices): they are checked as :func:`prepare`
    checks any, before the update's first write, and the plan is made again
    around them (never reused: the next call's gradients are transformed anew).
    """
    grads: Sequence[Gradient] | None = list(map(_GRAD, plan.updates))
    for transform in transforms:
        grads = transform.gradients(grads)  # type: ignore[arg-type]
        if grads is None:
            return None
    if all(map(is_, grads, map(_GRAD, plan.updates))):
        return plan
    updates = [Update(u.param, g, u.state, u[3]) for u, g in zip(plan.updates, grads, strict=True)]
    return prepare(updates, plan.hyper, plan.options, accumulators=plan.accumulators)


def create_slots(
    param: torch.Tensor, state: MutableMapping[str, torch.Tensor], options: Options
) -> None:
    """Add the missing slots (``m``, ``v``, ``vhat``) of ``param`` to ``state``: zeros like it.

    A DTensor variable gets DTensor slots of the same layout, so that
    ``torch.distributed.checkpoint`` saves them sharded.
    """
    for slot in options.slot_names:
        if slot not in state:
            state[slot] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What this process holds of each tensor: a DTensor's local shard, else the tensor.

    FSDP2 and tensor parallelism hand the optimizer DTensors. Adam is
    elementwise, so each process updates the shard it holds and needs no
    collective; the kernels only ever see plain tensors. Under ``no_grad``,
    ``to_local()`` returns the DTensor's own local tensor, so the kernels'
    in-place writes land in the DTensor.
    """
    dtensor = guard.dtensor_class()
    if dtensor is None or PLAIN.issuperset(map(type, tensors)):
        return tensors
    return [
        t.to_local() if type(t) not in PLAIN and isinstance(t, dtensor) else t  # type: ignore[attr-defined]
        for t in tensors
    ]


def _keras_updates(plan: Plan, coefficients: dict[torch.dtype, rule.Coefficients]) -> None:
    """``Options(rule="keras")``: each update as Keras 3 computes it (:mod:`tfadam.keras_rule`).

    Where Keras' update is TF1's dense update (``keras_rule.differs_from_tf1``
    is false), TF1's kernel runs it on the densified gradient, a dtype at a
    time; the others (AMSGrad, repeated sparse rows, typed hyperparameters
    promoted beyond ``T``) run ``keras_rule.keras_only_update``.
    """
    amsgrad = plan.options.amsgrad
    tf1: dict[torch.dtype, list[tuple[torch.Tensor, ...]]] = {}
    for u in plan.updates:
        c, state = coefficients[u.param.dtype], u.state
        if keras_rule.differs_from_tf1(u.grad, amsgrad, c):
            vhat = state["vhat"] if amsgrad else None
            keras_rule.keras_only_update(u.param, u.grad, state["m"], state["v"], c, vhat=vhat)
        else:
            dense = keras_rule.densify(u.grad, u.param.shape)
            tf1.setdefault(u.param.dtype, []).append((u.param, dense, state["m"], state["v"]))
    for dtype, group in tf1.items():
        params, grads, ms, vs = (_local(list(column)) for column in zip(*group, strict=True))
        kernels.dense_step(params, grads, ms, vs, None, coefficients[dtype], nesterov=False)


def _amsgrad_sparse(u: Update, c: rule.Coefficients, options: Options) -> None:
    # TF has no sparse AMSGrad kernel: its optimizers densify such gradients,
    # and so do we (an IndexedSlices applied as the dense gradient it stands for).
    assert isinstance(u.grad, IndexedSlices)
    # Duplicate rows summed in sequence, in T, as TF's unsorted_segment_sum
    # (index_add_ sums float16/bfloat16 in float32, rounding once).
    rows, summed = rule.deduplicate(u.grad.indices, u.grad.values)
    dense = torch.zeros_like(u.param)
    dense[rows] = summed
    kernels.dense_step(
        [u.param],
        [dense],
        [u.state["m"]],
        [u.state["v"]],
        [u.state["vhat"]],
        c,
        nesterov=options.nesterov,
    )


def _describe(t: torch.Tensor) -> str:
    return guard.describe(t)


def _checked(update: Update, options: Options) -> Update:
    if _plainly_valid(update, options):
        return update
    grad = guard.checked_gradient(update.param, update.grad, update.state, update.name, options)
    if grad is update.grad:
        return update
    return Update(update.param, grad, update.state, update[3])


def _plainly_valid(update: Update, options: Options) -> bool:
    """The common case, checked with as few tensor attribute reads as possible.

    True only where :func:`tfadam.guard.checked_gradient` would pass the update unchanged
    (plain tensors, a dense gradient of the variable's dtype, device and
    shape, slots alike); anything else, valid or not, goes the full way,
    which names the culprit. With thousands of small parameters this check
    is most of a step's Python time.
    """
    param, grad = update.param, update.grad
    if type(param) not in PLAIN or type(grad) not in PLAIN:
        return False
    shape, dtype, device = param.shape, param.dtype, param.device
    if (
        dtype not in FLOATING
        or not param.is_leaf
        or 0 in param.stride()
        or param.is_inference()
        or param.is_meta
        or grad.layout != torch.strided
        or grad.requires_grad
        or grad.is_neg()
        or param.is_neg()
        or grad._is_zerotensor()
        or param._is_zerotensor()
        or grad.dtype != dtype
        or grad.shape != shape
        or grad.device != device
    ):
        return False
    state = update.state
    if type(state) is not dict:
        return False
    if state:
        slots = options.slot_names
        if sum(map(state.__contains__, slots)) not in (0, len(slots)):
            return False  # some slots removed: the full check names them
    for tensor in state.values():
        if (
            type(tensor) not in PLAIN
            or tensor.dtype != dtype
            or tensor.shape != shape
            or tensor.device != device
            or 0 in tensor.stride()
            or tensor.is_inference()
            or tensor.is_neg()
            or tensor._is_zerotensor()
        ):
            return False
    return True


def _uniformly_plain(
    updates: Sequence[Update], options: Options
) -> tuple[tuple[torch.device, torch.dtype], bool] | None:
    """:func:`_plainly_valid` for all updates at once, a column at a time.

    Returns ``((device, dtype), slots_complete)`` where every update is plainly
    valid, all share one device and dtype, and their states hold either no
    slots or exactly the slots; otherwise None, and :func:`prepare` checks one
    update at a time. ``map`` over tensor attributes loops in C: with
    thousands of parameters this is a third of the per-update check's cost.
    """
    if not updates:
        return None
    params = list(map(_PARAM, updates))
    grads = list(map(_GRAD, updates))
    states = list(map(_STATE, updates))
    dtype, device = params[0].dtype, params[0].device
    if (
        dtype not in FLOATING
        or not PLAIN.issuperset(map(type, params))
        or not PLAIN.issuperset(map(type, grads))
        or not all(map(_IS_LEAF, params))
        or not all(map(all, map(_stride, params)))  # no zero stride (see _plainly_valid)
        or any(map(_is_inference, params))
        or any(map(_IS_META, params))
        or set(map(_LAYOUT, grads)) != {torch.strided}
        or any(map(_REQUIRES_GRAD, grads))
        or any(map(_is_neg, grads))
        or any(map(_is_neg, params))
        or any(map(_is_zerotensor, grads))
        or any(map(_is_zerotensor, params))
    ):
        return None
    slot_names = options.slot_names
    slot_counts = set(map(len, states))
    columns = [params, grads]
    if slot_counts == {len(slot_names)}:
        try:
            columns += [list(map(itemgetter(slot), states)) for slot in slot_names]
        except (KeyError, TypeError):  # a slot missing, or a state that is not a dict
            return None
        for column in columns[2:]:
            if (
                not PLAIN.issuperset(map(type, column))
                or not all(map(all, map(_stride, column)))  # no expand()ed slot
                or any(map(_is_inference, column))
                or any(map(_is_neg, column))
                or any(map(_is_zerotensor, column))
            ):
                return None
    elif slot_counts != {0}:
        return None
    shapes = list(map(_SHAPE, params))
    # On CPU, is_cpu reads a flag, where .device makes a torch.device each time.
    cpu = device.type == "cpu"
    for column in columns:
        if (
            set(map(_DTYPE, column)) != {dtype}
            or not (all(map(_IS_CPU, column)) if cpu else set(map(_DEVICE, column)) == {device})
            or list(map(_SHAPE, column)) != shapes
        ):
            return None
    return (device, dtype), len(columns) > 2


_PARAM, _GRAD, _STATE = attrgetter("param"), attrgetter("grad"), attrgetter("state")
_M, _V, _VHAT = itemgetter("m"), itemgetter("v"), itemgetter("vhat")
_DTYPE, _DEVICE, _SHAPE = attrgetter("dtype"), attrgetter("device"), attrgetter("shape")
_IS_LEAF, _IS_CPU, _LAYOUT = attrgetter("is_leaf"), attrgetter("is_cpu"), attrgetter("layout")
_REQUIRES_GRAD, _IS_META = attrgetter("requires_grad"), attrgetter("is_meta")
_stride, _is_inference, _is_neg, _is_zerotensor = (
    torch.Tensor.stride,
    torch.Tensor.is_inference,
    torch.Tensor.is_neg,
    torch.Tensor._is_zerotensor,
)
_is_contiguous = torch.Tensor.is_contiguous
_data_ptr, _NBYTES = torch.Tensor.data_ptr, attrgetter("nbytes")
