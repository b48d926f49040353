"""``tfadam.keras``: Keras 3's Adam (``keras.optimizers.Adam``, TF backend), bit for bit.

The calling convention and bookkeeping of Keras 3's optimizer, on torch
tensors: an ``iterations`` counter instead of TF1's ``beta_power``
accumulators, ε = 1e-7 by default, and Keras' extras — AMSGrad, decoupled
weight decay, clipnorm / clipvalue / global_clipnorm, an exponential moving
average of the weights, gradient accumulation and a loss scale factor. The
arithmetic lives in :mod:`tfadam.keras_rule` and runs in the engine: this
module keeps the state, builds each call's :class:`tfadam.keras_rule.KerasPolicy`
(Keras' transforms) from its configuration and hands it to ``engine.execute``.

Example:
    >>> import torch, tfadam.keras
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = tfadam.keras.Adam(learning_rate=0.1)
    >>> opt.apply_gradients([(torch.tensor([1.0, 0.0, -1.0]), w)])
    tensor(1)
    >>> w.detach()
    tensor([0.9000, 1.0000, 1.1000])
    >>> [tuple(t.shape) for t in opt.variables]  # iteration, learning_rate, m, v
    [(), (), (3,), (3,)]
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from . import engine, keras_rule
from .hyper import Resolution
from .sparse import IndexedSlices

__all__ = ["Adam", "IndexedSlices", "LearningRateSchedule"]

Gradient = torch.Tensor | IndexedSlices
# A Python number, or a typed scalar: NumPy floating scalar, 0-dim array or tensor.
Number = float | np.floating | np.ndarray | torch.Tensor
LearningRate = float | Callable[[], Any]

# engine.prepare checks gradients and slots; the hyperparameters it carries are unused here.
_NO_HYPER = Resolution(0.0, 0.0, 0.0, 0.0)


class _Hyper(NamedTuple):
    beta_1: float | torch.Tensor
    beta_2: float | torch.Tensor
    epsilon: float | torch.Tensor
    weight_decay: float | torch.Tensor | None
    ema_momentum: float | torch.Tensor
    clipnorm: keras_rule.KerasScalar | None
    clipvalue: keras_rule.KerasScalar | None
    global_clipnorm: keras_rule.KerasScalar | None
    loss_scale_factor: keras_rule.KerasScalar | None


class LearningRateSchedule:
    """A learning rate that depends on the step, as Keras' ``LearningRateSchedule``.

    Subclass it and implement ``__call__(step) -> float | tensor``; the
    optimizer calls it with the number of apply calls made so far (an int).
    Keras' own schedules (``keras.optimizers.schedules.*``) are accepted as
    they are and give Keras' bits (their TF arithmetic is run by TF).

    >>> class Halving(LearningRateSchedule):
    ...     def __call__(self, step):
    ...         return 0.1 * 0.5 ** (step // 10)
    ...     def get_config(self):
    ...         return {}
    >>> Halving()(25)
    0.025
    """

    def __call__(self, step: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step).")

    def get_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement get_config().")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LearningRateSchedule:
        return cls(**config)


def _is_keras_schedule(value: Any) -> bool:
    return any(
        klass.__name__ == "LearningRateSchedule" and klass.__module__.startswith("keras")
        for klass in type(value).__mro__
    )


def _is_schedule(value: Any) -> bool:
    return isinstance(value, LearningRateSchedule) or _is_keras_schedule(value)


def _as_scalar(value: Any, what: str) -> float | torch.Tensor:
    """A Python number stays a number; a tensor-like (torch, numpy, TF) becomes a 0-dim tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number or a scalar tensor; got {value!r}.")
    if isinstance(value, (int, float)) and not isinstance(value, np.generic):
        return float(value)  # (np.float64 is a float, but float64 to ops.cast: below)
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    else:
        try:
            array = np.asarray(value)
        except Exception as error:
            message = f"{what} must be a number or a scalar tensor; got {value!r}."
            raise TypeError(message) from error
        if array.dtype.kind not in "fiu" and array.dtype.name != "bfloat16":
            raise TypeError(f"{what} must be a real number; got {value!r} ({array.dtype}).")
        if array.dtype.name == "bfloat16":
            tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(np.array(array))
    if tensor.numel() != 1:
        raise ValueError(f"{what} must be a scalar; got a tensor of shape {tuple(tensor.shape)}.")
    tensor = tensor.reshape(())
    if not tensor.dtype.is_floating_point:
        tensor = tensor.to(torch.float32)
    return tensor


def _typed_hyper(value: Any, name: str, *, optional: bool = False) -> float | torch.Tensor | None:
    """A hyperparameter Keras computes with as it is: ``beta_1``, ``beta_2``, ``epsilon``,
    ``weight_decay``, ``ema_momentum`` (and, checked here, the others).

    A Python number stays a float (Keras converts it as a literal); a NumPy
    floating scalar (``np.float64`` included, although it is a ``float``), a
    0-dim floating array or tensor (torch or TF) becomes a 0-dim CPU tensor of
    its dtype, which Keras keeps in its type promotion (:mod:`tfadam.keras_rule`).

    >>> _typed_hyper(0.9, "beta_1"), _typed_hyper(np.float16(0.5), "beta_1")
    (0.9, tensor(0.5000, dtype=torch.float16))
    >>> _typed_hyper(np.array([0.9]), "beta_1")
    Traceback (most recent call last):
    ...
    ValueError: Argument `beta_1` must be a scalar (0-dim); received a value of shape (1,). ...
    """
    if value is None and optional:
        return None
    if callable(value):
        # Keras accepts a callable here but fails at the first apply with
        # "Attempt to convert a value (<function ...>) ... to a Tensor".
        raise ValueError(
            f"Argument `{name}` must be a number; Keras' Adam cannot use a callable here (it "
            f"fails at the first step with 'Attempt to convert a value ... to a Tensor'). "
            f"Received: {name}={value!r}"
        )
    if isinstance(value, (int, float)) and not isinstance(value, (bool, np.generic)):
        return float(value)
    fix = f"Pass a Python float, or a floating NumPy scalar or 0-dim tensor as `{name}`."
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise TypeError(
            f"Argument `{name}` must be a real number; received {type(value).__name__} "
            f"{value!r}. {fix}"
        )
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_meta:
            raise ValueError(f"Argument `{name}` is a tensor on the meta device: it has no value.")
        tensor = tensor.cpu()
    else:
        try:
            array = np.asarray(value)
        except Exception as error:
            raise TypeError(
                f"Argument `{name}` must be a real number; received {type(value).__name__} "
                f"{value!r}. {fix}"
            ) from error
        if array.dtype.name == "bfloat16":
            tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        elif array.dtype.kind == "f" and array.dtype.itemsize in (2, 4, 8):
            tensor = torch.from_numpy(np.array(array))
        else:
            raise TypeError(
                f"Argument `{name}` must be a floating value; received {type(value).__name__} "
                f"of dtype {array.dtype}. {fix}"
            )
    if tensor.dtype not in engine.FLOATING:
        raise TypeError(
            f"Argument `{name}` must be a floating value; received a {tensor.dtype} tensor. {fix}"
        )
    if tensor.dim() != 0:
        raise ValueError(
            f"Argument `{name}` must be a scalar (0-dim); received a value of shape "
            f"{tuple(tensor.shape)}. Pass one value, e.g. x.reshape(())."
        )
    return tensor.clone()


def _converted_hyper(value: Any, name: str, *, optional: bool = False) -> Any:
    """A hyperparameter a TF op converts: ``clipnorm``, ``clipvalue``, ``loss_scale_factor``.

    Checked as :func:`_typed_hyper`; a Python number becomes a float, a
    NumPy scalar or 0-dim array stays one (TF converts the two differently
    in ``tf.clip_by_norm``), anything else becomes a 0-dim torch tensor, the
    stand-in for a TF tensor (see :func:`tfadam.keras_rule.keras_convert`).

    >>> _converted_hyper(np.float16(2.0), "clipnorm"), _converted_hyper(2, "clipnorm")
    (np.float16(2.0), 2.0)
    """
    typed = _typed_hyper(value, name, optional=optional)
    if isinstance(value, np.generic):
        return value
    if isinstance(value, np.ndarray):
        return np.array(value)
    return typed


def _tf_intra_op_threads() -> int:
    """TF's default intra-op pool size: ``TF_NUM_INTRAOP_THREADS`` or the usable CPUs."""
    configured = os.environ.get("TF_NUM_INTRAOP_THREADS", "")
    if configured.strip().isdigit() and int(configured) > 0:
        return int(configured)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _label(position: int, var: Any) -> str:
    if isinstance(var, torch.Tensor):
        return f"variable #{position} (shape {tuple(var.shape)}, {var.dtype})"
    return f"variable #{position} ({type(var).__name__})"


def _to_tensor_like(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(like.device, like.dtype)
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        tensor = torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.array(array))
    return tensor.to(like.device, like.dtype)


class Adam:
    """Keras 3's ``keras.optimizers.Adam`` (TensorFlow backend) on torch tensors, bit for bit.

    With ``t = iterations + 1`` (the number of updates so far, plus one)::

        alpha = lr * sqrt(1 - β2^t) / (1 - β1^t)
        m = m + (g - m) * (1 - β1)
        v = v + (g*g - v) * (1 - β2)
        θ = θ - (m * alpha) / (sqrt(v) + ε)

    every operation rounded to the variable's dtype in Keras' order; ``β^t``
    is a power (``tf.pow``), ``1 - β`` is computed in Python double and then
    rounded (see :func:`tfadam.keras_rule.keras_coefficients`). Unlike TF1 (and
    ``tfadam.AdamOptimizer``), ε defaults to 1e-7.

    Args:
        learning_rate: a Python float (held as a float32 tensor, like Keras'
            variable), a :class:`LearningRateSchedule` or Keras schedule
            (called with the step), or a zero-argument callable.
        beta_1, beta_2, epsilon: Python numbers, or typed scalars (a NumPy
            floating scalar, a 0-dim array or tensor), which Keras computes
            with in their own dtype (``1 - β`` in it, products in the
            promoted dtype); the same bits here.
        amsgrad: keep ``velocity_hat = max(velocity_hat, v)``.
        weight_decay: decoupled decay ``θ = θ - θ * wd * lr`` before each step
            (a number or a typed scalar, cast to the variable's dtype).
        clipnorm, clipvalue, global_clipnorm: at most one; clip each gradient's
            norm, each element, or the norm of all gradients together. These,
            ``ema_momentum`` and ``loss_scale_factor`` may be typed scalars as
            well, converted or promoted as Keras does (docs/hyperparameters.md).
        use_ema, ema_momentum, ema_overwrite_frequency: keep an exponential
            moving average of the weights; copy it into them every
            ``ema_overwrite_frequency`` updates (or at
            :meth:`finalize_variable_values`).
        loss_scale_factor: gradients are divided by it (see :meth:`scale_loss`).
        gradient_accumulation_steps: update every n-th call with the mean of
            the last n gradients.
        name: the optimizer's name.
        intra_op_threads: TF's intra-op thread count, which decides how TF
            splits the sums behind clipnorm and global_clipnorm (default: TF's
            default, ``TF_NUM_INTRAOP_THREADS`` or the number of usable CPUs).

    Gradients may be dense tensors, :class:`tfadam.IndexedSlices`, torch sparse
    COO tensors or None (skipped, with a warning). Everything is validated
    before anything is modified. Keras' errors keep their meaning and type.

    Example:
        >>> import torch, tfadam.keras
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = tfadam.keras.Adam(learning_rate=0.1, weight_decay=0.5, clipnorm=1.0)
        >>> for _ in range(3):
        ...     opt.apply_gradients([(torch.tensor([3.0, -4.0]), w)])
        tensor(1)
        tensor(2)
        tensor(3)
        >>> w.detach()
        tensor([0.5721, 1.1426])
    """

    def __init__(
        self,
        learning_rate: LearningRate = 0.001,
        beta_1: Number = 0.9,
        beta_2: Number = 0.999,
        epsilon: Number = 1e-7,
        amsgrad: bool = False,
        weight_decay: Number | None = None,
        clipnorm: Number | None = None,
        clipvalue: Number | None = None,
        global_clipnorm: Number | None = None,
        use_ema: bool = False,
        ema_momentum: Number = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: Number | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str = "adam",
        *,
        intra_op_threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("decay", None) is not None:
            warnings.warn(
                "Argument `decay` is no longer supported and will be ignored.", stacklevel=2
            )
        if kwargs:
            raise ValueError(f"Argument(s) not recognized: {kwargs}")
        if gradient_accumulation_steps:
            if isinstance(gradient_accumulation_steps, bool) or not (
                isinstance(gradient_accumulation_steps, int) and gradient_accumulation_steps >= 2
            ):
                raise ValueError(
                    "`gradient_accumulation_steps` must be an integer >= 2. Received: "
                    f"gradient_accumulation_steps={gradient_accumulation_steps}"
                )
        if use_ema:
            momentum = _typed_hyper(ema_momentum, "ema_momentum")
            if float(momentum) > 1 or float(momentum) < 0:  # type: ignore[arg-type]
                raise ValueError(
                    f"`ema_momentum` must be in the range [0, 1]. Received: "
                    f"ema_momentum={ema_momentum}"
                )
            if ema_overwrite_frequency and (
                not isinstance(ema_overwrite_frequency, int)
                or isinstance(ema_overwrite_frequency, bool)
                or ema_overwrite_frequency < 1
            ):
                raise ValueError(
                    "`ema_overwrite_frequency` must be an integer >= 1 or None. Received: "
                    f"ema_overwrite_frequency={ema_overwrite_frequency}"
                )
        clipping = dict(clipnorm=clipnorm, clipvalue=clipvalue, global_clipnorm=global_clipnorm)
        if sum(value is not None for value in clipping.values()) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: clipnorm={clipnorm}, clipvalue={clipvalue}, "
                f"global_clipnorm={global_clipnorm}"
            )
        _converted_hyper(clipnorm, "clipnorm", optional=True)
        _converted_hyper(clipvalue, "clipvalue", optional=True)
        _converted_hyper(global_clipnorm, "global_clipnorm", optional=True)
        _converted_hyper(loss_scale_factor, "loss_scale_factor", optional=True)
        if intra_op_threads is not None and (
            not isinstance(intra_op_threads, int) or intra_op_threads < 1
        ):
            raise ValueError(f"intra_op_threads must be a positive int; got {intra_op_threads!r}.")
        for key, value in dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon).items():
            _typed_hyper(value, key)
        _typed_hyper(weight_decay, "weight_decay", optional=True)
        self.name = name
        # Kept as given (as Keras keeps them, and get_config returns them); each
        # step reads them (_hyperparameters), before anything is written.
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.amsgrad = bool(amsgrad)
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.use_ema = bool(use_ema)
        self.ema_momentum = ema_momentum
        self.ema_overwrite_frequency = ema_overwrite_frequency
        self.loss_scale_factor = loss_scale_factor
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.intra_op_threads = intra_op_threads
        # Keras' "int" variable is int64 under the TF backend.
        self._iterations = torch.zeros((), dtype=torch.int64)
        self._learning_rate: torch.Tensor | Callable[..., Any] = self._checked_learning_rate(
            learning_rate
        )
        self.built = False
        self._trainable: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        self._slots: list[dict[str, torch.Tensor]] = []
        self._exclude_ids: set[int] = set()

    # --- Keras' public surface ---------------------------------------------------------

    @property
    def iterations(self) -> torch.Tensor:
        """Updates so far (int64); with accumulation, calls // gradient_accumulation_steps."""
        if self.gradient_accumulation_steps:
            return torch.div(
                self._iterations, self.gradient_accumulation_steps, rounding_mode="floor"
            )
        return self._iterations

    @property
    def learning_rate(self) -> Any:
        """The current learning rate: the float32 tensor, a schedule's value, or a callable's."""
        return self._current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        if _is_schedule(learning_rate) or callable(learning_rate):
            self._learning_rate = learning_rate
            return
        if _is_schedule(self._learning_rate):
            raise TypeError(
                "This optimizer was created with a `LearningRateSchedule` object as its "
                "`learning_rate` constructor argument, hence its learning rate is not settable. "
                "If you need the learning rate to be settable, you should instantiate the "
                "optimizer with a float `learning_rate` argument."
            )
        value = _as_scalar(learning_rate, "learning_rate")
        new = keras_rule.keras_cast(value, torch.float32)
        if isinstance(self._learning_rate, torch.Tensor):
            self._learning_rate.copy_(new)
        else:
            self._learning_rate = new.clone()

    @property
    def variables(self) -> list[torch.Tensor]:
        """The optimizer's state in Keras' order (``keras_optimizer.variables``).

        ``iteration``, ``learning_rate`` (when a float), then per variable:
        EMA ``average``\\ s, ``gradient_accumulator``\\ s, ``momentum`` and
        ``velocity`` interleaved, ``velocity_hat``\\ s.
        """
        found = [self._iterations]
        if isinstance(self._learning_rate, torch.Tensor):
            found.append(self._learning_rate)
        for names in (("average",), ("gradient_accumulator",), ("momentum", "velocity")):
            for slots in self._slots:
                found += [slots[name] for name in names if name in slots]
        found += [slots["velocity_hat"] for slots in self._slots if "velocity_hat" in slots]
        return found

    def _held_variable(self, var: torch.Tensor) -> torch.Tensor | None:
        """The built variable whose elements ``var`` designates, all of them, or None.

        Each ``weight.T`` is a new tensor object; a view of all of a variable
        (same memory, any layout) stands for it. Its gradient is laid out like
        the variable before the step, which is elementwise: the same bits.
        """
        key = _alias_key(var)
        for held in self._trainable:
            if _alias_key(held) == key:
                return held
            if (
                held.dtype == var.dtype
                and held.device == var.device
                and held.numel() == var.numel() > 0
                and not var.is_meta
                and held.untyped_storage().data_ptr() == var.untyped_storage().data_ptr()
                and held.storage_offset() == var.storage_offset()
                and _dense(held)
                and _dense(var)
            ):
                return held
        return None

    def build(self, var_list: Sequence[torch.Tensor]) -> None:
        """Create the state for ``var_list`` (zeros), as the first apply call does."""
        if self.built:
            return
        var_list = list(var_list)
        self._check_variables(var_list)
        self._build(var_list)

    def apply_gradients(self, grads_and_vars: Iterable[tuple[Any, torch.Tensor]]) -> torch.Tensor:
        """Apply ``(gradient, variable)`` pairs; returns the ``iterations`` tensor (as Keras)."""
        pairs = list(grads_and_vars)
        for position, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    f"grads_and_vars[{position}] must be a (gradient, variable) pair; got "
                    f"{type(pair).__name__}."
                )
        grads = [g for g, _ in pairs]
        variables = [v for _, v in pairs]
        self.apply(grads, variables if pairs else None)
        return self._iterations

    def apply(
        self, grads: Sequence[Any], trainable_variables: Sequence[torch.Tensor] | None = None
    ) -> None:
        """One optimizer step: ``grads`` map 1:1 to ``trainable_variables``.

        Without ``trainable_variables`` the optimizer must be built, and
        ``grads`` follow the variables it was built with. An empty ``grads``
        is a no-op, as in Keras.
        """
        grads = list(grads)
        if len(grads) == 0:
            return
        variables = self._variables_for(grads, trainable_variables)
        plan = self._validated(grads, variables)
        hyper = self._hyperparameters()
        self._check_tensor_dtypes(plan, hyper)
        learning_rates = self._learning_rates_for(plan)
        # The build, the step and its count commit together: an interrupt waits for all.
        with engine.atomic(), torch.no_grad():
            if not self.built:
                self._build(variables)
            schedule = self._schedule(learning_rates, hyper)
            policy = self._policy(plan, learning_rates, schedule, hyper)
            engine.execute(self._update_plan(plan), schedule, policy.transforms)  # counts the call

    def scale_loss(self, loss: Any) -> Any:
        """``loss * loss_scale_factor`` (the loss unchanged without one)."""
        if self.loss_scale_factor is not None:
            return loss * self.loss_scale_factor
        return loss

    def exclude_from_weight_decay(
        self,
        var_list: Sequence[torch.Tensor] | None = None,
        var_names: Sequence[str] | None = None,
        *,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    ) -> None:
        """Exempt variables from weight decay: by identity, or by name.

        ``var_names`` are regular-expression fragments searched in each name,
        as Keras does with ``variable.name``; torch tensors carry no name, so
        pass the names with ``named_parameters`` (e.g. ``model.named_parameters()``).

        >>> model = torch.nn.Linear(2, 1)
        >>> opt = Adam(weight_decay=0.1)
        >>> opt.exclude_from_weight_decay(var_names=["bias"],
        ...                               named_parameters=model.named_parameters())
        >>> opt._uses_weight_decay(model.bias), opt._uses_weight_decay(model.weight)
        (False, True)
        """
        excluded = {id(v) for v in var_list} if var_list else set()
        if var_names:
            if named_parameters is None:
                raise ValueError(
                    "exclude_from_weight_decay(var_names=...) needs the variables' names: torch "
                    "tensors have none. Pass named_parameters=model.named_parameters(), or "
                    "var_list=[...]."
                )
            pattern = re.compile("|".join(set(var_names)))
            excluded |= {id(v) for name, v in named_parameters if pattern.search(name)}
        self._exclude_ids = excluded

    def finalize_variable_values(self, var_list: Sequence[torch.Tensor]) -> None:
        """With ``use_ema``: copy the moving averages into the variables (end of training)."""
        if not self.use_ema:
            return
        var_list = list(var_list)
        if len(var_list) != len(self._slots):
            raise ValueError(
                f"The length of model variables ({len(var_list)}) to override does not match "
                f"the length of model variables stored in the optimizer ({len(self._slots)}). "
                "Please check if the optimizer was called on your model."
            )
        with torch.no_grad():
            for var, slots in zip(var_list, self._slots, strict=True):
                var.copy_(slots["average"])

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Set :attr:`variables` from arrays or tensors, in that order (e.g. Keras' state).

        All shapes are checked before anything is written.
        """
        if not self.built:
            raise ValueError(
                "You are calling `set_weights()` on an optimizer that has not yet been built. "
                "Please call `optimizer.build(trainable_variables)` to create the optimizer "
                "weights before calling `set_weights()`."
            )
        targets = self.variables
        weights = list(weights)
        if len(weights) != len(targets):
            raise ValueError(
                f"set_weights() got {len(weights)} arrays for {len(targets)} optimizer "
                "variables; pass one per entry of `optimizer.variables`."
            )
        converted = []
        for position, (target, weight) in enumerate(zip(targets, weights, strict=True)):
            value = _to_tensor_like(weight, target)
            if value.shape != target.shape:
                raise ValueError(
                    f"Optimizer variable #{position} has shape {tuple(target.shape)} not "
                    f"compatible with provided weight shape {tuple(value.shape)}."
                )
            converted.append(value)
        with torch.no_grad():
            for target, value in zip(targets, converted, strict=True):
                target.copy_(value)

    # --- state, for checkpoint and persistence code --------------------------------------

    def owns(self, var: torch.Tensor) -> bool:
        """Whether ``var`` is one of the variables this optimizer was built with.

        >>> w = torch.zeros(2)
        >>> opt = Adam()
        >>> opt.owns(w), opt.build([w]), opt.owns(w), opt.owns(torch.zeros(2))
        (False, None, True, False)
        """
        return self.built and id(var) in self._index

    def slots_of(self, var: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """``var``'s slots by Keras' names (``momentum``, ``velocity``, ``velocity_hat``,
        ``average``, ``gradient_accumulator``, as configured), or None if not :meth:`owns`.

        The tensors are the optimizer's own; change them with :meth:`restore_state`.

        >>> w = torch.zeros(2)
        >>> opt = Adam(amsgrad=True)
        >>> opt.build([w])
        >>> sorted(opt.slots_of(w)), opt.slots_of(torch.zeros(2))
        (['momentum', 'velocity', 'velocity_hat'], None)
        """
        if not self.owns(var):
            return None
        return dict(self._slots[self._index[id(var)]])

    def restore_state(
        self,
        slots_by_var: Mapping[torch.Tensor, Mapping[str, torch.Tensor]],
        iterations: int | torch.Tensor,
        learning_rate: float | torch.Tensor | None = None,
    ) -> None:
        """Set slots, the iterations counter and the learning rate; all checked, then written.

        ``slots_by_var`` maps variables this optimizer :meth:`owns` to some or
        all of their slots by Keras' names (see :meth:`slots_of`); slots not
        given keep their values. ``iterations`` counts apply calls (Keras'
        ``iteration`` variable); ``learning_rate`` sets a float learning rate
        (ignored when the learning rate is a schedule or a callable). Nothing
        is written unless everything fits.

        >>> w = torch.zeros(2)
        >>> opt = Adam()
        >>> opt.build([w])
        >>> opt.restore_state({w: {"momentum": torch.ones(2)}}, iterations=5)
        >>> opt.slots_of(w)["momentum"], int(opt.iterations)
        (tensor([1., 1.]), 5)
        """
        if not self.built:
            raise ValueError(
                "restore_state() needs a built optimizer: call optimizer.build(variables) first."
            )
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []
        for position, (var, named) in enumerate(slots_by_var.items()):
            held = self.slots_of(var)
            if held is None:
                raise ValueError(
                    f"restore_state: {_label(position, var)} is not a variable this optimizer "
                    "was built with; build it with every variable whose state you restore."
                )
            for name, value in named.items():
                if name not in held:
                    raise KeyError(
                        f"restore_state: {_label(position, var)} has no slot {name!r}; this "
                        f"optimizer keeps {sorted(held)}."
                    )
                if not isinstance(value, torch.Tensor) or value.shape != held[name].shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                    raise ValueError(
                        f"restore_state: slot {name!r} of {_label(position, var)} must be a "
                        f"tensor of shape {tuple(held[name].shape)}; got {shape!r}."
                    )
                if not value.dtype.is_floating_point or value.is_meta:
                    raise ValueError(
                        f"restore_state: slot {name!r} of {_label(position, var)} must hold "
                        f"floating values; got a {value.dtype} tensor on {value.device}."
                    )
                writes.append((held[name], value))
        counter = _as_scalar(iterations, "iterations")
        if not float(counter).is_integer() or float(counter) < 0:
            raise ValueError(f"restore_state: iterations must be a count >= 0; got {iterations!r}.")
        if learning_rate is not None and isinstance(self._learning_rate, torch.Tensor):
            writes.append((self._learning_rate, torch.as_tensor(_as_scalar(learning_rate, "lr"))))
        writes.append((self._iterations, torch.tensor(int(float(counter)), dtype=torch.int64)))
        with torch.no_grad():
            for target, value in writes:
                target.copy_(value)

    def get_config(self) -> dict[str, Any]:
        """Keras' config keys; a float learning rate as a float, else the object itself."""
        learning_rate: Any = self._learning_rate
        if isinstance(learning_rate, torch.Tensor):
            learning_rate = float(learning_rate)
        return {
            "name": self.name,
            "learning_rate": learning_rate,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "loss_scale_factor": self.loss_scale_factor,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "amsgrad": self.amsgrad,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> Adam:
        """Rebuild from :meth:`get_config` — or from a Keras Adam's ``get_config()``.

        A serialized Keras schedule (a dict) is deserialized with Keras.

        >>> Adam.from_config(Adam(learning_rate=0.01).get_config()).get_config()["learning_rate"]
        0.009999999776482582
        """
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            from keras.optimizers.schedules import deserialize  # a Keras config: Keras is here

            config["learning_rate"] = deserialize(
                config["learning_rate"], custom_objects=custom_objects
            )
        return cls(**config)

    # --- bookkeeping -------------------------------------------------------------------

    def _checked_learning_rate(self, learning_rate: Any) -> torch.Tensor | Callable[..., Any]:
        if _is_schedule(learning_rate) or callable(learning_rate):
            return learning_rate
        if not isinstance(learning_rate, float):
            raise ValueError(
                "Argument `learning_rate` should be float, or an instance of "
                "LearningRateSchedule, or a callable (that takes in the current iteration value "
                f"and returns the corresponding learning rate value). Received instead: "
                f"learning_rate={learning_rate}"
            )
        # Keras keeps a float learning rate in a float32 variable (floatx).
        return torch.tensor(learning_rate, dtype=torch.float32)

    def _current_learning_rate(self) -> Any:
        if _is_keras_schedule(self._learning_rate):
            return _as_scalar(self._learning_rate(np.int64(self._iterations)), "learning rate")
        if isinstance(self._learning_rate, LearningRateSchedule):
            return _as_scalar(self._learning_rate(int(self._iterations)), "learning rate")
        if isinstance(self._learning_rate, torch.Tensor):
            return self._learning_rate
        return _as_scalar(self._learning_rate(), "learning rate")

    def _threads(self) -> int:
        return self.intra_op_threads or _tf_intra_op_threads()

    def _variables_for(
        self, grads: list[Any], trainable_variables: Sequence[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built on a list of variables. Call `optimizer.build(trainable_variables)` "
                    "first."
                )
            if len(grads) != len(self._trainable):
                raise ValueError(
                    "When passing `grads` as a list of gradient tensors, the gradients must "
                    f"match `optimizer.variables` one-to-one. Received a list of {len(grads)} "
                    f"gradients, but the optimizer is tracking {len(self._trainable)} "
                    "trainable variables."
                )
            return list(self._trainable)
        variables = list(trainable_variables)
        if len(variables) != len(grads):
            raise ValueError(
                f"Received {len(grads)} gradients for {len(variables)} variables; pass one "
                "gradient (or None) per variable."
            )
        self._check_variables(variables)
        if self.built:
            substituted = False
            for position, var in enumerate(variables):
                if id(var) in self._index:
                    continue
                held = self._held_variable(var)
                if held is None:
                    raise ValueError(
                        f"Unknown variable: {_label(position, var)}. This optimizer can only be "
                        "called for the variables it was originally built with (or views of "
                        "all of one, such as weight.T). When working with a new set of "
                        "variables, you should recreate a new optimizer instance."
                    )
                if not _same_layout(var, held):
                    grads[position] = _relayout(grads[position], var, held, position)
                variables[position] = held
                substituted = True
            if substituted:
                self._check_variables(variables)  # two views of one variable
        return variables

    @staticmethod
    def _check_variables(variables: Sequence[Any]) -> None:
        seen: dict[int, int] = {}
        for position, var in enumerate(variables):
            if not isinstance(var, torch.Tensor):
                raise TypeError(
                    f"{_label(position, var)} is not a torch tensor; tfadam.keras.Adam updates "
                    "torch tensors (nn.Parameter or leaf tensors) in place."
                )
            if var.dtype not in engine.FLOATING:
                raise TypeError(
                    f"{_label(position, var)} is not a floating variable; Adam updates "
                    "float16, bfloat16, float32 and float64 variables only."
                )
            if var.device.type not in ("cpu", "meta"):  # meta: the engine names it
                # Keras' transforms (clipping, weight decay, EMA) are torch ops on the
                # variable's device, proven bit-exact on the CPU only (see kernels.path_for).
                raise ValueError(
                    f"{_label(position, var)} is on {var.device}; tfadam.keras.Adam gives "
                    "Keras' bits on CPU tensors only (on a GPU, NaN bits and roundings are "
                    "unproven). Keep the variables on the CPU, or use tfadam.Adam / "
                    "tfadam.AdamOptimizer, which update CUDA tensors through the CPU."
                )
            if id(var) in seen:
                raise ValueError(
                    f"{_label(position, var)} is the same tensor as variable #{seen[id(var)]}; "
                    "pass each variable once."
                )
            seen[id(var)] = position

    def _validated(self, grads: list[Any], variables: list[torch.Tensor]) -> engine.Plan:
        """Everything a step needs, checked; nothing is modified."""
        updates, missing = [], []
        for position, (grad, var) in enumerate(zip(grads, variables, strict=True)):
            if grad is None:
                missing.append(_label(position, var))
                continue
            state = self._slots[self._index[id(var)]] if self.built else {}
            updates.append(engine.Update(var, grad, state, _label(position, var)))
        if not updates:
            raise ValueError(
                "No gradients provided for any variable. Check that the loss depends on the "
                "variables (a gradient is None for a variable the loss does not use)."
            )
        if missing:
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss. If "
                "using `model.compile()`, did you forget to provide a `loss` argument?",
                stacklevel=3,
            )
        plan = engine.prepare(updates, _NO_HYPER, engine.Options())
        sparse = [u for u in plan.updates if isinstance(u.grad, IndexedSlices)]
        if sparse and self.loss_scale_factor is not None:
            raise TypeError(
                f"loss_scale_factor cannot divide the IndexedSlices gradient of {sparse[0].name} "
                "(Keras: unsupported operand type(s) for /: 'IndexedSlices' and 'float'). "
                "Densify it first, or scale the loss without loss_scale_factor."
            )
        if self._clips_globally() and len({u.param.dtype for u in plan.updates}) > 1:
            dtypes = sorted({str(u.param.dtype) for u in plan.updates})
            raise TypeError(
                f"global_clipnorm needs every gradient in one dtype, got {dtypes} (Keras/TF: "
                "'cannot compute Mul as input #1 was expected to be a ... tensor'). Use "
                "clipnorm, or one dtype for all variables."
            )
        return plan

    def _is_update_step(self) -> bool:
        steps = self.gradient_accumulation_steps
        return not steps or (int(self._iterations) + 1) % steps == 0

    def _clips_globally(self) -> bool:
        return bool(self.global_clipnorm and self.global_clipnorm > 0) and self._is_update_step()

    def _uses_weight_decay(self, var: torch.Tensor) -> bool:
        return id(var) not in self._exclude_ids

    def _learning_rates_for(self, plan: engine.Plan) -> list[Any]:
        """Keras reads ``self.learning_rate`` once per decayed variable, then once for the step.

        A schedule is a function of the step, so it is evaluated once; a
        callable is called as often as Keras calls it, in the same order.
        """
        if not self._is_update_step():
            return []
        count = 1
        if self.weight_decay is not None:
            count += sum(self._uses_weight_decay(u.param) for u in plan.updates)
        if _is_schedule(self._learning_rate) or isinstance(self._learning_rate, torch.Tensor):
            return [self._current_learning_rate()] * count
        return [self._current_learning_rate() for _ in range(count)]

    def _build(self, variables: list[torch.Tensor]) -> None:
        self._trainable = list(variables)
        self._index = {id(v): i for i, v in enumerate(variables)}
        names = ["momentum", "velocity"]
        if self.use_ema:
            names.append("average")
        if self.gradient_accumulation_steps:
            names.append("gradient_accumulator")
        if self.amsgrad:
            names.append("velocity_hat")
        self._slots = [
            {name: torch.zeros_like(v, memory_format=torch.preserve_format) for name in names}
            for v in variables
        ]
        self.built = True

    # --- one step, in Keras' order (BaseOptimizer.apply / _backend_apply_gradients) -------

    def _hyperparameters(self) -> _Hyper:
        """``beta_1``, ``beta_2``, ``epsilon``, ``weight_decay`` as this step reads them."""
        return _Hyper(
            _typed_hyper(self.beta_1, "beta_1"),  # type: ignore[arg-type]
            _typed_hyper(self.beta_2, "beta_2"),  # type: ignore[arg-type]
            _typed_hyper(self.epsilon, "epsilon"),  # type: ignore[arg-type]
            _typed_hyper(self.weight_decay, "weight_decay", optional=True),
            _typed_hyper(self.ema_momentum, "ema_momentum") if self.use_ema else 0.0,  # type: ignore[arg-type]
            _converted_hyper(self.clipnorm, "clipnorm", optional=True),
            _converted_hyper(self.clipvalue, "clipvalue", optional=True),
            _converted_hyper(self.global_clipnorm, "global_clipnorm", optional=True),
            _converted_hyper(self.loss_scale_factor, "loss_scale_factor", optional=True),
        )

    def _check_tensor_dtypes(self, plan: engine.Plan, hyper: _Hyper) -> None:
        """A tensor ``loss_scale_factor`` or ``clipvalue`` must be each gradient's dtype;
        a typed ``global_clipnorm`` must not promote the gradients' dtype.

        TF converts a Python number or NumPy value to the gradient's dtype, but
        takes a tensor as it is: ``g / scale`` raises TypeError ("`x` and `y`
        must have the same dtype"), ``tf.clip_by_value`` InvalidArgumentError
        ("cannot compute Minimum as input #1 was expected to be a ... tensor").
        """
        checked = [("loss_scale_factor", hyper.loss_scale_factor)]
        if self._is_update_step() and not (hyper.clipnorm or self.global_clipnorm):
            checked.append(("clipvalue", hyper.clipvalue))
        for name, value in checked:
            if not isinstance(value, torch.Tensor):
                continue
            for u in plan.updates:
                if u.param.dtype != value.dtype:
                    raise TypeError(
                        f"Argument `{name}` is a {value.dtype} tensor, but the gradient of "
                        f"{u.name} is {u.param.dtype}; Keras/TF cannot mix them (a tensor is not "
                        "converted to the gradient's dtype). Pass a Python float or a NumPy "
                        "scalar, which Keras converts, or a tensor of the variables' dtype."
                    )
        clip = hyper.global_clipnorm
        if self._clips_globally() and isinstance(clip, (np.generic, np.ndarray, torch.Tensor)):
            dtype = plan.updates[0].param.dtype  # one dtype for all (_validated)
            typed = keras_rule.keras_typed(clip)
            promoted = keras_rule.keras_result_type(dtype, typed.dtype)
            if (typed.dtype if isinstance(clip, torch.Tensor) else promoted) != dtype:
                raise TypeError(
                    f"Argument `global_clipnorm` is {typed.dtype} and the gradients are {dtype}: "
                    "Keras computes the clipping scale in the wider dtype and TF then fails "
                    "('cannot compute AddV2 as input #1 was expected to be a ... tensor'). Pass "
                    "a Python float, or a value of the gradients' dtype (or narrower, as NumPy)."
                )

    def _schedule(self, learning_rates: list[Any], hyper: _Hyper) -> keras_rule.Iterations:
        return keras_rule.Iterations(
            counter=self._iterations,
            step=int(self.iterations),
            learning_rate=learning_rates[-1] if learning_rates else None,
            beta_1=hyper.beta_1,
            beta_2=hyper.beta_2,
            epsilon=hyper.epsilon,
        )

    def _update_plan(self, plan: engine.Plan) -> engine.Plan:
        """``plan``'s updates on the slots by the engine's names, under ``Options(rule="keras")``.

        Keras' update (AMSGrad, repeated sparse rows, typed hyperparameters
        included) runs in the engine. Prepared after the build (the slots exist)
        and before the first write; the engine checks the transformed gradients
        in turn.
        """
        updates = plan.updates
        params = [u.param for u in updates]
        moments = [_moments(self._slots[self._index[id(p)]], self.amsgrad) for p in params]
        options = engine.Options(amsgrad=self.amsgrad, rule="keras")
        grads, names = [u.grad for u in updates], [u[3] for u in updates]
        return engine.prepare(engine.Update.many(params, grads, moments, names), _NO_HYPER, options)

    def _policy(
        self,
        plan: engine.Plan,
        learning_rates: list[Any],
        schedule: keras_rule.Iterations,
        hyper: _Hyper,
    ) -> keras_rule.KerasPolicy:
        """This call's transforms, from the configuration; the engine runs them in Keras' order.

        The face says only which tensors each one reads and writes: this call's
        variables and their slots, every variable's accumulator (reset after an
        update) and average (the moving average covers every variable).
        """
        params = [u.param for u in plan.updates]
        shapes = [p.shape for p in params]
        slots = [self._slots[self._index[id(p)]] for p in params]
        update = self._is_update_step()
        loss_scale = accumulation = clipping = weight_decay = moving_average = None
        if hyper.loss_scale_factor is not None:
            loss_scale = keras_rule.LossScale(hyper.loss_scale_factor)
        if self.gradient_accumulation_steps:
            accumulation = keras_rule.Accumulation(
                accumulators=[s["gradient_accumulator"] for s in slots],
                shapes=shapes,
                steps=self.gradient_accumulation_steps,
                updates=update,
                every_accumulator=[s["gradient_accumulator"] for s in self._slots],
            )
        if any(c is not None for c in (hyper.clipnorm, hyper.clipvalue, hyper.global_clipnorm)):
            clipping = keras_rule.ClipGradients(
                keras_rule.Clipping(hyper.clipnorm, hyper.clipvalue, hyper.global_clipnorm),
                shapes,
                self._threads(),
            )
        if hyper.weight_decay is not None and update:
            # Keras read the learning rate once per decayed variable (_learning_rates_for).
            decayed = iter(learning_rates[:-1])
            rates = [next(decayed) if self._uses_weight_decay(p) else None for p in params]
            weight_decay = keras_rule.WeightDecay(params, hyper.weight_decay, rates)
        if self.use_ema:
            moving_average = keras_rule.MovingAverage(
                averages=[s["average"] for s in self._slots],
                thetas=self._trainable,
                ema_momentum=hyper.ema_momentum,
                iterations=schedule.step,
                overwrite_frequency=self.ema_overwrite_frequency,
            )
        return keras_rule.KerasPolicy(
            loss_scale, accumulation, clipping, weight_decay, moving_average
        )


def _moments(slots: dict[str, torch.Tensor], amsgrad: bool) -> dict[str, torch.Tensor]:
    """A variable's Keras slots by the engine's names (``m``, ``v``, ``vhat``)."""
    moments = {"m": slots["momentum"], "v": slots["velocity"]}
    if amsgrad:
        moments["vhat"] = slots["velocity_hat"]
    return moments


def _dense(t: torch.Tensor) -> bool:
    """``t`` covers ``numel`` consecutive elements of its storage, each once."""
    expected = 1
    for stride, size in sorted(
        (st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride()


def _relayout(grad: Any, view: torch.Tensor, held: torch.Tensor, position: int) -> Any:
    """A dense gradient of ``view`` laid out like ``held`` (the variable ``view`` shows)."""
    if grad is None:
        return None
    if (
        not isinstance(grad, torch.Tensor)
        or grad.layout != torch.strided
        or grad.shape != view.shape
        or grad.dtype != view.dtype
        or grad.device != view.device
    ):
        raise ValueError(
            f"{_label(position, view)} is a view of a variable in another layout (e.g. "
            "weight.T); its gradient must be a dense tensor of the view's shape, dtype and "
            f"device, got {_gradient_label(grad)}. Or pass the variable itself."
        )
    out = torch.empty_like(held, memory_format=torch.preserve_format)
    if out.stride() != held.stride():  # _dense(held) makes this unreachable
        raise ValueError(f"{_label(position, view)}: cannot lay out its gradient like it")
    out.as_strided(view.shape, view.stride(), out.storage_offset()).copy_(grad.detach())
    return out


def _gradient_label(grad: Any) -> str:
    if isinstance(grad, torch.Tensor):
        return (
            f"a {grad.layout} tensor of shape {tuple(grad.shape)}, {grad.dtype}, on {grad.device}"
        )
    return f"an object of type {type(grad).__name__}"


def _alias_key(var: torch.Tensor) -> tuple[Any, ...]:
    """What a variable is: its memory and its layout (a tensor without memory: itself)."""
    if var.is_meta:
        return ("object", id(var))
    return (
        str(var.device),
        var.untyped_storage().data_ptr(),
        var.storage_offset(),
        tuple(var.shape),
        var.stride(),
        var.dtype,
    )
