"""The exceptions and warnings tfadam raises beyond plain ``ValueError``/``TypeError``.

Each error is a subclass of ``ValueError``, so code that catches the built-in
type keeps working; catch the subclass to react to one cause. Every error is
raised before anything is modified: the variables, slots, accumulators and
``global_step`` are bit-identical afterwards.

Example:
    >>> import torch, tfadam
    >>> w = torch.zeros(2)
    >>> opt = tfadam.AdamOptimizer(0.1, nonfinite="raise")
    >>> try:
    ...     opt.apply_gradients([(torch.tensor([1.0, float("nan")]), w)])
    ... except tfadam.NonFiniteGradientError as error:
    ...     print(error.parameter, error.index)
    variable #0 (shape (2,), torch.float32) (1,)
    >>> w
    tensor([0., 0.])
"""

from __future__ import annotations

__all__ = [
    "BetaRoundsToOneWarning",
    "CorruptCheckpointError",
    "EpsilonUnderflowWarning",
    "NonFiniteGradientError",
    "PrecisionWarning",
    "StateDictError",
]


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or Inf and the optimizer was built with ``nonfinite="raise"``.

    Attributes:
        parameter: the name of the variable whose gradient is not finite.
        when: the call, e.g. ``"step() #12"`` or ``"apply_gradients #3 (global_step 41)"``.
        nan, inf: how many elements are NaN, how many are ±Inf.
        index: the position of the first non-finite element in the variable.
    """

    def __init__(
        self, message: str, *, parameter: str, when: str, nan: int, inf: int, index: tuple
    ) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.when = when
        self.nan = nan
        self.inf = inf
        self.index = index


class StateDictError(ValueError):
    """An optimizer state (a ``state_dict`` or checkpoint) does not fit the optimizer.

    Raised by ``tfadam.Adam.load_state_dict`` and :func:`tfadam.load_checkpoint`
    before the optimizer or model is modified.
    """


class CorruptCheckpointError(ValueError):
    """A checkpoint file is torn, truncated or altered: its checksum does not match.

    :func:`tfadam.load_checkpoint` raises it before reading anything into a
    model or optimizer.
    """


class PrecisionWarning(RuntimeWarning):
    """A hyperparameter that the variable's dtype cannot hold changes the update's meaning.

    tfadam computes what TF computes regardless; these warnings (once per
    optimizer and kind) name the fix.
    """


class EpsilonUnderflowWarning(PrecisionWarning):
    """ε is non-zero but rounds to 0 in a variable's dtype (1e-8 in float16 does).

    With ε = 0 the update divides by ``sqrt(v)``, which is 0 wherever the
    gradient has been 0, giving NaN (TF computes the same). Warned once per
    optimizer.
    """


class BetaRoundsToOneWarning(PrecisionWarning):
    """β1 or β2 is below 1 but rounds to 1 in a variable's dtype (0.999 in bfloat16 does).

    With β2 = 1, ``1 - β2`` is 0: v never grows from 0, so each update
    divides by ε alone (steps ~lr/ε). With β1 = 1, m never grows from 0 and
    while ``1 - β1^t`` rounds to 0 too the update is 0 * inf = NaN. Warned once
    per optimizer.
    """
