"""``tfadam.Adam``: TF's Adam as a real ``torch.optim.Optimizer``.

Each param group behaves as one TF1 ``AdamOptimizer``: its own float32
``beta1_power``/``beta2_power`` accumulators (kept in the group, so that
``state_dict()`` carries them), shared by the group's parameters.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from itertools import compress, repeat
from operator import attrgetter, is_
from typing import Any

import torch

from . import engine, guard, hooks
from .eager import eager_only
from .errors import StateDictError
from .hyper import Hyper, Resolution, accumulator_mismatch

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
        nonfinite: ``"propagate"`` (TF: NaN/Inf gradients are applied) or
            ``"raise"``: scan every gradient first and raise
            :class:`tfadam.NonFiniteGradientError` naming the step and the
            parameter, leaving everything unchanged. A setting of this
            optimizer object, not of its groups: ``load_state_dict`` keeps it.

    A group whose parameters all have ``grad is None`` is skipped, accumulators
    included. A group with no parameters at all still advances its
    accumulators on every step: under ``ZeroRedundancyOptimizer`` such a group
    is this rank's empty share of a group whose parameters other ranks
    update, and ``consolidate_state_dict()`` takes the group's accumulators
    from whichever rank consolidates. Sparse COO gradients
    (``nn.Embedding(sparse=True)``) are accepted.

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
        nonfinite: engine.Nonfinite = "propagate",
        **torch_only: Any,
    ) -> None:
        _refuse_torch_only(torch_only)
        engine.Options(amsgrad, nesterov, sparse, numerics, nonfinite)  # type: ignore[arg-type]
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
        self._nonfinite = nonfinite
        self._calls = 0  # step() calls that applied, to name the step in errors
        # Per group index (engine.reuse): the plan's steady part, and the
        # group's param_names and which of its parameters had gradients (its
        # error messages name parameters by name and position).
        self._steady: dict[int, tuple[engine.Steady, Any, Any]] = {}
        self._seen: tuple[Any, list[Any], list[Any]] = (None, [], [])
        self._planned: dict[int, tuple[torch.Tensor, ...]] = {}  # each group's last variables

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``, refusing invalid hyperparameters and options at once.

        As torch does at construction: ``lr >= 0``, ``0 <= betas < 1``, ``eps >= 0``
        (finite, as float32 for numbers); a bool option takes a bool. A
        callable is checked where it is evaluated, at each step.

        >>> import torch, tfadam
        >>> tfadam.Adam([torch.nn.Parameter(torch.ones(2))], lr=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: hyperparameter lr=-1.0 makes the Adam update undefined; it must be >= 0 \
and finite.
        """
        if isinstance(param_group, dict):
            _check_group_settings({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # So that a pickled or deep-copied optimizer keeps its nonfinite policy.
        return {**super().__getstate__(), "_nonfinite": self._nonfinite, "_calls": self._calls}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict (after its own checks and casts) and
        # unpickling both end here, before anything is replaced: the one place
        # to refuse a state that does not fit the parameters.
        guard.check_torch_state(state["state"], state["param_groups"])
        super().__setstate__(state)
        self.__dict__.setdefault("_nonfinite", "propagate")
        self.__dict__.setdefault("_calls", 0)
        self._steady = {}  # the state was replaced: the next step prepares afresh
        self._seen, self._planned = (None, [], []), {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, all or nothing.

        Raises :class:`tfadam.StateDictError` (a ``ValueError``), leaving the
        optimizer unchanged, when the state does not fit: other group count or
        sizes, slots of another shape, missing or foreign slots, accumulators
        that are not float32 scalars in [0, 1), invalid hyperparameters.

        Example:
            >>> import torch, tfadam
            >>> opt = tfadam.Adam([torch.nn.Parameter(torch.ones(2))])
            >>> state = opt.state_dict()
            >>> state["param_groups"][0]["betas"] = (1.5, 0.999)
            >>> opt.load_state_dict(state)
            Traceback (most recent call last):
            ...
            tfadam.errors.StateDictError: param_groups[0]: hyperparameter param_groups[0] \
beta1=1.5 makes the Adam update undefined; it must be in [0, 1).
        """
        try:
            super().load_state_dict(state_dict)
        except StateDictError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise StateDictError(
                f"cannot load this state_dict into tfadam.Adam ({_layout(self.param_groups)}; "
                f"the state_dict has {_saved_layout(state_dict)}): {type(error).__name__}: "
                f"{error}. Load the state_dict of an optimizer over the same parameters."
            ) from error

    # torch.compile runs the step eagerly (a graph break): the kernels are C
    # called through ctypes, which dynamo cannot trace, and tracing the
    # validation only burns compile time and recompiles.
    @eager_only
    def step(self, *args: Any, **kwargs: Any) -> Any:
        """``step(closure=None)``: one Adam step on every group; validates all
        groups before touching any.

        Runs torch.optim's step hooks and profiler range (see
        :mod:`tfadam.hooks`); the hooks see the arguments as given, as torch's do.
        """
        if type(self).step is not Adam.step:
            # A subclass's own step, which torch wrapped: the hooks ran there.
            return self._step(*args, **kwargs)
        return hooks.stepped(self, Adam._step, args, kwargs)

    step.hooked = True  # type: ignore[attr-defined]  # torch: run as is (hooks.stepped)
    step.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("closure", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        ]
    )

    @eager_only  # (as step: a subclass's step may call it)
    def _step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans: list[tuple[dict[str, Any], engine.Plan, bool, list[Any]]] = []
        steadies: dict[int, tuple[engine.Steady, Any, Any]] = {}
        planned: dict[int, tuple[torch.Tensor, ...]] = {}
        when = f"step() #{self._calls + 1}"
        # Phase 1: every group is checked and planned before any is touched.
        # First every group's settings: their callables are the user's code,
        # which could move a tensor (`p.data = ...`), so all of them run before
        # the first check of a tensor, and none between the checks and the writes.
        settings = []
        for index, group in enumerate(self.param_groups):
            where = f"param_groups[{index}] "
            betas = group["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"{where}betas must be a pair (beta1, beta2); got {betas!r}.")
            hyper = engine.resolve_all(group["lr"], betas[0], betas[1], group["eps"], where)
            settings.append((hyper, _options(group, self._nonfinite, where), where))
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            hyper, options, where = settings[index]
            accumulators, new = _accumulators_of(group, hyper, where)
            earlier = [p for _, p, _, _ in plans]
            plan = (
                None
                if new
                else self._reused(index, group, hyper, options, accumulators, earlier, when)
            )
            fresh: list[Any] = []
            if plan is None:
                updates, fresh = self._updates(index, group)
                # An empty group still steps: it may be a ZeRO rank's share of a
                # group that other ranks update (see the class docstring).
                if not updates and params:
                    continue
                variables = tuple(u.param for u in updates)
                last = self._planned.get(index, ())
                plan = engine.prepare(
                    updates,
                    hyper,
                    options,
                    accumulators=accumulators,
                    earlier=earlier,
                    when=when,
                    # Worth keeping for reuse where the last step prepared these same
                    # variables: a loop whose structure changes every step pays nothing.
                    reusable=len(last) == len(variables) and all(map(is_, last, variables)),
                )
                planned[index] = variables
            else:
                assert plan.steady is not None
                planned[index] = plan.steady.params
            guard.warn_numerics(self, plan.hyper, plan.dtypes)
            plans.append((group, plan, new, fresh))
            if plan.steady is not None:
                # A plan of some of the group (others' grad None) names its parameters
                # by their positions: it is reused only where they are the same.
                present = None
                if len(plan.updates) != len(params):
                    present = list(map(_IS_NOT_NONE, map(_GRAD, params)))
                steadies[index] = (plan.steady, group.get("param_names"), present)
        # Phase 2: arithmetic only, and the step's record with it, uninterruptible.
        with engine.atomic():
            for group, plan, new, fresh in plans:
                engine.execute(plan, engine.BetaPowers(plan))
                for param, state in fresh:
                    self.state[param] = state
                if new:
                    assert plan.accumulators is not None
                    group["beta1_power"] = plan.accumulators.beta1_power
                    group["beta2_power"] = plan.accumulators.beta2_power
            if plans:
                self._calls += 1
        # Kept for the next step (structure only: no gradient stays referenced).
        self._steady, self._planned = steadies, planned
        self._seen = (self.state, list(self.state), list(self.state.values()))
        return loss

    def _reused(
        self,
        index: int,
        group: dict[str, Any],
        hyper: Resolution,
        options: engine.Options,
        accumulators: engine.Accumulators,
        earlier: list[engine.Plan],
        when: str,
    ) -> engine.Plan | None:
        """The group's last plan for this step (:func:`engine.reuse`), or None: prepare it."""
        steady, names, kept = self._steady.get(index, (None, None, None))
        if steady is None or group.get("param_names") is not names:
            return None
        params = group["params"]
        grads = list(map(_GRAD, params))
        members, present = params, None
        if any(map(_IS_NONE, grads)):  # (frozen parameters have no gradient)
            present = list(map(_IS_NOT_NONE, grads))
            members, grads = list(compress(params, present)), list(compress(grads, present))
        if present != kept:  # its errors name parameters by position: the same positions
            return None
        states = steady.states if self._state_unchanged() else list(map(self.state.get, members))
        return engine.reuse(
            steady,
            members,
            grads,
            states,
            hyper,
            options,
            accumulators=accumulators,
            earlier=earlier,
            when=when,
        )

    def _state_unchanged(self) -> bool:
        """Whether ``self.state`` holds what the last step left: the same dicts for the same keys.

        Then each parameter's state is the one its group's plan was made with.
        Compared by identity, in C: looking each parameter up would hash it in
        Python (``Tensor.__hash__``), which costs more than the whole check.
        """
        state, keys, values = self._seen
        return (
            state is self.state
            and len(state) == len(keys)
            and all(map(is_, state, keys))
            and all(map(is_, state.values(), values))
        )

    def _updates(
        self, index: int, group: dict[str, Any]
    ) -> tuple[list[engine.Update], list[tuple[torch.Tensor, dict[str, torch.Tensor]]]]:
        """The group's updates, and the (param, state) pairs to store once it has stepped."""
        params = group["params"]
        grads = list(map(_GRAD, params))
        positions: Sequence[int] = range(len(params))
        if any(map(_IS_NONE, grads)):
            positions = [i for i, grad in enumerate(grads) if grad is not None]
            params, grads = [params[i] for i in positions], [grads[i] for i in positions]
        # .get: indexing torch's defaultdict would add an entry before validation.
        states = list(map(self.state.get, params))
        fresh = []
        if None in states:
            for i, state in enumerate(states):
                if state is None:
                    states[i] = {}
                    fresh.append((params[i], states[i]))
        # Names are made only for an error: a step may have thousands of parameters.
        names = map(
            partial, repeat(_label), repeat(index), positions, repeat(group.get("param_names"))
        )
        updates = engine.Update.many(params, grads, states, names)
        return updates, fresh


# torch.optim.Adam's keyword arguments that TF's rule has no counterpart for:
# what each would mean, and what to do instead.
_TORCH_ONLY = {
    "foreach": "tfadam always runs its fused C kernels on CPU (one loop over every tensor of "
    "a dtype, no per-tensor dispatch), so there is no implementation to choose. Drop it.",
    "fused": "tfadam always runs its fused C kernels on CPU (one loop over every tensor of a "
    "dtype), so there is no implementation to choose. Drop it.",
    "capturable": "TF's rule reads the float32 beta-power accumulators on the host each step; "
    "tfadam's step cannot be captured in a CUDA graph. Drop it.",
    "differentiable": "TF's apply ops have no gradient, and tfadam's step runs under no_grad. "
    "Drop it.",
    "maximize": "TF's Adam always minimizes. Negate the loss (or the gradients) instead.",
    "weight_decay": "TF1's Adam has no weight decay. For decoupled weight decay (AdamW) use "
    "tfadam.keras.Adam(weight_decay=...), Keras' rule; for L2 regularisation add "
    "wd/2 * sum of squared parameters to the loss.",
    "decoupled_weight_decay": "TF1's Adam has no weight decay. For decoupled weight decay "
    "(AdamW) use tfadam.keras.Adam(weight_decay=...), Keras' rule.",
}


def _refuse_torch_only(arguments: dict[str, Any]) -> None:
    for key, value in arguments.items():
        if key in _TORCH_ONLY:
            raise TypeError(
                f"tfadam.Adam takes no {key}= (got {key}={value!r}), an option of "
                f"torch.optim.Adam: TF's Adam rule has no such option. {_TORCH_ONLY[key]}"
            )
        raise TypeError(f"tfadam.Adam got an unexpected keyword argument {key!r}.")


def _check_group_settings(group: dict[str, Any]) -> None:
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}.")
    values = (group.get("lr"), betas[0], betas[1], group.get("eps"))
    # Callables are evaluated, and checked, at each step; 0.0 stands in for them.
    engine.resolve_all(
        *(0.0 if callable(v) and not isinstance(v, torch.Tensor) else v for v in values),
        where="",
    )
    engine.Options(
        group.get("amsgrad", False),
        group.get("nesterov", False),
        group.get("sparse", "dense"),
        group.get("numerics", "eager"),
    )


_GRAD = attrgetter("grad")
_IS_NONE = partial(operator.is_, None)
_IS_NOT_NONE = partial(operator.is_not, None)


def _options(group: dict[str, Any], nonfinite: str, where: str = "") -> engine.Options:
    choices = (group["amsgrad"], group["nesterov"], group["sparse"], group["numerics"], nonfinite)
    try:
        try:
            return _known_options(*choices)
        except TypeError as error:  # unhashable: Options names what is wrong with it
            if "unhashable" not in str(error):
                raise
            return engine.Options(*choices)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}{error}") from error


