"""The engine both faces call: validate, create state, resolve, dispatch.

One apply call (TF1's ``apply_gradients``, or one param group of
``tfadam.Adam.step``) runs in two phases, so that a call that raises leaves
every variable, slot and accumulator bit-identical:

1. :func:`prepare` checks every variable, gradient and existing slot and
   evaluates the hyperparameters. It modifies nothing.
2. :func:`execute` creates missing slots and accumulators, computes the
   coefficients per dtype (:mod:`tfadam.rule`), runs the kernels
   (:mod:`tfadam.kernels`) and advances the accumulators.

Example:
    >>> import torch
    >>> theta = torch.zeros(3)
    >>> state: dict = {}
    >>> plan = prepare([Update(theta, torch.ones(3), state, "theta")],
    ...                resolve_all(0.1, 0.9, 0.999, 1e-8, ""), Options())
    >>> accumulators = execute(plan, None)
    >>> theta, float(accumulators.beta1_power)
    (tensor([-0.1000, -0.1000, -0.1000]), 0.809999942779541)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter, itemgetter
from typing import Any, Literal

import torch

from . import compat, guard, kernels, rule
from .hyper import Resolution, resolve_all
from .sparse import IndexedSlices, check_indices

SparseMode = Literal["dense", "lazy"]
Nonfinite = Literal["propagate", "raise"]
Gradient = torch.Tensor | IndexedSlices

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

__all__ = [
    "Accumulators",
    "Options",
    "Update",
    "Plan",
    "prepare",
    "execute",
    "create_slots",
    "resolve_all",
]


@dataclass(frozen=True)
class Options:
    """Choices fixed for an optimizer (not per call).

    Attributes:
        amsgrad: keep ``vhat = max(vhat, v)`` (TF's ``ApplyAdamWithAmsgrad``).
        nesterov: TF's ``use_nesterov`` kernel option.
        sparse: ``"dense"`` (TF1: every row decays) or ``"lazy"`` (touched rows only).
        numerics: ``"eager"`` or ``"graph"`` (Grappler's rounding of the sparse ``v``).
        nonfinite: ``"propagate"`` (TF: NaN/Inf gradients are applied) or
            ``"raise"`` (:func:`prepare` scans every gradient and raises
            :class:`tfadam.NonFiniteGradientError`, naming call and variable).
    """

    amsgrad: bool = False
    nesterov: bool = False
    sparse: SparseMode = "dense"
    numerics: rule.Numerics = "eager"
    nonfinite: Nonfinite = "propagate"

    def __post_init__(self) -> None:
        if self.sparse not in ("dense", "lazy"):
            raise ValueError(f"sparse={self.sparse!r}: choose 'dense' (TF1) or 'lazy'.")
        if self.numerics not in ("eager", "graph"):
            raise ValueError(f"numerics={self.numerics!r}: choose 'eager' or 'graph'.")
        if self.nonfinite not in ("propagate", "raise"):
            raise ValueError(
                f"nonfinite={self.nonfinite!r}: choose 'propagate' (TF: apply NaN/Inf "
                "gradients) or 'raise' (check every gradient, raise before updating)."
            )
        if self.amsgrad and self.sparse == "lazy":
            raise ValueError("amsgrad=True has no lazy sparse form; use sparse='dense'.")

    @property
    def slot_names(self) -> list[str]:
        return ["m", "v", "vhat"] if self.amsgrad else ["m", "v"]


@dataclass
class Accumulators:
    """``beta1_power``, ``beta2_power``: float32 0-dim tensors shared by a group."""

    beta1_power: torch.Tensor
    beta2_power: torch.Tensor

    @classmethod
    def create(cls, beta1: float | torch.Tensor, beta2: float | torch.Tensor) -> Accumulators:
        def start(beta: float | torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(beta).detach().to("cpu", torch.float32).clone().reshape(())

        return cls(start(beta1), start(beta2))


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


@dataclass
class Plan:
    """A validated apply call, ready to run; holds no mutation yet."""

    updates: list[Update]
    hyper: Resolution
    options: Options
    dense: dict[tuple[torch.device, torch.dtype], list[Update]] = field(default_factory=dict)
    sparse: list[Update] = field(default_factory=list)
    slots_complete: bool = False  # every update already has all its slots


def prepare(
    updates: Sequence[Update], hyper: Resolution, options: Options, *, when: str = "apply call"
) -> Plan:
    """Check every update; raise ``TypeError``/``ValueError`` naming the culprit.

    Sparse gradients (torch COO or :class:`IndexedSlices`) are normalised to
    :class:`IndexedSlices`; nothing else is copied or modified. ``when`` names
    the call in the error of ``nonfinite="raise"`` (e.g. ``"step() #12"``).
    """
    common = _uniformly_plain(updates, options)
    if common is not None:
        key, slots_complete = common
        plan = Plan(list(updates), hyper, options, {key: list(updates)}, [], slots_complete)
        if options.nonfinite == "raise":
            guard.check_finite(((u.grad, u.name) for u in plan.updates), when)
        return plan
    plan = Plan([], hyper, options)
    for update in updates:
        update = _checked(update, options)
        plan.updates.append(update)
        if isinstance(update.grad, IndexedSlices):
            plan.sparse.append(update)
        else:
            key = (update.param.device, update.param.dtype)
            plan.dense.setdefault(key, []).append(update)
    if options.nonfinite == "raise":
        guard.check_finite(((u.grad, u.name) for u in plan.updates), when)
    return plan


def execute(plan: Plan, accumulators: Accumulators | None) -> Accumulators:
    """Run a prepared apply call; returns the (possibly new) accumulators."""
    hyper, options = plan.hyper, plan.options
    if accumulators is None:
        accumulators = Accumulators.create(hyper.beta1, hyper.beta2)
    if not plan.slots_complete:
        for update in plan.updates:
            create_slots(update.param, update.state, options)

    coefficients: dict[torch.dtype, rule.Coefficients] = {}
    # float32 accumulators (always, but for an edited state) are read once for
    # all dtypes: each read is a walk through torch's cold code.
    powers: tuple[Any, Any] = (accumulators.beta1_power, accumulators.beta2_power)
    if powers[0].dtype == torch.float32 and powers[1].dtype == torch.float32:
        powers = (kernels.float32_value(powers[0]), kernels.float32_value(powers[1]))

    def coefficients_for(dtype: torch.dtype) -> rule.Coefficients:
        if dtype not in coefficients:
            coefficients[dtype] = kernels.tf1_coefficients(
                lr=hyper.lr,
                beta1=hyper.beta1,
                beta2=hyper.beta2,
                epsilon=hyper.epsilon,
                beta1_power=powers[0],
                beta2_power=powers[1],
                dtype=dtype,
            )
        return coefficients[dtype]

    with torch.no_grad():
        for (_, dtype), group in plan.dense.items():
            states = list(map(_STATE, group))
            kernels.dense_step(
                _local(list(map(_PARAM, group))),
                _local(list(map(_GRAD, group))),
                _local(list(map(_M, states))),
                _local(list(map(_V, states))),
                _local(list(map(_VHAT, states))) if options.amsgrad else None,
                coefficients_for(dtype),
                nesterov=options.nesterov,
            )
        # Grappler folds only constants: a β2 given as a tensor (TF: a variable or
        # placeholder) keeps the eager rounding in a TF1 Session too (measured).
        numerics = options.numerics if isinstance(hyper.beta2, float) else "eager"
        for u in plan.sparse:
            assert isinstance(u.grad, IndexedSlices)
            if options.amsgrad:
                _amsgrad_sparse(u, coefficients_for(u.param.dtype), options)
                continue
            kernels.sparse_step(
                u.param,
                u.state["m"],
                u.state["v"],
                u.grad.indices,
                u.grad.values,
                coefficients_for(u.param.dtype),
                lazy=options.sparse == "lazy",
                numerics=numerics,
            )
        kernels.advance_accumulators(
            accumulators.beta1_power, accumulators.beta2_power, hyper.beta1, hyper.beta2
        )
    return accumulators


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


# The exact types of plain tensors: testing ``type(t) in _PLAIN`` costs half
# an ``isinstance`` on a tensor, which matters at thousands of tensors a step.
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


_dtensor_class = compat.dtensor_class  # DTensor's module depends on the torch version


def _is_dtensor(t: object) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def _local(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What this process holds of each tensor: a DTensor's local shard, else the tensor.

    FSDP2 and tensor parallelism hand the optimizer DTensors. Adam is
    elementwise, so each process updates the shard it holds and needs no
    collective; the kernels only ever see plain tensors. Under ``no_grad``,
    ``to_local()`` returns the DTensor's own local tensor, so the kernels'
    in-place writes land in the DTensor.
    """
    dtensor = _dtensor_class()
    if dtensor is None or _PLAIN.issuperset(map(type, tensors)):
        return tensors
    return [
        t.to_local() if type(t) not in _PLAIN and isinstance(t, dtensor) else t  # type: ignore[attr-defined]
        for t in tensors
    ]


def _check_layout(t: torch.Tensor, param: torch.Tensor, name: str, what: str) -> None:
    # Updating local shards elementwise is only right if the gradient and the
    # slots are sharded exactly like the variable.
    def layout(x: Any) -> tuple[Any, ...] | None:
        return (x.device_mesh, tuple(x.placements)) if _is_dtensor(x) else None

    if layout(t) == layout(param):
        return

    def describe(x: Any) -> str:
        if not _is_dtensor(x):
            return "a plain tensor"
        return f"a DTensor with placements {tuple(x.placements)} on {x.device_mesh}"

    raise ValueError(
        f"{what} of {name} is {describe(t)} but the variable is {describe(param)}; tfadam "
        "updates each process's local shard and needs them laid out alike (FSDP2 and "
        "tensor parallelism keep them so). Use .redistribute(param.device_mesh, "
        "param.placements) or distribute_tensor()."
    )


def _amsgrad_sparse(u: Update, c: rule.Coefficients, options: Options) -> None:
    # TF has no sparse AMSGrad kernel: its optimizers densify such gradients,
    # and so do we (an IndexedSlices applied as the dense gradient it stands for).
    assert isinstance(u.grad, IndexedSlices)
    dense = torch.zeros_like(u.param).index_add_(0, u.grad.indices, u.grad.values)
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
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def _checked(update: Update, options: Options) -> Update:
    if _plainly_valid(update):
        return update
    return _checked_in_full(update, options)


def _plainly_valid(update: Update) -> bool:
    """The common case, checked with as few tensor attribute reads as possible.

    True only where :func:`_checked_in_full` would pass the update unchanged
    (plain tensors, a dense gradient of the variable's dtype, device and
    shape, slots alike); anything else, valid or not, goes the full way,
    which names the culprit. With thousands of small parameters this check
    is most of a step's Python time.
    """
    param, grad = update.param, update.grad
    if type(param) not in _PLAIN or type(grad) not in _PLAIN:
        return False
    shape, dtype, device = param.shape, param.dtype, param.device
    if (
        dtype not in FLOATING
        or not param.is_leaf
        or 0 in param.stride()
        or param.is_inference()
        or grad.layout != torch.strided
        or grad.requires_grad
        or grad.dtype != dtype
        or grad.shape != shape
        or grad.device != device
    ):
        return False
    for tensor in update.state.values():
        if (
            type(tensor) not in _PLAIN
            or tensor.dtype != dtype
            or tensor.shape != shape
            or tensor.device != device
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
        or not _PLAIN.issuperset(map(type, params))
        or not _PLAIN.issuperset(map(type, grads))
        or not all(map(_IS_LEAF, params))
        or not all(map(all, map(_stride, params)))  # no zero stride (see _plainly_valid)
        or any(map(_is_inference, params))
        or set(map(_LAYOUT, grads)) != {torch.strided}
        or any(map(_REQUIRES_GRAD, grads))
    ):
        return None
    slot_names = options.slot_names
    slot_counts = set(map(len, states))
    columns = [params, grads]
    if slot_counts == {len(slot_names)}:
        try:
            columns += [list(map(itemgetter(slot), states)) for slot in slot_names]
        except KeyError:
            return None
        if not all(_PLAIN.issuperset(map(type, column)) for column in columns[2:]):
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
_REQUIRES_GRAD = attrgetter("requires_grad")
_stride, _is_inference = torch.Tensor.stride, torch.Tensor.is_inference


def _checked_in_full(update: Update, options: Options) -> Update:
    param, grad, name = update.param, update.grad, update.name
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{name} is a {type(param).__name__}, not a torch tensor.")
    # Read once: each tensor attribute read costs ~0.1 µs, and with thousands
    # of small parameters this function is most of a step's time.
    shape, dtype, device = param.shape, param.dtype, param.device
    if dtype not in FLOATING:
        raise TypeError(
            f"{name} ({_describe(param)}) is not a floating variable; Adam updates float16, "
            "bfloat16, float32 and float64 variables only (TF: 'Invalid type')."
        )
    if not param.is_leaf:
        raise ValueError(
            f"{name} ({_describe(param)}) is not a leaf tensor, so an in-place update would "
            "not reach the variable it came from. Pass the nn.Parameter (or leaf tensor) itself."
        )
    problem = guard.unwritable(param)
    if problem:
        raise ValueError(f"{name} ({_describe(param)}) {problem}")
    # The layout checks are for DTensors; exact types spare plain tensors their cost.
    plain = type(param) in _PLAIN
    for slot, tensor in update.state.items():
        if not isinstance(tensor, torch.Tensor):
            if slot in options.slot_names:
                # The kernels would fail on it only after earlier variables moved.
                raise TypeError(
                    f"{name}: its optimizer slot {slot!r} is a {type(tensor).__name__}, not a "
                    "tensor (an edited optimizer state?)."
                )
            continue
        if tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
            raise ValueError(
                f"{name} ({_describe(param)}): its optimizer slot {slot!r} has "
                f"{_describe(tensor)}; the state does not belong to this variable "
                "(a mismatched state_dict or checkpoint?)."
            )
        if not (plain and type(tensor) in _PLAIN):
            _check_layout(tensor, param, name, f"optimizer slot {slot!r}")
    layout = grad.layout if isinstance(grad, torch.Tensor) else None
    if layout == torch.sparse_coo:
        try:
            grad = IndexedSlices.from_coo(grad)
        except ValueError as error:
            raise ValueError(f"gradient of {name}: {error}") from error
    if isinstance(grad, IndexedSlices):
        if _is_dtensor(param):
            raise TypeError(
                f"{name} is a DTensor and its gradient is sparse; tfadam applies sparse "
                "gradients to plain tensors only. Densify the gradient or keep the "
                "embedding unsharded."
            )
        grad = _checked_slices(grad, param, name)
    elif isinstance(grad, torch.Tensor):
        if layout != torch.strided:
            raise TypeError(
                f"gradient of {name} has layout {grad.layout}; use a dense tensor, a sparse "
                "COO tensor or tfadam.IndexedSlices."
            )
        if grad.dtype != dtype or grad.device != device:
            _check_same(grad, param, name, "gradient")
        if not (plain and type(grad) in _PLAIN):
            _check_layout(grad, param, name, "gradient")
        if grad.shape != shape:
            raise ValueError(
                f"gradient of {name} has shape {tuple(grad.shape)} but the variable has shape "
                f"{tuple(param.shape)} (TF: 'Shapes must be equal'). Pass the gradient of this "
                "variable, in its shape."
            )
        if grad.requires_grad:  # (create_graph=True); otherwise detach() is a no-op
            grad = grad.detach()
    else:
        raise TypeError(
            f"gradient of {name} is a {type(grad).__name__}; expected a tensor, a sparse COO "
            "tensor, tfadam.IndexedSlices or None."
        )
    if grad is update.grad:
        return update
    return Update(param, grad, update.state, name)


def _check_same(t: torch.Tensor, param: torch.Tensor, name: str, what: str) -> None:
    if t.dtype != param.dtype:
        raise TypeError(
            f"{what} of {name} is {t.dtype} but the variable is {param.dtype}; TF requires "
            f"them equal. Cast the {what}: .to({param.dtype})."
        )
    if t.device != param.device:
        raise ValueError(
            f"{what} of {name} is on {t.device} but the variable is on {param.device}. "
            f"Move it: .to({str(param.device)!r})."
        )


def _checked_slices(g: IndexedSlices, param: torch.Tensor, name: str) -> IndexedSlices:
    if param.dim() == 0:
        raise ValueError(f"{name} is 0-dim; a sparse (row) gradient needs at least 1 dim.")
    values, indices = g.values, g.indices
    if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError(f"sparse gradient of {name}: values and indices must be torch tensors.")
    _check_same(values, param, name, "sparse gradient values")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(
            f"sparse gradient of {name}: indices are {indices.dtype}; they must be an integer "
            "tensor (int32 or int64). Use indices.long()."
        )
    if indices.dim() != 1:
        raise ValueError(
            f"sparse gradient of {name}: indices must be 1-D, got shape {tuple(indices.shape)}."
        )
    if g.dense_shape is not None and tuple(g.dense_shape) != tuple(param.shape):
        raise ValueError(
            f"sparse gradient of {name} has dense_shape {tuple(g.dense_shape)} but the variable "
            f"has shape {tuple(param.shape)}."
        )
    expected = (indices.shape[0], *param.shape[1:])
    if tuple(values.shape) != expected:
        raise ValueError(
            f"sparse gradient of {name}: values have shape {tuple(values.shape)}, expected "
            f"{expected} ({indices.shape[0]} indices, rows of the variable's shape "
            f"{tuple(param.shape[1:])})."
        )
    if indices.is_meta and not param.is_meta:
        raise ValueError(
            f"sparse gradient of {name}: indices are on the meta device (no values); pass "
            f"real indices on {param.device}."
        )
    # Each no-op conversion is still a torch op (~10-20 µs once a step's
    # traffic has flushed the caches): convert only what needs it.
    if indices.device != param.device:
        indices = indices.to(param.device)
    check_indices(indices, param.shape[0], name)
    if indices.dtype != torch.int64:
        indices = indices.long()
    if values.requires_grad:
        values = values.detach()
    return IndexedSlices(values, indices, tuple(param.shape))
