"""A reused plan (``engine.reuse``) is exactly the plan ``engine.prepare`` would make.

Between two steps of a training loop ``tfadam.Adam`` reuses the last step's
plan when nothing structural changed, re-checking only what can change
cheaply (docs/architecture.md, "Reusing a plan"). One row per change made
between steps: the step is taken twice from identical states, once as
shipped and once with reuse switched off (every group prepared afresh), and
the two must agree bit for bit on every parameter, gradient, slot and
accumulator, or raise the same error with nothing modified. The ``reused``
column says whether the shipped step reused the plan of the changed group:
a change that must be seen is never papered over by a stale plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tests.reliab_support import differences, torch_face_tensors

import tfadam
from tfadam import engine


@dataclass(frozen=True)
class Row:
    id: str
    change: Callable[[tfadam.Adam, dict[str, torch.Tensor]], None]
    reused: bool  # whether group 0's plan is reused after the change
    error: type[BaseException] | None = None
    fragment: str = ""


def _set(group: int, key: str, value: Any) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        opt.param_groups[group][key] = value(opt, p) if callable(value) else value

    return change


def _slot(name: str, slot: str, value: Callable[..., Any]) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        opt.state[p[name]][slot] = value(opt, p)

    return change


def _data(name: str, value: Callable[..., torch.Tensor]) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        p[name].data = value(opt, p)

    return change


def _grad(name: str, value: Callable[..., Any]) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        p[name].grad = value(opt, p)

    return change


def _del_slot(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    del opt.state[p["a"]]["v"]


def _append_param(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    extra.grad = torch.linspace(0.5, -0.5, 6)
    opt.param_groups[0]["params"].append(extra)


def _grad_data(name: str, value: Callable[..., torch.Tensor]) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        p[name].grad.data = value(opt, p)  # type: ignore[union-attr]

    return change


def _nan_power(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    opt.param_groups[0]["beta1_power"].fill_(float("nan"))


def _reload(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    opt.load_state_dict(opt.state_dict())


def _share_across_groups(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    p["d"].data = p["b"].data.view(-1)[:7]


ROWS = [
    Row("nothing", lambda opt, p: None, reused=True),
    Row("lr changed (a schedule)", _set(0, "lr", 0.05), reused=True),
    Row("betas changed", _set(0, "betas", (0.8, 0.99)), reused=True),
    Row("eps changed", _set(0, "eps", 1e-3), reused=True),
    Row("nesterov on", _set(0, "nesterov", True), reused=False),
    Row("amsgrad on after steps", _set(0, "amsgrad", True), False, ValueError, "lacks ['vhat']"),
    Row("option of the wrong type", _set(0, "nesterov", "no"), False, TypeError, "nesterov"),
    Row("slot replaced", _slot("a", "m", lambda o, p: torch.zeros(5)), reused=False),
    Row("slot removed", _del_slot, False, ValueError, "lacks ['v']"),
    Row("slot of another shape", _slot("b", "m", lambda o, p: torch.zeros(3)), False, ValueError, "shape"),
    Row("slot is the other slot", _slot("a", "m", lambda o, p: o.state[p["a"]]["v"]), False, ValueError, "shares memory"),
    Row("slot is a variable", _slot("a", "m", lambda o, p: p["a"].detach()), False, ValueError, "shares memory"),
    Row("slot expand()ed", _slot("a", "m", lambda o, p: torch.zeros(1).expand(5)), False, ValueError, "m"),
    Row("variable moved (.data =)", _data("a", lambda o, p: p["a"].data.clone()), reused=False),
    Row("variable transposed (.data =)", _data("b", lambda o, p: p["b"].data.t()), reused=False),
    Row("variable of another shape (.data =)", _data("a", lambda o, p: torch.zeros(3)), False, ValueError, "shape"),
    Row("variable float64 (.data =)", _data("a", lambda o, p: p["a"].data.double()), False, ValueError, "float64"),
    Row("variable shares another's memory", _data("b", lambda o, p: p["c"].data.view(-1)[:16].view(4, 4)), False, ValueError, "shares memory"),
    Row("variables of two groups share memory", _share_across_groups, True, ValueError, "param_groups[0]['params'][1]"),
    Row("gradient None", _grad("a", lambda o, p: None), reused=False),
    Row("gradient not contiguous", _grad("b", lambda o, p: p["b"].grad.t().contiguous().t()), reused=False),
    Row("gradient float64 (.data =)", _grad_data("a", lambda o, p: p["a"].grad.data.double()), False, TypeError, "float64"),
    Row("gradient of another shape (.data =)", _grad_data("b", lambda o, p: torch.ones(2, 8)), False, ValueError, "shape"),
    Row("gradient of another size (.data =)", _grad_data("a", lambda o, p: torch.ones(3)), False, ValueError, "shape"),
    Row("gradient is a variable", _grad("b", lambda o, p: p["c"].detach().view(-1)[:16].view(4, 4)), False, ValueError, "shares memory"),
    # (as prepare: a group's gradients are read before any later group is written)
    Row("gradient is a later group's variable", _grad("a", lambda o, p: p["d"].detach()[:5]), reused=True),
    Row("gradient is its slot", _grad("a", lambda o, p: o.state[p["a"]]["m"]), False, ValueError, "shares memory"),
    Row("gradient is another group's variable", _grad("d", lambda o, p: p["c"].detach().view(-1)[:7]), True, ValueError, "shares memory"),
    Row("gradient requires grad", _grad("a", lambda o, p: p["a"].grad.clone().requires_grad_()), reused=True),
    Row("gradient sparse", _grad("a", lambda o, p: p["a"].grad.to_sparse()), reused=False),
    Row("accumulator replaced", _set(0, "beta1_power", lambda o, p: o.param_groups[0]["beta1_power"].clone()), reused=False),
    Row("accumulator NaN in place", _nan_power, False, ValueError, "beta1_power"),
    Row("accumulator shared by two groups", _set(1, "beta1_power", lambda o, p: o.param_groups[0]["beta1_power"]), True, ValueError, "shares memory"),
    Row("variable appended to a group", _append_param, reused=False),
    Row("state_dict reloaded", _reload, reused=False),
]  # fmt: skip


def _model(seed: int) -> tuple[tfadam.Adam, dict[str, torch.Tensor]]:
    """Two groups: a 1-d, a square and a 3 x 6 variable, and a 1-d one alone."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (5,), "b": (4, 4), "c": (3, 6), "d": (7,)}
    p = {k: torch.nn.Parameter(torch.randn(s, generator=g)) for k, s in shapes.items()}
    opt = tfadam.Adam([{"params": [p["a"], p["b"], p["c"]]}, {"params": [p["d"]], "lr": 0.01}])
    return opt, p


