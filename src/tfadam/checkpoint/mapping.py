"""``load_tf_checkpoint``: a TensorFlow run's variables and Adam state into tfadam.

The load validates everything — names, shapes, dtypes, checksums — before it
assigns anything: on any error the model and the optimizer are left exactly
as they were.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import guard
from .dtypes import DTYPES
from .errors import CheckpointError
from .formats import open_checkpoint
from .names import CheckpointNames, OptimizerState, Variable

# TF dtype name -> torch dtype (None: no torch equivalent)
_TORCH = {d.name: d.torch for d in DTYPES.values()}

__all__ = ["LoadResult", "load_tf_checkpoint"]

VarMap = Mapping[str, torch.Tensor] | torch.nn.Module | Iterable[tuple[str, torch.Tensor]]


@dataclass
class LoadResult:
    """What :func:`load_tf_checkpoint` loaded, and what it left alone.

    Attributes:
        variables: TF name -> checkpoint key of each value loaded.
        slots: TF name -> {"m": key, "v": key} of each variable's Adam slots.
        accumulators: the keys loaded into ``beta1_power``/``beta2_power``.
        optimizer_variables: optimizer-wide state loaded, name -> key
            (``beta1_power``, ``beta2_power``; Keras: ``iterations``, ``learning_rate``).
        without_slots: mapped optimizer parameters the checkpoint has no Adam
            state for (TF never updated them). If the checkpoint holds Adam
            state for others, theirs is reset to none, as in TF; a checkpoint
            without any Adam state leaves the optimizer untouched.
        unused: checkpoint keys not loaded (other variables, bookkeeping).
    """

    variables: dict[str, str] = field(default_factory=dict)
    slots: dict[str, dict[str, str]] = field(default_factory=dict)
    accumulators: tuple[str, str] | None = None
    optimizer_variables: dict[str, str] = field(default_factory=dict)
    without_slots: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.variables)} variables, {len(self.slots)} with Adam slots"]
        if self.accumulators:
            lines.append(f"accumulators from {self.accumulators[0]!r}, {self.accumulators[1]!r}")
        if self.without_slots:
            lines.append(f"no Adam state in the checkpoint for: {', '.join(self.without_slots)}")
        if self.unused:
            lines.append(f"left unused: {', '.join(self.unused)}")
        return "\n".join(lines)


@dataclass
class _Target:
    """One tensor to load: where its values go (param, or a view of one)."""

    tf_name: str
    tensor: torch.Tensor  # what the user mapped (a parameter, or a view of one)
    param: torch.Tensor  # the leaf that owns the storage (== tensor unless a view)
    label: str

    def view_of(self, full: torch.Tensor) -> torch.Tensor:
        """The part of a param-shaped tensor that ``tensor`` designates."""
        if self.tensor is self.param:
            return full
        offset = self.tensor.storage_offset() - self.param.storage_offset()
        return full.as_strided(
            self.tensor.shape, self.tensor.stride(), full.storage_offset() + offset
        )


def _as_target(tf_name: str, tensor: Any, label: str) -> _Target:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"var_map[{tf_name!r}] is a {type(tensor).__name__}; map each TF name to a torch "
            "tensor (an nn.Parameter, or a view of one such as linear.weight.T)."
        )
    base = tensor._base if tensor._base is not None else tensor
    if base is tensor:
        return _Target(tf_name, tensor, tensor, label)
    # A view: it must reach every element of its base exactly once, so that
    # the slots can be laid out through the same view (e.g. weight.T).
    probe = (
        torch.arange(base.numel()).as_strided(base.shape, base.stride())
        if base.is_contiguous()
        else None
    )
    if probe is None or tensor.numel() != base.numel():
        raise ValueError(
            f"var_map[{tf_name!r}] ({label}) is a view covering part of a larger tensor; map "
            "the whole parameter, or a view of all of it (a transpose, a reshape)."
        )
    offset = tensor.storage_offset() - base.storage_offset()
    seen = probe.as_strided(tensor.shape, tensor.stride(), offset).reshape(-1).sort().values
    if not torch.equal(seen, torch.arange(base.numel())):
        raise ValueError(
            f"var_map[{tf_name!r}] ({label}) is a view that does not cover its parameter "
            "exactly once; map the parameter itself or a transpose/reshape of it."
        )
    return _Target(tf_name, tensor, base, label)


def _targets(var_map: VarMap, rename: Callable[[str], str | None] | None) -> list[_Target]:
    if isinstance(var_map, torch.nn.Module):
        out = []
        for torch_name, param in var_map.named_parameters():
            tf_name = rename(torch_name) if rename else torch_name.replace(".", "/")
            if tf_name is not None:
                out.append(_as_target(tf_name, param, f"parameter {torch_name!r}"))
        if not out:
            raise ValueError("var_map: the module has no parameters left after rename().")
        return out
    if rename is not None:
        raise TypeError("rename= applies to an nn.Module var_map only.")
    items = var_map.items() if isinstance(var_map, Mapping) else var_map
    out = []
    for tf_name, tensor in items:
        if not isinstance(tf_name, str):
            raise TypeError(f"var_map keys are TF variable names (str); got {tf_name!r}.")
        out.append(_as_target(tf_name, tensor, f"var_map[{tf_name!r}]"))
    if not out:
        raise ValueError("var_map is empty: map TF variable names to the tensors to load.")
    seen: dict[int, str] = {}
    for t in out:
        if id(t.param) in seen:
            raise ValueError(
                f"var_map maps both {seen[id(t.param)]!r} and {t.tf_name!r} to the same "
                "parameter; map each parameter once."
            )
        seen[id(t.param)] = t.tf_name
    return out


# -- the optimizer being loaded into ------------------------------------------

# What a flavour of optimizer keeps besides the per-variable slots, and the
# dtype each must have in the checkpoint.
_SHARED = {
    "tf1": (("beta1_power", "float32"), ("beta2_power", "float32")),
    "keras": (("iterations", "int64"), ("learning_rate", "float32")),
}


class _Optimizer:
    """Adapter over one tfadam face: which params it owns, how to set its state."""

    flavour = "tf1"

    def owns(self, param: torch.Tensor) -> bool:
        raise NotImplementedError

    def slot_names(self, param: torch.Tensor) -> list[str]:
        raise NotImplementedError

    def assign(
        self,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        cleared: list[torch.Tensor],
        shared: dict[str, torch.Tensor],
    ) -> None:
        """Install the validated state; nothing here may fail on bad input."""
        raise NotImplementedError

    def check(
        self,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        shared: dict[str, torch.Tensor],
    ) -> None:
        """Raise unless :meth:`assign` can install this state: the checks a step makes."""
        options = [
            (param, named, f"the parameter of shape {tuple(param.shape)}", self.options(param))
            for param, named in slots.items()
        ]
        powers = (
            [(shared["beta1_power"], shared["beta2_power"], "the checkpoint's ")]
            if "beta1_power" in shared
            else []
        )
        guard.check_state(options, powers)

    def options(self, param: torch.Tensor) -> guard.Options:
        return guard.Options(amsgrad="vhat" in self.slot_names(param))


class _TorchFace(_Optimizer):
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.group_of = {id(p): g for g in opt.param_groups for p in g["params"]}

    def owns(self, param: torch.Tensor) -> bool:
        return id(param) in self.group_of

    def slot_names(self, param: torch.Tensor) -> list[str]:
        return ["m", "v", "vhat"] if self.group_of[id(param)].get("amsgrad") else ["m", "v"]

    def assign(
        self,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        cleared: list[torch.Tensor],
        shared: dict[str, torch.Tensor],
    ) -> None:
        groups = {}
        for param, named in slots.items():
            state = self.opt.state[param]
            for name in ("m", "v", "vhat"):
                state.pop(name, None)
            state.update(named)
            groups[id(self.group_of[id(param)])] = self.group_of[id(param)]
        for param in cleared:
            for name in ("m", "v", "vhat"):
                self.opt.state[param].pop(name, None)
        for group in groups.values():
            group["beta1_power"] = shared["beta1_power"].clone()
            group["beta2_power"] = shared["beta2_power"].clone()


class _TF1Face(_Optimizer):
    def __init__(self, opt: Any) -> None:
        self.opt = opt

    def owns(self, param: torch.Tensor) -> bool:
        # TF1's optimizer has no parameter list: every mapped variable is its.
        return True

    def slot_names(self, param: torch.Tensor) -> list[str]:
        return list(self.opt.get_slot_names())

    def assign(
        self,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        cleared: list[torch.Tensor],
        shared: dict[str, torch.Tensor],
    ) -> None:
        named = dict(slots)
        for param in cleared:
            named[param] = {}  # no slots: created afresh at its first update, as in TF
        self.opt.restore(shared["beta1_power"], shared["beta2_power"], slots=named)


class _KerasFace(_Optimizer):
    """``tfadam.keras.Adam``: slots per variable, an iterations counter, the lr variable.

    An optimizer not built yet is built with the mapped parameters, in
    ``var_map`` order; build it first (``opt.build(params)``) to include others.
    """

    flavour = "keras"
    # slot names used here -> the Keras face's (Keras 3's variable names)
    NAMES = {
        "m": "momentum",
        "v": "velocity",
        "vhat": "velocity_hat",
        "average": "average",
        "gradient_accumulator": "gradient_accumulator",
    }

    def __init__(self, opt: Any, params: list[torch.Tensor]) -> None:
        self.opt = opt
        self.params = params

    def owns(self, param: torch.Tensor) -> bool:
        return not self.opt.built or self.opt.owns(param)

    def slot_names(self, param: torch.Tensor) -> list[str]:
        names = ["m", "v"]
        names += ["vhat"] if self.opt.amsgrad else []
        names += ["average"] if self.opt.use_ema else []
        names += ["gradient_accumulator"] if self.opt.gradient_accumulation_steps else []
        return names

    def check(
        self,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        shared: dict[str, torch.Tensor],
    ) -> None:
        # Keras' extra slots (average, gradient_accumulator) are not Adam's:
        # the step's checks apply to m, v and vhat.
        adam = {"m", "v", "vhat"}
        super().check({p: {k: t for k, t in n.items() if k in adam} for p, n in slots.items()}, {})
        counter = float(shared["iterations"])
        if not (counter.is_integer() and counter >= 0):
            raise ValueError(f"the checkpoint's iterations is {counter!r}, not a count >= 0")

    def assign(
        self,
        slots: dict[torch.Tensor, dict[str, torch.Tensor]],
        cleared: list[torch.Tensor],
        shared: dict[str, torch.Tensor],
    ) -> None:
        if not self.opt.built:
            self.opt.build(self.params)
        by_var: dict[torch.Tensor, dict[str, torch.Tensor]] = {
            param: {self.NAMES[name]: value for name, value in named.items()}
            for param, named in slots.items()
        }
        for param in cleared:  # never updated by TF: Keras' slots start at zero
            by_var[param] = {
                name: torch.zeros_like(tensor)
                for name, tensor in (self.opt.slots_of(param) or {}).items()
            }
        self.opt.restore_state(by_var, shared["iterations"], shared.get("learning_rate"))


def _optimized(target: _Target) -> bool:
    """Adam updates floating variables only; an integer one (``global_step``) is a value."""
    return target.param.dtype.is_floating_point


def _adapter(optimizer: Any, targets: list[_Target]) -> _Optimizer | None:
    if optimizer is None:
        return None
    from .. import AdamOptimizer  # late: tfadam imports this package
    from ..optimizer import Adam

    if isinstance(optimizer, AdamOptimizer):
        return _TF1Face(optimizer)
    if isinstance(optimizer, Adam):
        return _TorchFace(optimizer)
    try:
        from ..keras import Adam as KerasAdam
    except ImportError:  # pragma: no cover - the Keras face ships with tfadam
        KerasAdam = None  # noqa: N806
    if KerasAdam is not None and isinstance(optimizer, KerasAdam):
        return _KerasFace(optimizer, [t.param for t in targets if _optimized(t)])
    raise TypeError(
        f"optimizer is a {type(optimizer).__name__}; load_tf_checkpoint restores TF's Adam "
        "state into tfadam.Adam, tfadam.AdamOptimizer or tfadam.keras.Adam (or pass "
        "optimizer=None to load the variables only). torch.optim.Adam cannot continue a TF "
        "run: its epsilon and bias correction differ."
    )


# -- the load --------------------------------------------------------------------


def _check_fits(reader: Any, key: str, tensor: torch.Tensor, what: str) -> str | None:
    info = reader.info(key)
    dtype = _TORCH.get(info.dtype)
    want = tuple(tensor.shape)
    if info.shape == want and dtype == tensor.dtype:
        return None
    fix = ""
    if info.shape != want and len(want) == 2 and info.shape == want[::-1]:
        fix = " (TF stores a Dense kernel as (in, out), torch.nn.Linear as (out, in): map"
        fix += " linear.weight.T)"
    elif info.shape == want and dtype is not None:
        fix = f" (cast the model with .to({dtype}), or load into a {info.dtype} copy)"
    return (
        f"{key!r} is {list(info.shape)} {info.dtype} in the checkpoint, but {what} is "
        f"{list(want)} {str(tensor.dtype).replace('torch.', '')}{fix}"
    )


def load_tf_checkpoint(
    path: str | os.PathLike[str],
    optimizer: Any,
    var_map: VarMap,
    *,
    rename: Callable[[str], str | None] | None = None,
    optimizer_name: str | None = None,
    accumulators: tuple[str, str] | None = None,
) -> LoadResult:
    """Restore variables and Adam state from a TensorFlow checkpoint; no TF needed.

    Args:
        path: checkpoint prefix (``model.ckpt-1000``), its ``.index`` file, a
            directory (its latest checkpoint), or a Keras 3 ``.keras`` /
            ``.weights.h5`` file (variables named by their Keras path).
        optimizer: for a TF1 ``AdamOptimizer``'s state (TF1 ``Saver``, or TF2
            ``tf.train.Checkpoint`` over ``tf.compat.v1.train.AdamOptimizer``):
            a :class:`tfadam.Adam` (m, v into ``optimizer.state[p]``,
            ``beta1_power``/``beta2_power`` into the param groups of the mapped
            parameters) or a :class:`tfadam.AdamOptimizer` (via its
            ``restore``). For a Keras 3 optimizer's state: a
            ``tfadam.keras.Adam`` (slots, ``iterations`` and the learning-rate
            variable; built with the mapped parameters if not built yet).
            None loads the variables only.
        var_map: TF variable name -> tensor to load it into. A name may be the
            TF name (``dense/kernel``), a TF2 object path (``model/dense/kernel``)
            or a checkpoint key. A tensor may be a view of a whole parameter —
            ``linear.weight.T`` loads a TF Dense kernel, stored (in, out), into
            torch's (out, in) layout, slots included (kept in the parameter's
            layout: train the parameter). An integer tensor (``global_step``)
            is loaded as a value. Or an ``nn.Module``: its
            named parameters, named by ``rename(torch_name)`` (default: dots
            become slashes; return None to skip one).
        optimizer_name: TF1 slot suffix (``<var>/<name>``, ``<var>/<name>_1``);
            default the optimizer's ``get_name()``, else "Adam".
        accumulators: keys of ``beta1_power``/``beta2_power`` when a TF1 graph
            had several Adam optimizers.

    Continue a TF1 ``Session`` run with ``numerics="graph"`` (TF2 eager with
    the default "eager") to get TF's bits for sparse updates.

    Raises:
        CheckpointError: damaged/missing files, unknown names, or tensors whose
            shape or dtype differ from the model (all listed). Nothing is
            modified then.

    Example:
        >>> import numpy as np, os, tempfile, torch, tfadam
        >>> from tfadam.checkpoint.writer import write_bundle
        >>> prefix = os.path.join(tempfile.mkdtemp(), "model.ckpt")
        >>> write_bundle(prefix, {"w": np.ones(2, np.float32),
        ...     "w/Adam": np.full(2, 0.1, np.float32), "w/Adam_1": np.full(2, 0.01, np.float32),
        ...     "beta1_power": np.float32(0.81), "beta2_power": np.float32(0.998)})
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = tfadam.Adam([w], lr=0.1)
        >>> print(load_tf_checkpoint(prefix, opt, {"w": w}))
        loaded 1 variables, 1 with Adam slots
        accumulators from 'beta1_power', 'beta2_power'
        >>> w.data, opt.state[w]["m"], opt.param_groups[0]["beta1_power"]
        (tensor([1., 1.]), tensor([0.1000, 0.1000]), tensor(0.8100))
    """
    targets = _targets(var_map, rename)
    adapter = _adapter(optimizer, targets)
    if optimizer_name is None:
        get_name = getattr(optimizer, "get_name", None)
        optimizer_name = get_name() if callable(get_name) else "Adam"
    reader, names = open_checkpoint(path, optimizer_name=optimizer_name)
    with reader:
        result = LoadResult()
        problems: list[str] = []
        plan: list[tuple[_Target, Variable, OptimizerState | None]] = []
        shared_keys: set[tuple[tuple[str, str], ...]] = set()

        # 1. names and metadata: nothing read yet
        for target in targets:
            var = names.variable(target.tf_name)
            problem = _check_fits(reader, var.key, target.tensor, target.label)
            if problem:
                problems.append(problem)
            state = None
            if adapter is not None and _optimized(target) and adapter.owns(target.param):
                state = names.optimizer_state(var)
            if state is not None:
                assert adapter is not None
                _check_flavour(state, adapter, reader, var)
                wanted = adapter.slot_names(target.param)
                missing = [s for s in wanted if s not in state.slots]
                if missing:
                    problems.append(
                        f"{var.key!r}: the checkpoint has no {missing} slot for it, which "
                        f"the optimizer keeps for {target.label} (amsgrad, use_ema, "
                        "gradient accumulation?)"
                    )
                for slot in wanted if not problem else ():  # slots share the var's shape
                    if slot in state.slots:
                        problem = _check_fits(
                            reader, state.slots[slot], target.tensor, f"{target.label}'s slot"
                        )
                        if problem:
                            problems.append(problem)
                shared_keys.add(_shared_keys(state, names, reader, var, accumulators))
            plan.append((target, var, state))
        if len(shared_keys) > 1:
            raise CheckpointError(
                "the mapped variables belong to different optimizers: "
                + " vs ".join(str(dict(k)) for k in sorted(shared_keys)),
                path=reader.index_path,
                hint="Load each optimizer's variables in its own call",
            )
        shared = dict(next(iter(shared_keys), ()))
        for what, key in shared.items():
            want = dict(_SHARED[adapter.flavour])[what]  # type: ignore[union-attr]
            info = reader.info(key)
            if info.dtype != want or info.shape != ():
                problems.append(
                    f"{key!r} ({what}) is {info.shape} {info.dtype}, not a {want} scalar"
                )
        if problems:
            raise CheckpointError(
                f"{len(problems)} tensor(s) do not fit: " + "; ".join(problems),
                path=reader.index_path,
                hint="Nothing was modified",
            )

        # 2. read every tensor (checksums verified) before touching the model
        values: list[torch.Tensor] = []
        slot_values: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        cleared: list[torch.Tensor] = []
        for target, var, state in plan:
            values.append(reader.read_torch(var.key))
            result.variables[target.tf_name] = var.key
            if adapter is None or not _optimized(target) or not adapter.owns(target.param):
                continue
            if state is None:
                cleared.append(target.param)
                result.without_slots.append(target.tf_name)
                continue
            named = {}
            for slot in adapter.slot_names(target.param):
                full = torch.empty_like(target.param, memory_format=torch.preserve_format)
                if full.stride() != target.param.stride():
                    raise ValueError(
                        f"{target.label}: cannot lay out optimizer slots like the parameter "
                        "(overlapping or non-dense strides); make it contiguous."
                    )
                target.view_of(full).copy_(reader.read_torch(state.slots[slot]))
                named[slot] = full
            slot_values[target.param] = named
            result.slots[target.tf_name] = {s: state.slots[s] for s in named}
        shared_values = {w: reader.read_torch(k).reshape(()).clone() for w, k in shared.items()}
        result.optimizer_variables = dict(shared)
        if "beta1_power" in shared:
            result.accumulators = shared["beta1_power"], shared["beta2_power"]

        # 3. check what will be written, as a step checks it, before writing any
        # of it: the model's tensors (writable, no two sharing memory) and the
        # optimizer's state (slots like their parameters, accumulators in [0, 1)).
        _check_writable([target for target, _, _ in plan])
        if adapter is not None and shared_values:
            adapter.check(slot_values, shared_values)

        # 4. assign: nothing below can fail on bad input
        with torch.no_grad():
            for (target, _, _), value in zip(plan, values, strict=True):
                target.tensor.copy_(value)
        if adapter is not None and shared_values:
            adapter.assign(slot_values, cleared, shared_values)

        used = set(result.variables.values()) | set(shared.values())
        used |= {k for named in result.slots.values() for k in named.values()}
        result.unused = [k for k in reader.keys() if k not in used]
    return result


def _check_writable(targets: list[_Target]) -> None:
    """Raise ``ValueError`` unless every target can be copied into, each element once."""
    for target in targets:
        problem = guard.unwritable(target.tensor)
        if problem:
            raise ValueError(f"{target.label} ({guard.describe(target.tensor)}) {problem}")
    labels = [target.label for target in targets]
    guard.check_disjoint([t.tensor for t in targets], len(targets), labels.__getitem__)


def _check_flavour(state: OptimizerState, adapter: _Optimizer, reader: Any, var: Variable) -> None:
    if state.flavour == adapter.flavour:
        return
    if state.flavour == "keras":
        raise CheckpointError(
            "this checkpoint holds Keras optimizer state (an iterations counter, no "
            "beta1_power/beta2_power)",
            path=reader.index_path,
            key=var.key,
            hint="Load it into tfadam.keras.Adam, which follows Keras' arithmetic",
        )
    raise CheckpointError(
        "this checkpoint holds TF1 AdamOptimizer state (beta1_power/beta2_power), which "
        "Keras' optimizer has no place for",
        path=reader.index_path,
        key=var.key,
        hint="Load it into tfadam.Adam or tfadam.AdamOptimizer, which follow TF1's arithmetic",
    )


def _shared_keys(
    state: OptimizerState,
    names: CheckpointNames,
    reader: Any,
    var: Variable,
    accumulators: tuple[str, str] | None,
) -> tuple[tuple[str, str], ...]:
    """Keys of the optimizer-wide state that goes with ``var``'s slots."""
    if state.flavour == "keras":
        if state.iterations is None:
            raise CheckpointError(
                "Keras optimizer state without its iterations counter",
                path=reader.index_path,
                key=var.key,
            )
        keys = [("iterations", state.iterations)]
        if state.learning_rate is not None:
            keys.append(("learning_rate", state.learning_rate))
        return tuple(keys)
    if accumulators is not None:
        pair = accumulators
        for key in pair:
            if key not in reader:
                raise reader.missing_key_error(key)
    elif state.beta1_power is not None and state.beta2_power is not None:
        pair = (state.beta1_power, state.beta2_power)
    elif not names.object_based:
        pair = names.tf1_accumulators()
    else:
        raise CheckpointError(
            "the checkpoint has Adam slots but no beta1_power/beta2_power",
            path=reader.index_path,
            key=var.key,
            hint="Pass accumulators=(beta1_key, beta2_key)",
        )
    return (("beta1_power", pair[0]), ("beta2_power", pair[1]))
