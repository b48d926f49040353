"""Validation: every check that can refuse an apply call or a loaded state.

The engine builds a plan (:func:`tfadam.engine.prepare`) only from what
passes these checks; executing a plan then does arithmetic alone. The load
paths (``tfadam.Adam.load_state_dict``, ``tfadam.AdamOptimizer.restore``,
:func:`tfadam.load_checkpoint`, ``tfadam.load_tf_checkpoint``) call
:func:`check_state`, the same checks, before they replace anything.

* :class:`Options` — the optimizer's choices, parsed strictly (a bool takes a bool).
* :func:`checked_gradient` — one variable, its gradient and its slots.
* :func:`check_disjoint` — no two tensors a step writes share memory.
* :func:`accumulator_problem` — a ``beta1_power``/``beta2_power`` that is not
  a float32 scalar in [0, 1).
* :func:`check_state` — a whole optimizer state, before it is loaded.
* :func:`check_finite` — the opt-in scan for NaN/Inf gradients (``nonfinite="raise"``).
* :func:`unwritable` — variables an in-place update would fail on halfway.
* :func:`warn_numerics` — ε that rounds to 0, β that rounds to 1 in a
  variable's dtype.
* :func:`check_torch_state` — a ``tfadam.Adam`` state (from ``load_state_dict``)
  that does not fit its parameters.

This module imports nothing of the engine: validation is one layer, below it.

Example:
    >>> import torch
    >>> check_finite([(torch.ones(3), "w")], "step() #1")
    >>> check_finite([(torch.tensor([1.0, float("inf")]), "w")], "step() #1")
    Traceback (most recent call last):
    ...
    tfadam.errors.NonFiniteGradientError: step() #1: the gradient (shape (2,), torch.float32) of w \
has 1 non-finite element (0 NaN, 1 Inf), the first at index (1,); nothing was updated. ...
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

import numpy as np
import torch

from . import compat, rule
from .callsite import user_stacklevel
from .errors import (
    BetaRoundsToOneWarning,
    EpsilonUnderflowWarning,
    NonFiniteGradientError,
    StateDictError,
)
from .hyper import Resolution, accumulator_mismatch, resolve_all
from .kernels.scalars import float32_value
from .sparse import IndexedSlices, check_indices

__all__ = [
    "FLOATING",
    "Options",
    "accumulator_problem",
    "check_accumulators",
    "check_disjoint",
    "check_finite",
    "check_state",
    "check_torch_state",
    "check_variable",
    "checked_gradient",
    "dtensor_class",
    "is_dtensor",
    "unwritable",
    "warn_numerics",
]

SparseMode = Literal["dense", "lazy"]
Nonfinite = Literal["propagate", "raise"]
Rule = Literal["tf1", "keras"]
Gradient = torch.Tensor | IndexedSlices

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Options:
    """Choices fixed for an optimizer (not per call), parsed strictly.

    Attributes:
        amsgrad: keep ``vhat = max(vhat, v)`` (TF's ``ApplyAdamWithAmsgrad``).
        nesterov: TF's ``use_nesterov`` kernel option.
        sparse: ``"dense"`` (TF1: every row decays) or ``"lazy"`` (touched rows only).
        numerics: ``"eager"`` or ``"graph"`` (Grappler's rounding of the sparse ``v``).
        nonfinite: ``"propagate"`` (TF: NaN/Inf gradients are applied) or
            ``"raise"`` (:func:`tfadam.engine.prepare` scans every gradient and raises
            :class:`tfadam.NonFiniteGradientError`, naming call and variable).
        rule: ``"tf1"`` (TF's kernels) or ``"keras"`` (Keras 3's ``update_step``,
            :mod:`tfadam.keras_rule`; TF1's kernel where the two agree).

    A bool option takes a bool: ``"False"`` is a non-empty string, which
    ``if`` would read as true.

    >>> Options(amsgrad="False")
    Traceback (most recent call last):
    ...
    TypeError: amsgrad='False' is a str; pass True or False.
    """

    amsgrad: bool = False
    nesterov: bool = False
    sparse: SparseMode = "dense"
    numerics: rule.Numerics = "eager"
    nonfinite: Nonfinite = "propagate"
    rule: Rule = "tf1"

    def __post_init__(self) -> None:
        for key in ("amsgrad", "nesterov"):
            value = getattr(self, key)
            if type(value) is not bool:
                raise TypeError(f"{key}={value!r} is a {type(value).__name__}; pass True or False.")
        choices = {
            "sparse": ("dense", "lazy"),
            "numerics": ("eager", "graph"),
            "nonfinite": ("propagate", "raise"),
            "rule": ("tf1", "keras"),
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if type(value) is not str or value not in allowed:
                raise ValueError(f"{key}={value!r}: {_CHOICES[key]}")
        if self.amsgrad and self.sparse == "lazy":
            raise ValueError("amsgrad=True has no lazy sparse form; use sparse='dense'.")
        if self.rule == "keras" and (self.nesterov or self.sparse == "lazy"):
            raise ValueError("rule='keras' has no nesterov or lazy form (Keras' Adam has none).")

    @property
    def slot_names(self) -> list[str]:
        return ["m", "v", "vhat"] if self.amsgrad else ["m", "v"]


_CHOICES = {
    "sparse": "choose 'dense' (TF1) or 'lazy'.",
    "numerics": "choose 'eager' or 'graph'.",
    "nonfinite": "choose 'propagate' (TF: apply NaN/Inf gradients) or 'raise' (check every "
    "gradient, raise before updating).",
    "rule": "choose 'tf1' (TF's kernels) or 'keras' (Keras 3's update).",
}


# -- one variable, its gradient and its slots ----------------------------------------------------

# The exact types of plain tensors: testing ``type(t) in PLAIN`` costs half
# an ``isinstance`` on a tensor, which matters at thousands of tensors a step.
PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


dtensor_class = compat.dtensor_class  # DTensor's module depends on the torch version


def is_dtensor(t: object) -> bool:
    dtensor = dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def checked_gradient(
    param: Any,
    grad: Any,
    state: Mapping[str, Any],
    name: str,
    options: Options,
) -> Gradient:
    """Check one variable, its gradient and its slots; return the gradient to apply.

    A sparse gradient (torch COO or :class:`IndexedSlices`) is returned as
    :class:`IndexedSlices` with int64 indices on the variable's device; a
    dense gradient that requires grad is detached; anything else is returned
    as given. ``state`` holds either none of ``options.slot_names`` (the
    variable's first step: the engine creates them) or all of them: a state
    with some slots removed was edited, and is refused rather than refilled
    with zeros.

    >>> w = torch.zeros(2)
    >>> checked_gradient(w, torch.ones(2), {"m": torch.zeros(2)}, "w", Options())
    Traceback (most recent call last):
    ...
    ValueError: w (shape (2,), torch.float32, on cpu): its optimizer state has the slots ['m'] \
but lacks ['v']: the state was edited. Restore the slot, or drop the variable's whole state \
(del opt.state[param]) to start it afresh.
    """
    check_variable(param, state, name, options)
    shape, dtype, device = param.shape, param.dtype, param.device
    layout = grad.layout if isinstance(grad, torch.Tensor) else None
    if layout == torch.sparse_coo:
        try:
            grad = IndexedSlices.from_coo(grad)
        except ValueError as error:
            raise ValueError(f"gradient of {name}: {error}") from error
    if isinstance(grad, IndexedSlices):
        if is_dtensor(param):
            raise TypeError(
                f"{name} is a DTensor and its gradient is sparse; tfadam applies sparse "
                "gradients to plain tensors only. Densify the gradient or keep the "
                "embedding unsharded."
            )
        return _checked_slices(grad, param, name)
    if not isinstance(grad, torch.Tensor):
        raise TypeError(
            f"gradient of {name} is a {type(grad).__name__}; expected a tensor, a sparse COO "
            "tensor, tfadam.IndexedSlices or None."
        )
    if layout != torch.strided:
        raise TypeError(
            f"gradient of {name} has layout {grad.layout}; use a dense tensor, a sparse "
            "COO tensor or tfadam.IndexedSlices."
        )
    if grad.dtype != dtype or grad.device != device:
        _check_same(grad, param, name, "gradient")
    if not (type(param) in PLAIN and type(grad) in PLAIN):
        _check_layout(grad, param, name, "gradient")
    if grad.shape != shape:
        raise ValueError(
            f"gradient of {name} has shape {tuple(grad.shape)} but the variable has shape "
            f"{tuple(param.shape)} (TF: 'Shapes must be equal'). Pass the gradient of this "
            "variable, in its shape."
        )
    if grad.requires_grad:  # (create_graph=True); otherwise detach() is a no-op
        grad = grad.detach()
    return _in_memory(grad)


def _in_memory(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values as memory holds them: the kernels read memory, not torch's lazy views.

    A negated view (``z.conj().imag``) holds its values negated; an efficient
    zero tensor holds none (its values are 0). Anything else is returned as is.
    """
    if t.is_neg():
        t = t.resolve_neg()
    if t._is_zerotensor():
        t = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return t


def check_variable(param: Any, state: Mapping[str, Any], name: str, options: Options) -> None:
    """The checks of :func:`checked_gradient` that do not involve the gradient."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{name} is a {type(param).__name__}, not a torch tensor.")
    dtype = param.dtype
    if dtype not in FLOATING:
        raise TypeError(
            f"{name} ({describe(param)}) is not a floating variable; Adam updates float16, "
            "bfloat16, float32 and float64 variables only (TF: 'Invalid type')."
        )
    if not param.is_leaf:
        raise ValueError(
            f"{name} ({describe(param)}) is not a leaf tensor, so an in-place update would "
            "not reach the variable it came from. Pass the nn.Parameter (or leaf tensor) itself."
        )
    if param.is_meta:
        raise ValueError(
            f"{name} ({describe(param)}) is on the meta device: it has no values to update. "
            "Materialise the model first (e.g. module.to_empty(device=...) and initialise it)."
        )
    problem = unwritable(param)
    if problem:
        raise ValueError(f"{name} ({describe(param)}) {problem}")
    _check_slots(param, state, name, options)


def _check_slots(
    param: torch.Tensor, state: Mapping[str, Any], name: str, options: Options
) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{name}: its optimizer state is a {type(state).__name__}, not a dict of slots "
            f"{options.slot_names} (an edited optimizer state?)."
        )
    slots = options.slot_names
    present = [slot for slot in slots if slot in state]
    if present and len(present) != len(slots):
        absent = [slot for slot in slots if slot not in state]
        raise ValueError(
            f"{name} ({describe(param)}): its optimizer state has the slots {present} but lacks "
            f"{absent}: the state was edited. Restore the slot, or drop the variable's whole "
            "state (del opt.state[param]) to start it afresh."
        )
    plain = type(param) in PLAIN
    shape, dtype, device = param.shape, param.dtype, param.device
    for slot, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            if slot in slots:
                # The kernels would fail on it only after earlier variables moved.
                raise TypeError(
                    f"{name}: its optimizer slot {slot!r} is a {type(tensor).__name__}, not a "
                    "tensor (an edited optimizer state?)."
                )
            continue
        if tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
            raise ValueError(
                f"{name} ({describe(param)}): its optimizer slot {slot!r} has "
                f"{describe(tensor)}; the state does not belong to this variable "
                "(a mismatched state_dict or checkpoint?)."
            )
        problem = unwritable(tensor)
        if problem:
            raise ValueError(f"{name}: its optimizer slot {slot!r} {problem}")
        if not (plain and type(tensor) in PLAIN):
            _check_layout(tensor, param, name, f"optimizer slot {slot!r}")


def _check_layout(t: torch.Tensor, param: torch.Tensor, name: str, what: str) -> None:
    # Updating local shards elementwise is only right if the gradient and the
    # slots are sharded exactly like the variable.
    def layout(x: Any) -> tuple[Any, ...] | None:
        return (x.device_mesh, tuple(x.placements)) if is_dtensor(x) else None

    if layout(t) == layout(param):
        return

    def described(x: Any) -> str:
        if not is_dtensor(x):
            return "a plain tensor"
        return f"a DTensor with placements {tuple(x.placements)} on {x.device_mesh}"

    raise ValueError(
        f"{what} of {name} is {described(t)} but the variable is {described(param)}; tfadam "
        "updates each process's local shard and needs them laid out alike (FSDP2 and "
        "tensor parallelism keep them so). Use .redistribute(param.device_mesh, "
        "param.placements) or distribute_tensor()."
    )


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
    values, indices = _in_memory(values), _in_memory(indices)
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
    if indices.numel() and indices.data_ptr() == 0:  # (only read: check_disjoint sees no index)
        raise ValueError(
            f"sparse gradient of {name}: its indices have no memory of their own (data_ptr() "
            "is 0: a functional tensor, as inside torch.func.functionalize?), so the kernel "
            "cannot read them. Step outside functionalize, on plain tensors."
        )
    if values.requires_grad:
        values = values.detach()
    return IndexedSlices(values, indices, tuple(param.shape))


def unwritable(param: torch.Tensor) -> str | None:
    """Why an in-place update of ``param`` would raise or be wrong, or None.

    Torch raises only when the kernel reaches the tensor — after the variables
    before it were updated — so these are checked up front. An empty tensor
    has nothing to write (``torch.from_numpy`` gives some zero strides).

    >>> unwritable(torch.zeros(3)) is None
    True
    >>> unwritable(torch.zeros(1).expand(3))[:34]
    'has several elements in one memory'
    """
    strides = param.stride()
    # `0 in strides` first: a C-level scan, where the zip costs a microsecond a
    # tensor (thousands of them a step).
    if (
        0 in strides
        and param.numel() > 1
        and any(stride == 0 and size > 1 for stride, size in zip(strides, param.shape, strict=True))
    ):
        return (
            "has several elements in one memory location (an expand()ed or broadcast view), "
            "so it cannot be updated in place. Pass a real tensor: param.clone()."
        )
    if param.is_inference() and not torch.is_inference_mode_enabled():
        return (
            "is an inference tensor (created under torch.inference_mode()), which cannot be "
            "updated in place outside it. Create the variable outside inference mode, or "
            "clone() it there."
        )
    if param.is_meta:
        return "is on the meta device: it has no values to update."
    if param.is_neg():
        # The kernels write memory; a negated view's values are that memory negated.
        return (
            "is a lazily negated view (its negative bit is set, as for z.conj().imag), whose "
            "memory holds the negated values, so it cannot be updated in place. Pass a real "
            "tensor: param.resolve_neg()."
        )
    if param._is_zerotensor() and param.numel():
        return (
            "is an efficient zero tensor (torch._efficientzerotensor), which has no memory, "
            "so it cannot be updated in place. Pass a real tensor: torch.zeros_like(param)."
        )
    return None


# -- no two written tensors share memory ---------------------------------------------------------

_DATA_PTR, _NBYTES = torch.Tensor.data_ptr, attrgetter("nbytes")
_IS_CONTIGUOUS = torch.Tensor.is_contiguous


def check_disjoint(
    tensors: Sequence[torch.Tensor],
    written: int,
    name: Callable[[int], str],
    *,
    one_device: bool = False,
) -> None:
    """Raise ``ValueError`` if a tensor the step writes shares memory with another it uses.

    ``tensors[:written]`` are written (variables, slots, accumulators),
    the rest only read (gradients); ``name(i)`` names ``tensors[i]`` in the
    error; ``one_device`` says that the caller knows them all on one device.
    Two overlapping views of one tensor passed as two variables, a slot that
    is another slot (``m`` is ``v``) or a variable, two groups sharing one
    ``beta1_power``: each element would be updated twice in one step, or
    read after it was written, which no TF program does.

    One pass in torch over the byte ranges (sorted, a running maximum of
    their ends) finds every candidate; only a candidate pair of strided
    views whose ranges interleave is then compared element by element.

    >>> x = torch.zeros(4)
    >>> check_disjoint([x[:3], x[2:]], 2, lambda i: f"#{i}")
    Traceback (most recent call last):
    ...
    ValueError: #1 shares memory with #0: the step would write the shared elements twice (or \
read them after writing). Pass tensors that do not overlap (e.g. .clone() one of them).
    >>> check_disjoint([x[0::2], x[1::2]], 2, lambda i: f"#{i}")  # interleaved, disjoint
    """
    if len(tensors) < 2:
        return
    tensors = (
        [_local_of(t) for t in tensors] if not PLAIN.issuperset(map(type, tensors)) else tensors
    )
    devices = () if one_device else set(map(attrgetter("device"), tensors))
    if len(devices) > 1:
        # Addresses of different devices are different spaces: check each alone.
        for device in devices:
            members = [i for i, t in enumerate(tensors) if t.device == device]
            check_disjoint(
                [tensors[i] for i in members],
                sum(1 for i in members if i < written),
                lambda k, members=members: name(members[k]),  # type: ignore[misc]
            )
        return
    starts = list(map(_DATA_PTR, tensors))
    if all(map(_IS_CONTIGUOUS, tensors)):
        sizes = list(map(_NBYTES, tensors))
    else:
        sizes = [_extent(t) for t in tensors]
    # numpy, not torch: torch's sort and cummax of a few thousand integers go
    # through its thread pool (measured 27 ms and 62 ms for 8,000 on a busy
    # 2-core machine, against well under 1 ms here).
    start = np.array(starts, dtype=np.uint64)
    end = start + np.array(sizes, dtype=np.uint64)
    writes = np.arange(len(tensors)) < written
    order = np.argsort(start, kind="stable")
    start, end, writes = start[order], end[order], writes[order]
    nonempty = end > start
    absent = nonempty & (start == 0)
    if absent.any():
        # (a functional tensor, as torch.func.functionalize makes: its values
        # live elsewhere; the kernels would read and write address 0)
        raise ValueError(
            f"{name(int(order[np.flatnonzero(absent)[0]]))} has no memory of its own (its "
            "data_ptr() is 0: a functional tensor, as inside torch.func.functionalize?), so "
            "the step cannot read or update it in place. Step outside functionalize, on "
            "plain tensors."
        )
    zero = np.zeros(1, dtype=np.uint64)
    ends_all = np.maximum.accumulate(np.where(nonempty, end, zero))
    ends_written = np.maximum.accumulate(np.where(nonempty & writes, end, zero))
    before_all = np.concatenate((zero, ends_all[:-1]))
    before_written = np.concatenate((zero, ends_written[:-1]))
    conflict = nonempty & (start < np.where(writes, before_all, before_written))
    if not conflict.any():
        return
    # Rare: name the pair, and rule out strided views that interleave without sharing.
    order_list = order.tolist()
    for position in np.flatnonzero(conflict).tolist():
        i = order_list[position]
        for j in order_list[:position]:
            if (i >= written and j >= written) or not _overlap(tensors[i], tensors[j]):
                continue
            later, earlier = max(i, j), min(i, j)
            raise ValueError(
                f"{name(later)} shares memory with {name(earlier)}: the step would write the "
                "shared elements twice (or read them after writing). Pass tensors that do not "
                "overlap (e.g. .clone() one of them)."
            )


def _local_of(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _extent(t: torch.Tensor) -> int:
    """Bytes from the first element to the end of the last (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _addresses(t: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=True):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    width = t.element_size()
    first = t.data_ptr() + offsets.reshape(-1, 1) * width
    return (first + torch.arange(width, dtype=torch.int64)).reshape(-1)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    if a0 + _extent(a) <= b0 or b0 + _extent(b) <= a0:
        return False
    if _extent(a) == a.nbytes or _extent(b) == b.nbytes:
        return True  # one of them fills its whole range
    return bool(torch.isin(_addresses(a), _addresses(b)).any())


# -- accumulators --------------------------------------------------------------------------------


def accumulator_problem(power: Any) -> str | None:
    """What is wrong with a ``beta1_power``/``beta2_power`` value, or None.

    >>> accumulator_problem(torch.tensor(0.81)) is None
    True
    >>> accumulator_problem(torch.tensor(0.81, dtype=torch.float64)) is None
    True
    >>> accumulator_problem(torch.tensor([0.81, 0.9]))
    'is a torch.float32 tensor of shape (2,), not a floating scalar'
    """
    if not isinstance(power, torch.Tensor):
        return f"is a {type(power).__name__}, not a tensor"
    # The dtypes TF can give it: β's, as convert_to_tensor makes it (see tfadam.hyper).
    if power.dtype not in FLOATING or power.numel() != 1:
        return f"is a {power.dtype} tensor of shape {tuple(power.shape)}, not a floating scalar"
    if power.is_meta:
        return "is on the meta device (it has no value)"
    if power.is_inference() and not torch.is_inference_mode_enabled():
        return "is an inference tensor, which a step cannot update outside inference mode"
    if power._is_zerotensor():  # (immutable: the step raised after writing the variables)
        return "is an efficient zero tensor (torch._efficientzerotensor): a step cannot update it"
    value = float32_value(power)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        return f"is {value!r}, outside [0, 1) (it is a product of betas in [0, 1))"
    return None


def check_accumulators(beta1_power: Any, beta2_power: Any, where: str) -> None:
    """Raise ``ValueError`` unless both are floating scalars in [0, 1) that a step can update.

    >>> check_accumulators(torch.tensor(0.9), torch.tensor(float("nan")), "param_groups[0] ")
    Traceback (most recent call last):
    ...
    ValueError: param_groups[0] beta2_power is nan, outside [0, 1) (it is a product of betas \
in [0, 1)); TF keeps the beta-power accumulators as scalars in [0, 1), in β's dtype. Was the \
state edited or saved by another optimizer?
    """
    for key, power in (("beta1_power", beta1_power), ("beta2_power", beta2_power)):
        problem = accumulator_problem(power)
        if problem:
            raise ValueError(
                f"{where}{key} {problem}; TF keeps the beta-power accumulators as scalars "
                "in [0, 1), in β's dtype. Was the state edited or saved by another optimizer?"
            )


# -- a whole state, before it is loaded ----------------------------------------------------------


def check_state(
    variables: Sequence[tuple[Any, Mapping[str, Any], str, Options]],
    accumulators: Sequence[tuple[Any, Any, str]] = (),
) -> None:
    """Raise ``ValueError``/``TypeError`` unless a state can be loaded and stepped.

    The checks a step makes, without gradients: each ``(variable, slots,
    name, options)`` is a floating leaf tensor with values that can be
    updated in place, its slots are none or all of ``options.slot_names``,
    each a writable tensor like the variable; each ``(beta1_power,
    beta2_power, where)`` pair is float32 scalars in [0, 1); and no two of
    all these tensors share memory. Every load path calls it before it
    replaces anything (``tfadam.Adam.load_state_dict``,
    ``tfadam.AdamOptimizer.restore``, :func:`tfadam.load_checkpoint`); so may
    any other code that loads a state (a TF checkpoint reader).

    >>> w = torch.zeros(3)
    >>> m = torch.zeros(3)
    >>> check_state([(w, {"m": m, "v": torch.zeros(3)}, "w", Options())])
    >>> check_state([(w, {"m": m, "v": m}, "w", Options())])
    Traceback (most recent call last):
    ...
    ValueError: slot 'v' of w shares memory with slot 'm' of w: the step would write the shared \
elements twice (or read them after writing). Pass tensors that do not overlap (e.g. .clone() \
one of them).
    """
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    for param, state, name, options in variables:
        check_variable(param, state, name, options)
        tensors.append(param)
        names.append(name)
        for slot, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                tensors.append(tensor)
                names.append(f"slot {slot!r} of {name}")
    for beta1_power, beta2_power, where in accumulators:
        check_accumulators(beta1_power, beta2_power, where)
        tensors += [beta1_power, beta2_power]
        names += [f"{where}beta1_power", f"{where}beta2_power"]
    check_disjoint(tensors, len(tensors), names.__getitem__)


# -- checks outside the step --------------------------------------------------------------------


def check_finite(gradients: Iterable[tuple[torch.Tensor | IndexedSlices, str]], when: str) -> None:
    """Raise :class:`NonFiniteGradientError` if any gradient holds NaN or ±Inf.

    ``gradients`` pairs each gradient (dense, or :class:`IndexedSlices` whose
    values are scanned) with the name of its variable. The fast path sums each
    gradient in its own dtype — a sum is NaN or Inf whenever a term is; one
    read, no temporary, a single sync per device — and only a gradient whose
    sum is not finite is looked at again: ``(g * 0).sum()`` cannot overflow,
    so it tells a real NaN/Inf from a sum that merely overflowed (common for
    loss-scaled float16 gradients), before the element-wise scan that finds
    the culprit.

    >>> big = torch.full((4,), 60000.0, dtype=torch.float16)  # its sum overflows
    >>> check_finite([(big, "w")], "step() #3")
    >>> try:
    ...     check_finite([(big, "w"), (torch.tensor([0.0, float("nan")]), "b")], "step() #3")
    ... except NonFiniteGradientError as error:
    ...     print(error.parameter, error.nan, error.index)
    b 1 (1,)
    """
    pairs = [(grad.values if isinstance(grad, IndexedSlices) else grad, grad, name)
             for grad, name in gradients]  # fmt: skip
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for values, _, _ in pairs:
        sums.setdefault(values.device, []).append(values.sum().float())
    if all(bool(torch.stack(device_sums).isfinite().all()) for device_sums in sums.values()):
        return
    for values, grad, name in pairs:
        if not bool(values.sum().isfinite()) and not bool((values * 0).sum().isfinite()):
            _locate_nonfinite(grad, name, when)


def _locate_nonfinite(grad: torch.Tensor | IndexedSlices, name: str, when: str) -> None:
    values = grad.values if isinstance(grad, IndexedSlices) else grad
    bad = ~torch.isfinite(values)
    count = int(bad.sum())
    if count == 0:
        return
    nan = int(torch.isnan(values).sum())
    first = tuple(int(i) for i in bad.nonzero()[0])
    if isinstance(grad, IndexedSlices):
        # Report the position in the variable, not in the values tensor.
        first = (int(grad.indices[first[0]]), *first[1:])
        what = "sparse gradient"
    else:
        what = "gradient"
    shape = f"shape {tuple(values.shape)}, {values.dtype}"
    plural = "s" if count != 1 else ""
    raise NonFiniteGradientError(
        f"{when}: the {what} ({shape}) of {name} has {count} non-finite element{plural} "
        f"({nan} NaN, {count - nan} Inf), the first at index {first}; nothing was updated. "
        "Find where it enters (an overflowing loss, log(0), a division by zero; with float16 "
        "use torch.amp.GradScaler, which skips such steps), or pass nonfinite='propagate' to "
        "apply it as TF does.",
        parameter=name,
        when=when,
        nan=nan,
        inf=count - nan,
        index=first,
    )


# What each optimizer was already warned about; weak so that it can be collected.
_warned: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# The (ε, β1, β2, dtypes) each optimizer's last check saw: the check rounds
# each value in torch (~50 µs), so a step with the same values skips it.
_last_checked: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def warn_numerics(owner: object, values: Resolution, dtypes: Iterable[torch.dtype]) -> None:
    """Warn (once per ``owner`` and kind) about hyperparameters a dtype cannot hold.

    * :class:`EpsilonUnderflowWarning`: a non-zero ε is 0 in the variable's
      dtype (1e-8 in float16): where v is 0 the update is 0/0 = NaN.
    * :class:`BetaRoundsToOneWarning`: a β < 1 is 1 in the dtype (0.999 in
      bfloat16): with β2, v stays 0 and steps are ~lr/ε; with β1, m stays 0
      (and the first steps are NaN).

    TF rounds the same way, so the results stay TF's; the warning names the
    fix. An ε of exactly 0 is a choice, not an accident, and is not warned.

    >>> import warnings, tfadam
    >>> w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    >>> opt = tfadam.Adam([w])  # eps=1e-8: 0 in float16
    >>> w.grad = torch.ones(2, dtype=torch.float16)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     opt.step()  # the face calls warn_numerics(self, plan.hyper, plan.dtypes)
    ...     opt.step()
    >>> [w.category.__name__ for w in caught]
    ['EpsilonUnderflowWarning']
    """
    dtypes = sorted(set(dtypes), key=str)
    epsilon = values.epsilon
    key = (float(epsilon), float(values.beta1), float(values.beta2), *dtypes)
    if _last_checked.get(owner) == key:
        return
    _last_checked[owner] = key
    warned = _warned.setdefault(owner, set())
    name = type(owner).__name__
    if "epsilon" not in warned and float(epsilon) != 0.0:
        lost = [d for d in dtypes if rule.cast_scalar(epsilon, d).item() == 0.0]
        if lost:
            warned.add("epsilon")
            # TF flushes subnormals to zero, except float16's (normal in float32).
            smallest = ", ".join(f"{_smallest_kept(d):.3g} in {d}" for d in lost)
            _warn(
                f"{name}: epsilon={float(epsilon):.3g} rounds to 0 in "
                f"{', '.join(map(str, lost))}, so wherever v is 0 the update is 0/0 = NaN (TF "
                f"computes the same). Use an epsilon the dtype can hold (the smallest above 0 is "
                f"{smallest}; 1e-4 is common for float16), or keep float32 master weights.",
                EpsilonUnderflowWarning,
            )
    for label, beta in (("beta1", values.beta1), ("beta2", values.beta2)):
        if label in warned:
            continue
        ones = [d for d in dtypes if rule.cast_scalar(beta, d).item() == 1.0]
        if ones:
            warned.add(label)
            effect = (
                "1 - beta2 is 0, so v never grows from 0 and each update divides by epsilon "
                "alone: steps far larger than lr"
                if label == "beta2"
                else "1 - beta1 is 0, so m never grows from 0 and nothing trains; while "
                "1 - beta1_power rounds to 0 too, the update is 0 * inf = NaN"
            )
            below = ", ".join(f"{1 - torch.finfo(d).eps / 2} in {d}" for d in ones)
            _warn(
                f"{name}: {label}={float(beta):.6g} rounds to 1.0 in "
                f"{', '.join(map(str, ones))}: {effect} (TF computes the same). Keep float32 "
                f"master weights, or use a {label} the dtype holds below 1 (at most {below}).",
                BetaRoundsToOneWarning,
            )


def _smallest_kept(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps if dtype == torch.float16 else info.smallest_normal


def _warn(message: str, category: type[Warning]) -> None:
    warnings.warn(message, category, stacklevel=user_stacklevel())


_HYPER_KEYS = ("lr", "betas", "eps")
_OPTION_KEYS = ("amsgrad", "nesterov", "sparse", "numerics")
_TORCH_ADAM_KEYS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}


def check_torch_state(
    state: Mapping[Any, Any],
    param_groups: Sequence[Mapping[str, Any]],
) -> None:
    """Raise :class:`StateDictError` unless ``state``/``param_groups`` fit ``tfadam.Adam``.

    ``param_groups`` hold the real parameters (torch has mapped the saved ids
    to them). Checks
    every group's hyperparameters (callables are left for the step to
    evaluate), options and accumulators, and every slot's type, shape, dtype
    and device, so a state that would fail or silently misbehave at the next
    step is refused before it replaces the current one.

    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> group = {"params": [p], "lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8,
    ...          "amsgrad": False, "nesterov": False, "sparse": "dense", "numerics": "eager"}
    >>> check_torch_state({p: {"m": torch.zeros(3), "v": torch.zeros(3)}}, [group])
    Traceback (most recent call last):
    ...
    tfadam.errors.StateDictError: state of param_groups[0]['params'][0] has slots but its \
group has no beta1_power/beta2_power: ...
    """
    owner: dict[int, str] = {}
    for index, group in enumerate(param_groups):
        where = f"param_groups[{index}]"
        names = _check_group(group, where)
        has_accumulators = group.get("beta1_power") is not None
        slots = Options(*(group[key] for key in _OPTION_KEYS)).slot_names
        for position, param in enumerate(group["params"]):
            label = f"{where}['params'][{position}]"
            if names is not None and position < len(names):
                label += f" ({names[position]!r})"
            owner[id(param)] = label
            entry = state.get(param, {})
            _check_entry(entry, param, label, slots, has_accumulators)
    for key in state:
        if not isinstance(key, torch.Tensor) or id(key) not in owner:
            raise StateDictError(
                f"the state has an entry for {key!r}, which is not a parameter of this "
                "optimizer: the state_dict was saved for a model with other parameters. Load "
                "it into an optimizer over the same parameters, in the same order."
            )
    # Then what a step checks (the same function): writable slots and
    # variables with values, finite accumulators, no memory shared between any
    # two tensors a step writes (m is v, two groups' beta1_power, a slot that is
    # a parameter).
    variables, accumulators = [], []
    for index, group in enumerate(param_groups):
        options = Options(*(group[key] for key in _OPTION_KEYS))
        for param in group["params"]:
            variables.append((param, state.get(param, {}), owner[id(param)], options))
        if group.get("beta1_power") is not None:
            accumulators.append(
                (group["beta1_power"], group.get("beta2_power"), f"param_groups[{index}] ")
            )
    try:
        check_state(variables, accumulators)
    except (TypeError, ValueError) as error:
        raise StateDictError(f"{error} (in the state_dict being loaded)") from error


def _check_group(group: Mapping[str, Any], where: str) -> list[str] | None:
    missing = [key for key in (*_HYPER_KEYS, *_OPTION_KEYS) if key not in group]
    if missing:
        raise StateDictError(
            f"{where} lacks {missing}: the state_dict was not saved by tfadam.Adam (or was "
            "edited). Load a state_dict from tfadam.Adam.state_dict()."
        )
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise StateDictError(f"{where} betas must be a pair (beta1, beta2); got {betas!r}.")
    values = {"lr": group["lr"], "beta1": betas[0], "beta2": betas[1], "epsilon": group["eps"]}
    # Callables are evaluated at each step (and checked there); numbers and
    # tensors can be checked now. A neutral value stands in for a callable.
    neutral = {"lr": 0.0, "beta1": 0.0, "beta2": 0.0, "epsilon": 0.0}
    try:
        resolved = resolve_all(
            *(
                neutral[k] if callable(v) and not isinstance(v, torch.Tensor) else v
                for k, v in values.items()
            ),
            where=f"{where} ",
        )
        Options(*(group[key] for key in _OPTION_KEYS))
    except (TypeError, ValueError) as error:
        raise StateDictError(f"{where}: {error}") from error
    accumulators = [group.get("beta1_power"), group.get("beta2_power")]
    if accumulators != [None, None]:
        for key, power in zip(("beta1_power", "beta2_power"), accumulators, strict=True):
            problem = accumulator_problem(power)
            if problem:
                raise StateDictError(
                    f"{where} {key} {problem}. TF keeps the beta-power accumulators as scalars "
                    "in [0, 1), in β's dtype; the state_dict was edited or saved by another "
                    "optimizer."
                )
        if not any(callable(beta) and not isinstance(beta, torch.Tensor) for beta in betas):
            mismatch = accumulator_mismatch(resolved.beta1, resolved.beta2, *accumulators)
            if mismatch:
                raise StateDictError(f"{where}: {mismatch}")
    names = group.get("param_names")
    return list(names) if isinstance(names, (list, tuple)) else None


def _check_entry(
    entry: Any, param: torch.Tensor, label: str, slots: list[str], has_accumulators: bool
) -> None:
    if not isinstance(entry, Mapping):
        raise StateDictError(
            f"state of {label} is a {type(entry).__name__}; expected a dict of slots {slots}."
        )
    if not entry:
        return
    foreign = sorted(set(entry) - set(slots), key=str)
    if foreign:
        hint = (
            " These are torch.optim.Adam's slots; its state does not carry TF's beta-power "
            "accumulators, so it cannot resume bit for bit. Start tfadam.Adam fresh, or set "
            "m=exp_avg, v=exp_avg_sq and the group's beta1_power/beta2_power (float32 "
            "β**(step+1)) yourself."
            if set(foreign) & _TORCH_ADAM_KEYS
            else ""
        )
        raise StateDictError(
            f"state of {label} has unknown slots {foreign}; tfadam.Adam with these options "
            f"keeps {slots}.{hint}"
        )
    absent = [slot for slot in slots if slot not in entry]
    if absent:
        raise StateDictError(
            f"state of {label} has {sorted(entry)} but lacks {absent}: a truncated or edited "
            "state_dict. Load a complete one."
        )
    if not has_accumulators:
        raise StateDictError(
            f"state of {label} has slots but its group has no beta1_power/beta2_power: the "
            "accumulators were dropped from the state_dict. Load a complete one."
        )
    for slot in slots:
        tensor = entry[slot]
        if not isinstance(tensor, torch.Tensor):
            raise StateDictError(
                f"slot {slot!r} of {label} is a {type(tensor).__name__}, not a tensor."
            )
        if tensor.shape != param.shape or tensor.dtype != param.dtype:
            raise StateDictError(
                f"slot {slot!r} of {label} has shape {tuple(tensor.shape)} and {tensor.dtype}, "
                f"but the parameter has shape {tuple(param.shape)} and {param.dtype}: the "
                "state_dict belongs to another model (or the parameters are in another order). "
                "Load the state_dict saved with this model."
            )
        if tensor.device != param.device:
            raise StateDictError(
                f"slot {slot!r} of {label} is on {tensor.device} but the parameter is on "
                f"{param.device}; move the optimizer state to the parameter's device."
            )
