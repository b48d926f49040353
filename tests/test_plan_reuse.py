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

import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from tests.reliab_support import bits, differences, torch_face_tensors

import tfadam
from tfadam import engine
from tfadam.kernels import addresses


@pytest.fixture(params=["C++ addresses", "Python addresses"], autouse=True)
def _address_reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs on both ways of reading tensors' addresses and layouts (layouts.py)."""
    if request.param == "Python addresses":  # (and torch's TensorGuards for the layouts)
        monkeypatch.setattr(addresses, "reader", lambda **kwargs: None)
        monkeypatch.setattr(addresses, "recorder", lambda **kwargs: None)
    elif addresses.reader(wait=True) is None:  # tests/test_addresses.py fails where it should build
        pytest.skip(addresses.status())


@dataclass(frozen=True)
class Row:
    id: str
    change: Callable[[tfadam.Adam, dict[str, torch.Tensor]], None]
    reused: bool  # whether group 0's plan is reused after the change
    error: type[BaseException] | None = None
    fragment: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # tfadam.Adam's, for both groups


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


def _in_slot(name: str, slot: str, edit: Callable[[torch.Tensor], Any]) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            edit(opt.state[p[name]][slot])

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


def _share_accumulator_memory(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    opt.param_groups[1]["beta1_power"].data = opt.param_groups[0]["beta1_power"].data


def _accumulator_onto_gradient(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    power = p["d"].grad.detach()[2:3].view(()).fill_(0.5)  # type: ignore[union-attr]
    opt.param_groups[0]["beta2_power"].data = power


def _made_a_non_leaf(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    """a's values kept, but now computed from another tensor: a non-leaf that still requires grad."""
    p["a"].detach_()  # (a leaf that does not require grad, at its address)
    p["a"].mul_(torch.ones(5, requires_grad=True))  # (requires grad again, with a grad_fn)


def _inference_copy(t: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return t.clone()


def _then_step(*changes: Callable[..., None]) -> Callable[..., None]:
    """The changes, a step (on the plans they leave), and the next step's gradients."""

    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        for made in changes:
            made(opt, p)
        opt.step()
        _gradients(p, 4)

    return change


def _retype(dtype: torch.dtype, names: str) -> Callable[..., None]:
    """Variables, gradients and slots of ``names`` converted to ``dtype``."""

    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        for name in names:
            p[name].data = p[name].data.to(dtype)
            p[name].grad = p[name].grad.to(dtype)  # type: ignore[union-attr]
            state = opt.state[p[name]]
            for slot in list(state):
                state[slot] = state[slot].to(dtype)

    return change


def _amsgrad_with_slots(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    opt.param_groups[0]["amsgrad"] = True
    for param in opt.param_groups[0]["params"]:
        opt.state[param]["vhat"] = opt.state[param]["v"].clone()


def _nan(name: str, *where: int, value: float = float("nan")) -> Callable[..., None]:
    def change(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
        p[name].grad[where] = value  # type: ignore[index]

    return change


def _refused_then_cleared(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    _nan("b", 1, 2)(opt, p)
    with pytest.raises(tfadam.NonFiniteGradientError):
        opt.step()
    p["b"].grad[1, 2] = 0.25  # type: ignore[index]


def _renamed_then_nan(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    """A step with param_names (its plan names by them), then new names: errors use those."""
    _then_step(_set(0, "param_names", ["x", "y", "z"]))(opt, p)
    opt.param_groups[0]["param_names"] = ["u", "w", "z"]
    _nan("b", 0, 1)(opt, p)


def _without_gradient_then_removed(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    """A step without a's gradient (b and c are then [1] and [2]), then a removed: [0] and [1]."""
    _then_step(_grad("a", lambda o, p: None))(opt, p)
    del opt.param_groups[0]["params"][0]
    _nan("c", 1, 1)(opt, p)


def _slots_reordered_one_read_later(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    state = opt.state[p["c"]]
    state["m"] = state.pop("m")  # (the same tensors, listed v, m)
    p["d"].grad = state["m"].view(-1)[:7]


def _nonfinite_in_place(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():  # (values, not storage: the plan writes through its own aliases)
        p["b"][1, 1] = float("nan")
        opt.state[p["c"]]["v"][0, 3] = float("inf")
        opt.state[p["a"]]["m"][2] = float("nan")


def _empty_variable_inserted(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    empty = torch.nn.Parameter(torch.empty(0))
    empty.grad = torch.empty(0)
    opt.param_groups[0]["params"].insert(1, empty)


def _accumulated_in_place(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    grads = {k: v.grad.clone() for k, v in p.items()}  # type: ignore[union-attr]
    opt.zero_grad(set_to_none=False)
    for name, param in p.items():
        param.grad.add_(grads[name]).mul_(0.5)  # type: ignore[union-attr]


def _grads_viewing_one_tensor(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    flat = torch.cat([param.grad.reshape(-1) for param in p.values()])  # type: ignore[union-attr]
    offset = 0
    for param in p.values():
        param.grad = flat[offset : offset + param.numel()].view(param.shape)
        offset += param.numel()


def _first_group_without_gradients(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    for name in "abc":
        p[name].grad = None


def _first_group_removed(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    del opt.param_groups[0]


def _group_added(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    extra = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    extra.grad = torch.linspace(0.5, -0.5, 6)
    opt.add_param_group({"params": [extra], "lr": 0.02})


def _moved_to_the_other_group(opt: tfadam.Adam, p: dict[str, torch.Tensor]) -> None:
    del opt.param_groups[0]["params"][2]  # (list.remove compares tensors with ==)
    opt.param_groups[1]["params"].append(p["c"])


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
    Row("slot moved in place (.data =)", _in_slot("a", "m", lambda m: setattr(m, "data", m.data.clone())), reused=False),
    Row("slot moved in place (.set_)", _in_slot("b", "v", lambda v: v.set_(v.clone())), reused=False),
    Row("slot moved to shared memory", _in_slot("c", "m", lambda m: m.share_memory_()), reused=False),
    Row("variable moved to shared memory", lambda o, p: p["b"].share_memory_(), reused=False),
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
    Row("gradient requires grad", _grad("a", lambda o, p: p["a"].grad.clone().requires_grad_()), reused=False),
    Row("gradient a negated view (z.conj().imag)", _grad("a", lambda o, p: torch._neg_view(-p["a"].grad)), reused=False),
    Row("gradient sparse", _grad("a", lambda o, p: p["a"].grad.to_sparse()), reused=False),
    Row("gradient an efficient zero tensor (no memory)", _grad("b", lambda o, p: torch._efficientzerotensor(4, 4)), reused=False),
    Row("accumulator replaced", _set(0, "beta1_power", lambda o, p: o.param_groups[0]["beta1_power"].clone()), reused=False),
    Row("accumulator NaN in place", _nan_power, False, ValueError, "beta1_power"),
    Row("accumulator an efficient zero tensor", _set(0, "beta1_power", lambda o, p: torch._efficientzerotensor(())), False, ValueError, "efficient zero tensor"),
    Row("accumulator shared by two groups", _set(1, "beta1_power", lambda o, p: o.param_groups[0]["beta1_power"]), True, ValueError, "shares memory"),
    Row("variable appended to a group", _append_param, reused=False),
    Row("state_dict reloaded", _reload, reused=False),
    # Found by the adversarial pass: each was stepped by the reused plan.
    Row("variable reshaped at its address (.data = view)", _data("b", lambda o, p: p["b"].data.view(2, 8)), False, ValueError, "shape"),
    Row("variable narrowed at its address (.data = [:3])", _data("a", lambda o, p: p["a"].data[:3]), False, ValueError, "shape"),
    Row("accumulators of two groups share memory (.data =)", _share_accumulator_memory, True, ValueError, "shares memory"),
    Row("accumulator moved onto a gradient (.data =)", _accumulator_onto_gradient, False, ValueError, "shares memory"),
    Row("param_names replaced, NaN gradient", _renamed_then_nan, False, tfadam.NonFiniteGradientError, "('w')", {"nonfinite": "raise"}),
    Row("a variable without gradient for a step, then removed", _without_gradient_then_removed, False, tfadam.NonFiniteGradientError, "['params'][1] has", {"nonfinite": "raise"}),
    Row("slots reordered, one a later group's gradient", _slots_reordered_one_read_later, True, ValueError, "slot 'm' of param_groups[0]['params'][2]"),
    Row("slot transposed at its address (.data = .t())", _in_slot("b", "v", lambda v: setattr(v, "data", v.data.t())), reused=False),
    Row("slot narrowed at its address (.data = [:3])", _in_slot("a", "m", lambda m: setattr(m, "data", m.data[:3])), False, ValueError, "shape"),
    Row("slot reshaped at its address (.data = view)", _in_slot("b", "m", lambda m: setattr(m, "data", m.data.view(2, 8))), False, ValueError, "shape"),
    Row("slot an int32 view at its address (.data =)", _in_slot("a", "m", lambda m: setattr(m, "data", m.data.view(torch.int32))), False, ValueError, "int32"),
    Row("slot a negated view at its address (.data =)", _in_slot("a", "v", lambda v: setattr(v, "data", torch._neg_view(v.data))), False, ValueError, "negated"),
    Row("slot narrowed at its address (set_)", _in_slot("a", "m", lambda m: m.set_(m.untyped_storage(), 0, (3,), (1,))), False, ValueError, "shape"),
    Row("variable made a non-leaf in place (detach_, mul_)", _made_a_non_leaf, False, ValueError, "not a leaf"),
    Row("gradient a functional tensor (no memory)", _grad("c", lambda o, p: torch._to_functional_tensor(p["c"].grad)), False, ValueError, "no memory of its own"),
    # Checked and found equal.
    Row("variable requires grad no more", lambda o, p: p["a"].requires_grad_(False), reused=False),
    Row("gradient an inference tensor", _grad("b", lambda o, p: _inference_copy(p["b"].grad)), reused=False),
    Row("gradient a Parameter", _grad("a", lambda o, p: torch.nn.Parameter(p["a"].grad.clone(), requires_grad=False)), reused=False),
    Row("gradient from NumPy", _grad("c", lambda o, p: torch.from_numpy(p["c"].grad.numpy().copy())), reused=True),
    Row("gradient moved to shared memory", lambda o, p: p["b"].grad.share_memory_(), reused=True),
    Row("NaN and Inf in a variable and slots (in place)", _nonfinite_in_place, reused=True),
    Row("an empty variable inserted, two steps", _then_step(_then_step(_empty_variable_inserted)), reused=True),
    Row("a gradient None for a step, then back", _then_step(_grad("a", lambda o, p: None)), reused=False),
    Row("NaN and Inf gradients", lambda o, p: (_nan("b", 1, 2)(o, p), _nan("c", 0, 0, value=float("-inf"))(o, p)), reused=True),
    Row("NaN gradient, nonfinite='raise'", _nan("c", 2, 5), True, tfadam.NonFiniteGradientError, "['params'][2]", {"nonfinite": "raise"}),
    Row("a step refused (NaN), then the NaN cleared", _refused_then_cleared, True, options={"nonfinite": "raise"}),
    Row("zero_grad(set_to_none=False), accumulated in place", _accumulated_in_place, reused=True),
    Row("gradients views of one tensor", _grads_viewing_one_tensor, reused=True),
    Row("first group's gradients all None", _first_group_without_gradients, reused=False),
    Row("first group removed", _first_group_removed, reused=False),
    Row("group added", _group_added, reused=True),
    Row("variable moved to the other group", _moved_to_the_other_group, reused=False),
    Row("amsgrad on, with slots, a step", _then_step(_amsgrad_with_slots), reused=True),
    Row("group float64, a step", _then_step(_retype(torch.float64, "abc")), reused=True),
    Row("group float16, a step", _then_step(_retype(torch.float16, "abc")), reused=True),
    Row("group bfloat16, a step", _then_step(_retype(torch.bfloat16, "abc")), reused=True),
    Row("dtypes mixed in a group, a step", _then_step(_retype(torch.float64, "a")), reused=False),
]  # fmt: skip


def _model(seed: int, **options: Any) -> tuple[tfadam.Adam, dict[str, torch.Tensor]]:
    """Two groups: a 1-d, a square and a 3 x 6 variable, and a 1-d one alone."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a": (5,), "b": (4, 4), "c": (3, 6), "d": (7,)}
    p = {k: torch.nn.Parameter(torch.randn(s, generator=g)) for k, s in shapes.items()}
    groups = [{"params": [p["a"], p["b"], p["c"]]}, {"params": [p["d"]], "lr": 0.01}]
    return tfadam.Adam(groups, **options), p


def _gradients(p: dict[str, torch.Tensor], step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for param in p.values():
        param.grad = torch.randn(param.shape, generator=g).to(param.dtype)


def _ready(seed: int, **options: Any) -> tuple[tfadam.Adam, dict[str, torch.Tensor]]:
    """Three steps taken (the third on a reused plan), the fourth's gradients set."""
    opt, p = _model(seed, **options)
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
    shipped, p1 = _ready(7, **row.options)
    fresh, p2 = _ready(7, **row.options)
    row.change(shipped, p1)
    row.change(fresh, p2)
    # (after the change: a snapshot's NumPy views make a storage unresizable)
    assert torch_face_tensors(shipped) == torch_face_tensors(fresh)
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
    # The change re-prepares both groups (group 0's without asking: another
    # variable lacks a gradient; group 1's plan was checked against group 0's
    # old one); the next step keeps the new plans; then reuse.
    assert seen == [[False], [], [True, True], [True, True]]


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


def test_a_reused_plan_keeps_no_gradient_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    opt, p = _ready(3)
    assert _step(opt, monkeypatch, reuse=True) == [True, True]
    grads = [weakref.ref(param.grad) for param in p.values()]  # type: ignore[arg-type]
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert [grad() for grad in grads] == [None] * len(grads)


@pytest.mark.parametrize("reuse", [True, False], ids=["shipped", "prepared"])
def test_a_variable_moved_mid_step_leaves_freed_memory_alone(
    reuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A callable lr of a later group runs after an earlier group's plan was made.

    Here it moves a variable of that group (``.data =``), freeing the memory
    the plan checked, and allocates tensors of its size, which may land there:
    the step must write only memory that is still the plan's.
    """
    g = torch.Generator().manual_seed(11)
    a, d = (torch.nn.Parameter(torch.randn(n, generator=g)) for n in (1024, 7))
    opt = tfadam.Adam([{"params": [a]}, {"params": [d]}])
    for _ in range(3):  # (the third on a reused plan)
        a.grad, d.grad = torch.randn(1024, generator=g), torch.randn(7, generator=g)
        opt.step()
    taken: list[torch.Tensor] = []

    def lr() -> float:
        a.data = a.data.clone()
        taken.extend(torch.zeros(a.shape) for _ in range(16))
        return 0.01

    opt.param_groups[1]["lr"] = lr
    _step(opt, monkeypatch, reuse=reuse)
    assert sum(int(t.count_nonzero()) for t in taken) == 0


# A reused plan's kernel batch writes the slots' memory at the addresses it
# gathered; nothing re-reads them. That memory must never be freed under it.
RESIZES = {
    "resize_ that grows the slot": lambda m: m.resize_(4096),
    "resize_ of the slot's storage": lambda m: m.untyped_storage().resize_(1 << 16),
}


@pytest.mark.parametrize("resize", list(RESIZES.values()), ids=list(RESIZES))
def test_a_kept_slots_memory_cannot_be_reallocated(
    resize: Callable[[torch.Tensor], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    opt, p = _ready(9)
    m = opt.state[p["a"]]["m"]
    storage = m.untyped_storage()
    where, size = storage.data_ptr(), storage.nbytes()
    with torch.no_grad(), pytest.raises(RuntimeError, match="not resizable"):
        resize(m)
    # (torch's resize_ sets the new sizes before it fails: m's shape is then
    # wrong, but its memory is where the batch writes, and as large)
    assert (storage.data_ptr(), storage.nbytes()) == (where, size)
    if m.shape == p["a"].shape:
        _step(opt, monkeypatch, reuse=True)  # (writes that memory, still allocated)
        return
    # (m's own bytes are its 5 floats: reading 4096 would read past them)
    before = [storage.tolist(), *(bits(t) for t in p.values())]
    with pytest.raises(ValueError, match=r"slot 'm' has shape \(4096,\)"):
        _step(opt, monkeypatch, reuse=True)  # the wrong shape is seen, as prepare sees it
    assert [storage.tolist(), *(bits(t) for t in p.values())] == before


@pytest.mark.parametrize("reuse", [True, False], ids=["shipped", "prepared"])
def test_a_variable_view_made_a_non_leaf_by_its_base_is_refused(
    reuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable that is a leaf view (of a base that does not require grad)
    stops being a leaf when its base comes to require grad and changes in
    place: Python's ``is_leaf`` makes its ``grad_fn`` anew. Its type, keys,
    ``requires_grad``, shape and address are as they were."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(12, generator=g)
    w = base[:5].requires_grad_()
    opt = tfadam.Adam([w])
    for _ in range(3):  # (the third on a reused plan)
        w.grad = torch.randn(5, generator=g)
        opt.step()
    w.grad = torch.randn(5, generator=g)
    base.requires_grad_()
    with torch.no_grad():
        base[6:].add_(1)
    before = torch_face_tensors(opt)
    with pytest.raises(ValueError, match="not a leaf"):
        _step(opt, monkeypatch, reuse=reuse)
    assert differences(before, torch_face_tensors(opt)) == []
