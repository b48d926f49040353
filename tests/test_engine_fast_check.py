"""engine._plainly_valid (the per-tensor fast check) never passes what guard.checked_gradient
would not."""

from __future__ import annotations

import itertools

import torch

from tfadam import engine, guard


def variants() -> list[engine.Update]:
    def param(kind: str) -> torch.Tensor:
        if kind == "ok":
            return torch.nn.Parameter(torch.zeros(4, 3))
        if kind == "non_leaf":
            return torch.zeros(4, 3, requires_grad=True) * 2
        if kind == "expanded":
            return torch.zeros(1, 3).expand(4, 3)
        if kind == "int":
            return torch.zeros(4, 3, dtype=torch.int32)
        if kind == "meta":
            return torch.nn.Parameter(torch.zeros(4, 3, device="meta"))
        with torch.inference_mode():
            return torch.zeros(4, 3)  # "inference"

    def grad(kind: str) -> object:
        return {
            "ok": torch.ones(4, 3),
            "f64": torch.ones(4, 3, dtype=torch.float64),
            "shape": torch.ones(3, 4),
            "requires_grad": torch.ones(4, 3, requires_grad=True),
            "sparse": torch.ones(4, 3).to_sparse(),
            "none": None,
            "list": [1.0],
        }[kind]

    def state(kind: str) -> dict[str, object]:
        return {
            "empty": {},
            "ok": {"m": torch.zeros(4, 3), "v": torch.zeros(4, 3)},
            "shape": {"m": torch.zeros(12), "v": torch.zeros(4, 3)},
            "dtype": {"m": torch.zeros(4, 3, dtype=torch.float64), "v": torch.zeros(4, 3)},
            "not_tensor": {"m": 0.0, "v": torch.zeros(4, 3)},
            "partial": {"m": torch.zeros(4, 3)},
            "expanded": {"m": torch.zeros(1, 3).expand(4, 3), "v": torch.zeros(4, 3)},
        }[kind]

    params = ["ok", "non_leaf", "expanded", "int", "inference", "meta"]
    grads = ["ok", "f64", "shape", "requires_grad", "sparse", "none", "list"]
    states = ["empty", "ok", "shape", "dtype", "not_tensor", "partial", "expanded"]
    return [
        engine.Update(param(p), grad(g), state(s), f"{p}/{g}/{s}")  # type: ignore[arg-type]
        for p, g, s in itertools.product(params, grads, states)
    ]


def _full_check(u: engine.Update, options: engine.Options) -> object:
    return guard.checked_gradient(u.param, u.grad, u.state, u.name, options)


def test_fast_check_implies_full_check_passes_unchanged() -> None:
    options = engine.Options()
    passed = 0
    for update in variants():
        if engine._plainly_valid(update, options):
            passed += 1
            assert _full_check(update, options) is update.grad, update.name
    assert passed == 2  # ok/ok/empty and ok/ok/ok: the fast check does take the common case


def test_column_check_implies_full_check_passes_unchanged() -> None:
    """engine._uniformly_plain (all updates at once) passes nothing the full check would not."""
    options = engine.Options()
    singles = variants()
    ok = next(u for u in singles if engine._plainly_valid(u, options) and u.state)
    fresh = next(u for u in singles if engine._plainly_valid(u, options) and not u.state)
    meta = [
        engine.Update(torch.nn.Parameter(torch.zeros(4, 3)), g, s, "meta")  # type: ignore[arg-type]
        for g, s in (
            (torch.ones(4, 3, device="meta"), {}),
            (torch.ones(4, 3), {"m": torch.zeros(4, 3, device="meta"), "v": torch.zeros(4, 3)}),
        )
    ]
    f64 = engine.Update(torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64)),
                        torch.ones(4, 3, dtype=torch.float64), {}, "f64")  # fmt: skip
    extra = engine.Update(ok.param, ok.grad, {**ok.state, "step": torch.zeros(())}, "extra")
    taken = 0
    for update in [*singles, *meta, f64, extra]:
        for batch in ([update], [ok, update], [update, ok], [fresh, update]):
            common = engine._uniformly_plain(batch, options)
            if common is None:
                continue
            taken += 1
            for u in batch:
                assert _full_check(u, options) is u.grad, u.name
            key = (batch[0].param.device, batch[0].param.dtype)
            assert all((u.param.device, u.param.dtype) == key for u in batch)
            assert common == (key, all(set(u.state) == {"m", "v"} for u in batch))
    # it does take the common cases: alone, with its like, slots complete or not
    assert engine._uniformly_plain([ok, ok], options) == ((ok.param.device, torch.float32), True)
    assert engine._uniformly_plain([fresh, fresh], options) == (
        (ok.param.device, torch.float32),
        False,
    )
    assert engine._uniformly_plain([ok, fresh], options) is None  # some slots missing: one by one
    assert taken >= 4
