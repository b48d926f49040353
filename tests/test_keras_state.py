"""``tfadam.keras.Adam``'s public state: ``owns``, ``slots_of``, ``restore_state``.

Checkpoint code restores Keras state through these (not through the face's
private attributes); a bad restore changes no byte of any slot, the counter
or the learning rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from kernel_cases import assert_same_bits

import tfadam.keras


def trained(**config: Any) -> tuple[tfadam.keras.Adam, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    variables = [torch.randn(4, 3, generator=generator), torch.randn(5, generator=generator)]
    opt = tfadam.keras.Adam(learning_rate=0.01, **config)
    for _ in range(3):
        grads = [torch.randn(v.shape, generator=generator) for v in variables]
        opt.apply_gradients(zip(grads, variables, strict=True))
    return opt, variables


def same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit-identical: floats through their integer views, the int64 counter as is."""
    if actual.dtype.is_floating_point:
        assert_same_bits(actual, expected, what)
    else:
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), what


def snapshot(opt: tfadam.keras.Adam) -> list[torch.Tensor]:
    return [t.clone() for t in opt.variables]


def test_owns_and_slots_of() -> None:
    opt, (w, b) = trained(amsgrad=True, use_ema=True)
    stranger = torch.zeros(5)
    assert opt.owns(w) and opt.owns(b) and not opt.owns(stranger)
    assert not tfadam.keras.Adam().owns(w)  # not built
    assert opt.slots_of(stranger) is None
    slots = opt.slots_of(w)
    assert slots is not None
    assert sorted(slots) == ["average", "momentum", "velocity", "velocity_hat"]
    slots.clear()  # a copy of the mapping: the optimizer keeps its slots
    assert sorted(opt.slots_of(w) or {}) == ["average", "momentum", "velocity", "velocity_hat"]


def test_restore_state_continues_bit_for_bit() -> None:
    # Resuming from exported state is the same as never having stopped.
    source, variables = trained(amsgrad=True)
    resumed_vars = [v.clone() for v in variables]
    resumed = tfadam.keras.Adam(learning_rate=0.5, amsgrad=True)
    resumed.build(resumed_vars)
    slots = {
        r: dict(source.slots_of(v) or {}) for r, v in zip(resumed_vars, variables, strict=True)
    }
    resumed.restore_state(slots, source.iterations, learning_rate=source.learning_rate)
    assert int(resumed.iterations) == 3 and float(resumed.learning_rate) == float(
        torch.tensor(0.01)
    )
    generator = torch.Generator().manual_seed(9)
    for _ in range(2):
        grads = [torch.randn(v.shape, generator=generator) for v in variables]
        source.apply_gradients(zip(grads, variables, strict=True))
        resumed.apply_gradients(zip([g.clone() for g in grads], resumed_vars, strict=True))
    for a, e in zip(resumed_vars + resumed.variables, variables + source.variables, strict=True):
        same(a, e)


def test_restore_state_keeps_slots_not_given() -> None:
    opt, (w, b) = trained()
    before = snapshot(opt)
    opt.restore_state({w: {"velocity": torch.ones(4, 3)}}, iterations=7)
    assert int(opt.iterations) == 7
    assert_same_bits(opt.slots_of(w)["velocity"], torch.ones(4, 3))  # type: ignore[index]
    assert_same_bits(opt.slots_of(w)["momentum"], before[2])  # type: ignore[index]
    assert_same_bits(opt.slots_of(b)["velocity"], before[5])  # type: ignore[index]


# (case, the call given the optimizer and its variables, exception, message fragment)
BAD: list[tuple[str, Callable[[Any, list[torch.Tensor]], None], type[Exception], str]] = [
    (
        "a variable it was not built with",
        lambda o, v: o.restore_state({torch.zeros(5): {"momentum": torch.zeros(5)}}, 1),
        ValueError,
        "not a variable this optimizer was built with",
    ),
    (
        "an unknown slot name",
        lambda o, v: o.restore_state({v[0]: {"m": torch.zeros(4, 3)}}, 1),
        KeyError,
        "has no slot 'm'",
    ),
    (
        "a slot of AMSGrad on a plain Adam",
        lambda o, v: o.restore_state({v[0]: {"velocity_hat": torch.zeros(4, 3)}}, 1),
        KeyError,
        "velocity_hat",
    ),
    (
        "a slot of the wrong shape, after a good one",
        lambda o, v: o.restore_state(
            {v[0]: {"momentum": torch.ones(4, 3)}, v[1]: {"velocity": torch.ones(4)}}, 1
        ),
        ValueError,
        "must be a tensor of shape (5,)",
    ),
    (
        "a slot that is not a tensor",
        lambda o, v: o.restore_state({v[1]: {"momentum": [0.0] * 5}}, 1),
        ValueError,
        "must be a tensor of shape",
    ),
    (
        "an integer slot",
        lambda o, v: o.restore_state({v[1]: {"momentum": torch.zeros(5, dtype=torch.int32)}}, 1),
        ValueError,
        "floating values",
    ),
    (
        "a slot on the meta device",
        lambda o, v: o.restore_state({v[1]: {"momentum": torch.zeros(5, device="meta")}}, 1),
        ValueError,
        "floating values",
    ),
    (
        "a negative counter",
        lambda o, v: o.restore_state({v[1]: {"momentum": torch.ones(5)}}, -1),
        ValueError,
        "iterations must be a count",
    ),
    (
        "a fractional counter",
        lambda o, v: o.restore_state({}, torch.tensor(1.5)),
        ValueError,
        "iterations must be a count",
    ),
    (
        "a NaN counter",
        lambda o, v: o.restore_state({}, float("nan")),
        ValueError,
        "iterations must be a count",
    ),
    (
        "a bool counter",
        lambda o, v: o.restore_state({}, True),
        TypeError,
        "iterations must be a number",
    ),
    (
        "a learning rate that is not a scalar",
        lambda o, v: o.restore_state({v[1]: {"momentum": torch.ones(5)}}, 2, torch.ones(2)),
        ValueError,
        "must be a scalar",
    ),
    (
        "an optimizer not built yet",
        lambda o, v: tfadam.keras.Adam().restore_state({}, 1),
        ValueError,
        "needs a built optimizer",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_restore_changes_nothing(
    case: str, call: Callable[..., None], error: type[Exception], fragment: str
) -> None:
    opt, variables = trained()
    before, variables_before = snapshot(opt), [v.clone() for v in variables]
    with pytest.raises(error, match=None) as raised:
        call(opt, variables)
    assert fragment in str(raised.value), case
    for a, e in zip(opt.variables + variables, before + variables_before, strict=True):
        same(a, e, case)


class OnCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: the face's device check, without a GPU."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return torch.device("cuda", 0)


def off_the_cpu() -> list[torch.Tensor]:
    if torch.cuda.is_available():
        return [torch.zeros(3, device="cuda"), torch.zeros(3).as_subclass(OnCuda)]
    return [torch.zeros(3).as_subclass(OnCuda)]


@pytest.mark.parametrize("var", off_the_cpu(), ids=lambda v: type(v).__name__)
def test_variables_off_the_cpu_are_refused_before_anything_changes(var: torch.Tensor) -> None:
    # Keras' transforms are torch ops on the variable's device, proven on the CPU only.
    opt = tfadam.keras.Adam()
    with pytest.raises(ValueError, match="gives Keras' bits on CPU tensors only"):
        opt.apply_gradients([(torch.ones(3), var)])
    with pytest.raises(ValueError, match="Keep the variables on the CPU"):
        opt.build([var])
    assert not opt.built and int(opt.iterations) == 0
