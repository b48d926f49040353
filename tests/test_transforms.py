"""The engine's extension point for a face's transforms (``engine.Transform``).

What ``engine.execute(plan, schedule, transforms)`` promises, checked on both
update rules: the hooks run in the documented order; a ``gradients`` hook that
returns None means no update (the schedule still counts the call); gradients a
transform replaced are checked before the first write; an interrupt arriving
inside a hook waits until the step, transforms included, is complete.
Keras' own transforms (``keras_rule.KerasPolicy``) are proven against live
Keras in tests/test_keras*.py.
"""

from __future__ import annotations

import _thread
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tfadam import engine, keras_rule
from tfadam.hyper import resolve_all

RULES = ["tf1", "keras"]


@dataclass
class Recorder:
    """A transform that logs its hooks; ``replace`` maps the gradients, ``stop`` ends the chain."""

    name: str
    log: list[str]
    replace: Any = None
    stop: bool = False
    on_before: Any = None
    seen: list[Any] = field(default_factory=list)

    def gradients(self, grads: Sequence[Any]) -> Sequence[Any] | None:
        self.log.append(f"{self.name}.gradients")
        self.seen.append(list(grads))
        if self.stop:
            return None
        return grads if self.replace is None else [self.replace(g) for g in grads]

    def before_update(self) -> None:
        self.log.append(f"{self.name}.before_update")
        if self.on_before is not None:
            self.on_before()

    def after_update(self, updated: bool) -> None:
        self.log.append(f"{self.name}.after_update({updated})")


class Counting:
    """A schedule that serves Keras-style coefficients and counts its advances."""

    def __init__(self) -> None:
        self.counter = torch.zeros((), dtype=torch.int64)
        self.inner = keras_rule.Iterations(self.counter, 0, torch.tensor(0.1), 0.9, 0.999, 1e-7)

    def coefficients(self, dtype: torch.dtype) -> Any:
        return self.inner.coefficients(dtype)

    def advance(self) -> None:
        self.inner.advance()


def _plan(rule: str) -> tuple[engine.Plan, torch.Tensor, dict[str, torch.Tensor], Any]:
    theta = torch.linspace(-1.0, 1.0, 6)
    state = {"m": torch.full((6,), 0.01), "v": torch.full((6,), 0.02)}
    grad = torch.linspace(0.5, -0.5, 6)
    update = engine.Update(theta, grad, state, "theta")
    if rule == "tf1":
        hyper = resolve_all(0.1, 0.9, 0.999, 1e-8, "")
        accumulators = engine.Accumulators.create(0.9, 0.999)
        plan = engine.prepare([update], hyper, engine.Options(), accumulators=accumulators)
        return plan, theta, state, engine.BetaPowers(plan)
    plan = engine.prepare(
        [update], resolve_all(0.0, 0.0, 0.0, 0.0, ""), engine.Options(rule="keras")
    )
    return plan, theta, state, Counting()


def _bits(*tensors: torch.Tensor) -> list[list[int]]:
    return [
        t.view(torch.int32).tolist() if t.dtype == torch.float32 else t.tolist() for t in tensors
    ]


def _schedule_state(plan: engine.Plan, schedule: Any) -> list[Any]:
    """The Keras counter, or TF1's beta powers (the plan's accumulators, which BetaPowers advances)."""
    if isinstance(schedule, Counting):
        return [int(schedule.counter)]
    assert plan.accumulators is not None
    return _bits(plan.accumulators.beta1_power, plan.accumulators.beta2_power)


@pytest.mark.parametrize("rule", RULES)
def test_hooks_run_in_order_around_the_update(rule: str) -> None:
    plan, theta, state, schedule = _plan(rule)
    log: list[str] = []
    first, second = Recorder("a", log), Recorder("b", log)
    engine.execute(plan, schedule, [first, second])
    assert log == [
        "a.gradients",
        "b.gradients",
        "a.before_update",
        "b.before_update",
        "a.after_update(True)",
        "b.after_update(True)",
    ]
    # Without a replaced gradient the update is the plain one, bit for bit.
    twin, twin_theta, twin_state, twin_schedule = _plan(rule)
    engine.execute(twin, twin_schedule)
    assert _bits(theta, state["m"], state["v"]) == _bits(
        twin_theta, twin_state["m"], twin_state["v"]
    )
    assert _schedule_state(plan, schedule) == _schedule_state(twin, twin_schedule)


@pytest.mark.parametrize("rule", RULES)
def test_a_replaced_gradient_is_the_one_the_update_sees(rule: str) -> None:
    plan, theta, state, schedule = _plan(rule)
    log: list[str] = []
    halve, after = Recorder("halve", log, replace=lambda g: g * 0.5), Recorder("after", log)
    engine.execute(plan, schedule, [halve, after])
    assert after.seen[0][0].equal(plan.updates[0].grad * 0.5)  # the chain passes them on
    twin, twin_theta, twin_state, twin_schedule = _plan(rule)
    halved = engine.Update(twin_theta, twin.updates[0].grad * 0.5, twin_state, "theta")
    again = engine.prepare([halved], twin.hyper, twin.options, accumulators=twin.accumulators)
    engine.execute(again, twin_schedule)
    assert _bits(theta, state["m"], state["v"]) == _bits(
        twin_theta, twin_state["m"], twin_state["v"]
    )


@pytest.mark.parametrize("rule", RULES)
def test_none_means_no_update_but_the_call_is_counted(rule: str) -> None:
    plan, theta, state, schedule = _plan(rule)
    before = _bits(theta, state["m"], state["v"])
    schedule_before = _schedule_state(plan, schedule)
    log: list[str] = []
    transforms = [Recorder("a", log, stop=True), Recorder("b", log)]
    engine.execute(plan, schedule, transforms)
    assert log == ["a.gradients", "a.after_update(False)", "b.after_update(False)"]
    assert _bits(theta, state["m"], state["v"]) == before
    assert _schedule_state(plan, schedule) != schedule_before  # advanced once


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda g: g[:3], ValueError),  # another shape
        (lambda g: g.double(), TypeError),  # another dtype
    ],
    ids=["shape", "dtype"],
)
@pytest.mark.parametrize("rule", RULES)
def test_a_bad_replaced_gradient_raises_before_any_write(rule: str, bad: Any, error: type) -> None:
    plan, theta, state, schedule = _plan(rule)
    before = _bits(theta, state["m"], state["v"])
    schedule_before = _schedule_state(plan, schedule)
    log: list[str] = []
    with pytest.raises(error, match="theta"):
        engine.execute(plan, schedule, [Recorder("bad", log, replace=bad), Recorder("b", log)])
    assert log == ["bad.gradients", "b.gradients"]  # no hook that writes ran
    assert _bits(theta, state["m"], state["v"]) == before
    assert _schedule_state(plan, schedule) == schedule_before


@pytest.mark.parametrize("rule", RULES)
def test_an_interrupt_inside_a_hook_waits_for_the_whole_step(rule: str) -> None:
    plan, theta, state, schedule = _plan(rule)
    log: list[str] = []
    transforms = [Recorder("a", log, on_before=_thread.interrupt_main), Recorder("b", log)]
    twin, twin_theta, twin_state, twin_schedule = _plan(rule)
    engine.execute(twin, twin_schedule)
    with pytest.raises(KeyboardInterrupt):
        engine.execute(plan, schedule, transforms)
    assert log[-1] == "b.after_update(True)"
    assert _bits(theta, state["m"], state["v"]) == _bits(
        twin_theta, twin_state["m"], twin_state["v"]
    )
    assert _schedule_state(plan, schedule) == _schedule_state(twin, twin_schedule)