# typed: True and 1 are equal keys to a plain cache, and 1 is not a bool option.
@lru_cache(maxsize=16, typed=True)
def _known_options(*choices: Any) -> engine.Options:
    return engine.Options(*choices)


def _label(index: int, position: int, names: Sequence[str] | None) -> str:
    label = f"param_groups[{index}]['params'][{position}]"
    return label if names is None else f"{label} ({names[position]!r})"


def _accumulators_of(
    group: dict[str, Any], hyper: Resolution, where: str
) -> tuple[engine.Accumulators, bool]:
    """The group's accumulators (checked), or new ones and True before its first step."""
    powers = [group.get("beta1_power"), group.get("beta2_power")]
    if powers[0] is None and powers[1] is None:
        return engine.Accumulators.create(hyper.beta1, hyper.beta2), True
    guard.check_accumulators(*powers, where)
    mismatch = accumulator_mismatch(hyper.beta1, hyper.beta2, *powers)
    if mismatch:  # while planning: no group has moved yet
        raise TypeError(f"{where}{mismatch}")
    return engine.Accumulators(*powers), False


def _layout(groups: list[dict[str, Any]]) -> str:
    return f"{len(groups)} group(s) of sizes {[len(g['params']) for g in groups]}"


def _saved_layout(state_dict: Any) -> str:
    try:
        return _layout(list(state_dict["param_groups"]))
    except Exception:
        return f"no readable param_groups ({type(state_dict).__name__})"
