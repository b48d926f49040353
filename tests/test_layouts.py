"""``tfadam.layouts.Layouts``: what a reused plan trusts about its variables and gradients.

One row per change a tensor can undergo between two steps. ``hold`` must say
False for every change the plan cannot absorb (a reused plan would walk the
tensor with stale sizes, strides or dtype), and may say True only where the
tensor is laid out exactly as recorded. ``engine.reuse`` then re-prepares
(tests/test_plan_reuse.py proves the step the same either way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tfadam.layouts import Layouts


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
    Row("new tensors of the same layouts", lambda ts: [t.detach().clone() for t in ts], True),
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
    Row("one tensor twice", lambda ts: [ts[0], ts[0], ts[2]], False),
    Row("one fewer", lambda ts: ts[:2], False),
    Row("one more", lambda ts: [*ts, ts[0].clone()], False),
]  # fmt: skip


def _tensors() -> list[torch.Tensor]:
    return [torch.zeros(5), torch.zeros(3, 4), torch.zeros(6)]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_layouts_hold_only_where_nothing_changed(row: Row) -> None:
    original = _tensors()
    layouts = Layouts.of(original)
    assert layouts is not None  # every supported torch has TensorGuards
    assert layouts.hold(row.given(original)) is row.holds


def test_layouts_keep_no_tensor_alive() -> None:
    import gc
    import weakref

    tensors = _tensors()
    layouts = Layouts.of(tensors)
    assert layouts is not None
    refs = [weakref.ref(t) for t in tensors]
    del tensors
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
    assert layouts.hold(_tensors())
