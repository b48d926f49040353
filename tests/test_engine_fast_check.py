"""engine._plainly_valid (the per-tensor fast check) never passes what the full check would not."""

from __future__ import annotations

import itertools

import torch

from tfadam import engine


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
        }[kind]

    params = ["ok", "non_leaf", "expanded", "int", "inference"]
    grads = ["ok", "f64", "shape", "requires_grad", "sparse", "none", "list"]
    states = ["empty", "ok", "shape", "dtype", "not_tensor"]
    return [
        engine.Update(param(p), grad(g), state(s), f"{p}/{g}/{s}")  # type: ignore[arg-type]
        for p, g, s in itertools.product(params, grads, states)
    ]


def test_fast_check_implies_full_check_passes_unchanged() -> None:
    options = engine.Options()
    passed = 0
    for update in variants():
        if engine._plainly_valid(update):
            passed += 1
            assert engine._checked_in_full(update, options) is update, update.name
    assert passed == 2  # ok/ok/empty and ok/ok/ok: the fast check does take the common case