def _gradients(p: dict[str, torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for param in p.values():
        param.grad = torch.randn(param.shape, generator=g)


def _ready(seed: int) -> tuple[tfadam.Adam, dict[str, torch.Tensor]]:
    """Three steps taken (the third on a reused plan), the fourth's gradients set."""
    opt, p = _model(seed)
    for step in range(3):
        _gradients(p, step)
        opt.step()
    _gradients(p, 3)
    return opt, p


def _step(opt: tfadam.Adam, monkeypatch: pytest.MonkeyPatch, *, reuse: bool) -> list[bool]:
    """One step; which groups' plans were reused (or, with reuse off, never)."""
    reused: list[bool] = []
    original = engine.reuse

    def spy(*args: Any, **kwargs: Any) -> engine.Plan | None:
        plan = original(*args, **kwargs) if reuse else None
        reused.append(plan is not None)
        return plan

    with monkeypatch.context() as m:
        m.setattr(engine, "reuse", spy)
        opt.step()
    return reused


def test_reuse_is_taken_in_a_steady_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    opt, p = _ready(0)
    assert _step(opt, monkeypatch, reuse=True) == [True, True]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_reused_step_is_the_prepared_step(row: Row, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped, p1 = _ready(7)
    fresh, p2 = _ready(7)
    assert torch_face_tensors(shipped) == torch_face_tensors(fresh)
    row.change(shipped, p1)
    row.change(fresh, p2)
    if row.error is None:
        reused = _step(shipped, monkeypatch, reuse=True)
        _step(fresh, monkeypatch, reuse=False)
        assert differences(torch_face_tensors(shipped), torch_face_tensors(fresh)) == []
        assert bool(reused and reused[0]) == row.reused, reused
        return
    before = torch_face_tensors(shipped)
    reused = []
    with pytest.raises(row.error, match=None) as raised:
        reused = _step(shipped, monkeypatch, reuse=True)
    assert row.fragment in str(raised.value)
    assert differences(before, torch_face_tensors(shipped)) == []
    with pytest.raises(row.error) as raised_fresh:
        _step(fresh, monkeypatch, reuse=False)
    assert str(raised_fresh.value) == str(raised.value)


def test_frozen_parameters_do_not_stop_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    opt, p = _ready(3)
    seen = []
    for step in range(4, 8):
        _gradients(p, step)
        p["b"].grad = None  # b frozen from here on
        seen.append(_step(opt, monkeypatch, reuse=True))
    # The change re-prepares both groups (group 1's plan was checked against
    # group 0's old one); the next step keeps the new plans; then reuse.
    assert seen == [[False, False], [], [True, True], [True, True]]


def test_a_loop_that_changes_every_step_builds_nothing_for_reuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[list[torch.Tensor]] = []  # the variables of each plan asked to keep
    original = engine.Steady.of

    def spy(updates: Any, *args: Any, **kwargs: Any) -> engine.Steady | None:
        asked.append([u.param for u in updates])
        return original(updates, *args, **kwargs)

    monkeypatch.setattr(engine.Steady, "of", spy)
    opt, p = _model(5)
    for step in range(6):
        _gradients(p, step)
        p["a" if step % 2 else "c"].grad = None  # another variable each step
        opt.step()
    # Group 0 changes every step and is never kept; group 1 (d alone) is
    # asked from its second step on (its first step makes its slots).
    assert len(asked) == 5
    assert all(len(variables) == 1 and variables[0] is p["d"] for variables in asked)
