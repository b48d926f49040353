"""Checks that keep a bad call from changing anything: run before any mutation.

* :func:`check_finite` — the opt-in scan for NaN/Inf gradients
  (``nonfinite="raise"``); the engine runs it in :func:`tfadam.engine.prepare`.
* :func:`unwritable` — variables an in-place update would fail on halfway.
* :func:`warn_numerics` — ε that rounds to 0, β that rounds to 1 in a
  variable's dtype.
* :func:`check_torch_state` — a ``tfadam.Adam`` state (from ``load_state_dict``)
  that does not fit its parameters.

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
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import hyper, rule
from .errors import (
    BetaRoundsToOneWarning,
    EpsilonUnderflowWarning,
    NonFiniteGradientError,
    StateDictError,
)
from .kernels.scalars import float32_value
from .sparse import IndexedSlices

if TYPE_CHECKING:
    from .engine import Plan

__all__ = [
    "accumulator_problem",
    "check_finite",
    "check_torch_state",
    "unwritable",
    "warn_numerics",
]


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


def unwritable(param: torch.Tensor) -> str | None:
    """Why an in-place update of ``param`` would raise, or None.

    Torch raises only when the kernel reaches the tensor — after the variables
    before it were updated — so these are checked up front.

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
        and any(stride == 0 and size > 1 for stride, size in zip(strides, param.shape, strict=True))
        and param.numel() != 0  # an empty tensor (torch.from_numpy's strides of 0): no overlap
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
    return None


# What each optimizer was already warned about; weak so that it can be collected.
_warned: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
# The (ε, β1, β2, dtypes) each optimizer's last check saw: the check rounds
# each value in torch (~50 µs), so a step with the same values skips it.
_last_checked: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()


def warn_numerics(owner: object, plan: Plan) -> None:
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
    ...     opt.step()  # the face calls warn_numerics(self, plan)
    ...     opt.step()
    >>> [w.category.__name__ for w in caught]
    ['EpsilonUnderflowWarning']
    """
    dtypes = sorted({u.param.dtype for u in plan.updates}, key=str)
    epsilon = plan.hyper.epsilon
    key = (float(epsilon), float(plan.hyper.beta1), float(plan.hyper.beta2), *dtypes)
    if _last_checked.get(owner) == key:
        return
    _last_checked[owner] = key
    warned = _warned.setdefault(owner, set())
    name = type(owner).__name__
    if "epsilon" not in warned and float(epsilon) != 0.0:
        lost = [d for d in dtypes if rule._scalar(epsilon, d).item() == 0.0]
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
    for label, beta in (("beta1", plan.hyper.beta1), ("beta2", plan.hyper.beta2)):
        if label in warned:
            continue
        ones = [d for d in dtypes if rule._scalar(beta, d).item() == 1.0]
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
    warnings.warn(message, category, stacklevel=_first_caller_outside(("tfadam.", "torch.")))


def _first_caller_outside(packages: tuple[str, ...]) -> int:
    """The ``stacklevel`` of the user's line that led here (past torch's wrappers)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(packages):
        frame, level = frame.f_back, level + 1
    return level


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
    if power.dtype not in _ACCUMULATOR_DTYPES or power.numel() != 1:
        return f"is a {power.dtype} tensor of shape {tuple(power.shape)}, not a floating scalar"
    if power.is_meta:
        return "is on the meta device (it has no value)"
    if power.is_inference() and not torch.is_inference_mode_enabled():
        return "is an inference tensor, which a step cannot update outside inference mode"
    value = float32_value(power)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        return f"is {value!r}, outside [0, 1) (it is a product of betas in [0, 1))"
    return None


_ACCUMULATOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HYPER_KEYS = ("lr", "betas", "eps")
_OPTION_KEYS = ("amsgrad", "nesterov", "sparse", "numerics")
_TORCH_ADAM_KEYS = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"}


def check_torch_state(
    state: Mapping[Any, Any],
    param_groups: Sequence[Mapping[str, Any]],
    slot_names: Callable[[Mapping[str, Any]], list[str]],
) -> None:
    """Raise :class:`StateDictError` unless ``state``/``param_groups`` fit ``tfadam.Adam``.

    ``param_groups`` hold the real parameters (torch has mapped the saved ids
    to them); ``slot_names(group)`` gives the slots a group keeps. Checks
    every group's hyperparameters (callables are left for the step to
    evaluate), options and accumulators, and every slot's type, shape, dtype
    and device, so a state that would fail or silently misbehave at the next
    step is refused before it replaces the current one.

    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> group = {"params": [p], "lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8,
    ...          "amsgrad": False, "nesterov": False, "sparse": "dense", "numerics": "eager"}
    >>> check_torch_state({p: {"m": torch.zeros(3), "v": torch.zeros(3)}}, [group],
    ...                   lambda g: ["m", "v"])
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
        slots = slot_names(group)
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
        resolved = hyper.resolve_all(
            *(
                neutral[k] if callable(v) and not isinstance(v, torch.Tensor) else v
                for k, v in values.items()
            ),
            where=f"{where} ",
        )
        from .engine import Options

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
            mismatch = hyper.accumulator_mismatch(resolved.beta1, resolved.beta2, *accumulators)
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
