"""``tfadam.layouts.Layouts``: what a reused plan trusts about its variables, slots and gradients.

One row per change a tensor can undergo between two steps. ``hold`` must
refuse (None) every change the plan cannot absorb (a reused plan would walk
the tensor with stale sizes, strides or dtype, or write where it no longer
is), and may accept (the addresses) only where the tensor is laid out, and
for fixed tensors placed, exactly as recorded. ``engine.reuse`` then
re-prepares (tests/test_plan_reuse.py proves the step the same either way).
Both ways of reading layouts run every row: the C++ recorder of
``kernels.addresses``, and torch's ``TensorGuards`` where it is not built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tfadam.kernels import addresses
from tfadam.layouts import Layouts


@pytest.fixture(params=["C++ recorder", "TensorGuards"], autouse=True)
def _way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "TensorGuards":
        monkeypatch.setattr(addresses, "recorder", lambda **kwargs: None)
    elif (
        addresses.recorder(wait=True) is None
    ):  # tests/test_addresses.py fails where it should build
        pytest.skip(addresses.status())


@dataclass(frozen=True)
class Row:
    id: str
    given: Callable[[list[torch.Tensor]], list[object]]
    holds: bool


def _at(i: int, make: Callable[[torch.Tensor], object]) -> Callable[[list[torch.Tensor]], list]:
    return lambda ts: [make(t) if k == i else t for k, t in enumerate(ts)]


class _Sub(torch.Tensor):
    pass


def _in_place(change: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(t: torch.Tensor) -> torch.Tensor:
        change(t)
        return t

    return make


ROWS = [
    Row("the same tensors", lambda ts: ts, True),
    Row("another dtype", _at(1, lambda t: t.double()), False),
    Row("another shape, same numel", _at(1, lambda t: t.reshape(-1)), False),
    Row("transposed (strides)", _at(1, lambda t: t.t().contiguous().t()), False),
    Row("narrowed in place (.data =)", _at(0, _in_place(lambda t: setattr(t, "data", t.data[:2]))), False),
    Row("resized in place", _at(2, _in_place(lambda t: t.resize_(7))), False),
    Row("on the meta device", _at(0, lambda t: t.to("meta")), False),
    Row("sparse", _at(0, lambda t: t.to_sparse()), False),
    Row("a subclass", _at(2, lambda t: t.as_subclass(_Sub)), False),
    Row("a Parameter for a tensor", _at(2, lambda t: torch.nn.Parameter(t.clone())), False),
    Row("requires grad", _at(0, lambda t: t.clone().requires_grad_()), False),
    # (what z.conj().imag is, with the strides kept: its values read negated)
    Row("negative bit", _at(2, lambda t: torch._neg_view(t)), False),
    Row("None", _at(1, lambda t: None), False),
    Row("not a tensor", _at(1, lambda t: t.numpy()), False),
    Row("efficient zero tensor", _at(0, lambda t: torch._efficientzerotensor(5)), False),
    Row("moved (.data =)", _at(2, _in_place(lambda t: setattr(t, "data", t.data.clone()))), False),
    Row("moved to shared memory", _at(1, _in_place(lambda t: t.share_memory_())), False),
    Row("one fewer", lambda ts: ts[:2], False),
    Row("one more", lambda ts: [*ts, ts[0].clone()], False),
]  # fmt: skip


def _tensors() -> list[torch.Tensor]:
    return [torch.zeros(5), torch.zeros(3, 4), torch.zeros(6)]


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "movable"])
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_layouts_hold_only_where_nothing_changed(row: Row, fixed: bool) -> None:
    original = _tensors()
    layouts = Layouts.of(original, fixed=fixed)
    assert layouts is not None  # every supported torch has TensorGuards
    given = row.given(original)
    moved = row.id.startswith("moved")  # (only a fixed layout refuses it)
    held = layouts.hold(given)  # type: ignore[arg-type]
    if row.holds or (moved and not fixed):
        assert held is not None and list(held) == [t.data_ptr() for t in given]  # type: ignore[union-attr]
    else:
        assert held is None


def test_new_tensors_of_the_same_layouts_hold_only_where_movable() -> None:
    fixed, movable = Layouts.of(_tensors(), fixed=True), Layouts.of(_tensors(), fixed=False)
    assert fixed is not None and movable is not None
    others = _tensors()
    assert fixed.hold(others) is None
    assert list(movable.hold(others)) == [t.data_ptr() for t in others]  # type: ignore[arg-type]


def test_layouts_keep_no_tensor_alive() -> None:
    import gc
    import weakref

    tensors = _tensors()
    layouts = Layouts.of(tensors, fixed=False)
    assert layouts is not None
    refs = [weakref.ref(t) for t in tensors]
    del tensors
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert layouts.hold(_tensors()) is not None


def test_fixed_layouts_refuse_one_tensor_given_twice() -> None:
    tensors = _tensors()
    layouts = Layouts.of(tensors, fixed=True)
    assert layouts is not None
    assert layouts.hold([tensors[0], tensors[0], tensors[2]]) is None


def test_a_tensor_made_a_non_leaf_in_place_does_not_hold() -> None:
    # (its type, keys, requires_grad, shape and address kept: prepare refuses a
    # non-leaf variable, as an update in place would not reach the one it came from)
    tensors = [torch.nn.Parameter(torch.zeros(5)), torch.zeros(3)]
    layouts = Layouts.of(tensors, fixed=True)
    assert layouts is not None and layouts.hold(tensors) is not None
    tensors[0].detach_()
    tensors[0].mul_(torch.ones(5, requires_grad=True))
    assert tensors[0].requires_grad and not tensors[0].is_leaf
    assert layouts.hold(tensors) is None


def test_a_view_whose_base_changed_in_place_is_a_leaf_no_more() -> None:
    # (p, a leaf view that requires grad of a base that did not; once the base
    # requires grad and changes in place, Python's is_leaf makes p's grad_fn
    # anew and says False: prepare refuses p, so must a reused plan)
    base = torch.zeros(10)
    p = base[:5].requires_grad_()
    layouts = Layouts.of([p], fixed=True)
    assert layouts is not None and layouts.hold([p]) is not None
    base.requires_grad_()
    with torch.no_grad():
        base.add_(1)
    assert layouts.hold([p]) is None  # (before anything asks p.is_leaf)
    assert not p.is_leaf
