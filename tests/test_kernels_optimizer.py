"""Whole optimizers on the fast kernels give the bits of the reference path.

The reference path: :mod:`tfadam.kernels.reference` for every update and
:mod:`tfadam.rule` for the per-step scalars, forced by monkeypatching.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from kernel_cases import DTYPES, assert_same_bits, random_tensor

import tfadam
from tfadam import kernels, rule
from tfadam.kernels import cpu, native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def reference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "available", lambda: False)
    monkeypatch.setattr(kernels, "tf1_coefficients", rule.tf1_coefficients)
    monkeypatch.setattr(kernels, "advance_accumulators", rule.advance_accumulators)


def make_model(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for dtype in DTYPES:
        name = str(dtype).split(".")[1]
        params[f"{name}_big"] = random_tensor((5_000,), dtype, generator)
        params[f"{name}_matrix"] = random_tensor((17, 33), dtype, generator)
        params[f"{name}_scalar"] = random_tensor((), dtype, generator)
        params[f"{name}_table"] = random_tensor((300, 8), dtype, generator)
    params["channels_last"] = random_tensor((2, 3, 4, 5), torch.float32, generator).to(
        memory_format=torch.channels_last
    )
    return params


def gradients(params: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    grads = {}
    for name, p in params.items():
        if name.endswith("_table"):
            k = 120
            indices = torch.randint(0, p.shape[0], (k,), generator=generator)
            values = random_tensor((k, *p.shape[1:]), p.dtype, generator, low=-4, high=2)
            grads[name] = torch.sparse_coo_tensor(indices[None], values, tuple(p.shape))
        elif step % 3 == 2 and name.endswith("_scalar"):
            continue  # a None gradient now and then
        else:
            g = random_tensor(tuple(p.shape), p.dtype, generator, low=-6, high=2)
            grads[name] = g.to(memory_format=torch.channels_last) if p.dim() == 4 else g
    return grads


def train(
    options: dict[str, object], steps: int, face: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    params = {k: torch.nn.Parameter(v) for k, v in make_model(0).items()}
    if face == "torch":
        opt = tfadam.Adam(list(params.values()), lr=0.01, **options)  # type: ignore[arg-type]
        for step in range(steps):
            grads = gradients(params, step)
            for name, p in params.items():
                p.grad = grads.get(name)
            opt.step()
        state = {
            name: {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            for name, p in params.items()
        }
    else:
        opt1 = tfadam.AdamOptimizer(learning_rate=0.01, **options)  # type: ignore[arg-type]
        for step in range(steps):
            grads = gradients(params, step)
            opt1.apply_gradients([(grads.get(n), p) for n, p in params.items()])
        state = {
            name: {s: opt1.get_slot(p, s) for s in opt1.get_slot_names()}
            for name, p in params.items()
        }
    return {k: v.detach() for k, v in params.items()}, state


OPTIONS = [
    dict(),
    dict(nesterov=True),
    dict(amsgrad=True),
    dict(sparse="lazy"),
    dict(numerics="graph"),
]


@pytest.mark.parametrize("face", ["torch", "tf1"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_optimizer_fast_equals_reference(
    options: dict[str, object], face: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast_params, fast_state = train(options, steps=3, face=face)
    reference_only(monkeypatch)
    ref_params, ref_state = train(options, steps=3, face=face)
    for name in ref_params:
        assert_same_bits(fast_params[name], ref_params[name], name)
        for slot, tensor in ref_state[name].items():
            if tensor is not None:
                assert_same_bits(fast_state[name][slot], tensor, f"{name}.{slot}")


def test_many_small_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(97, generator=generator)) for _ in range(300)]
        opt = tfadam.Adam(params, lr=0.1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(97, generator=generator)
            opt.step()
        return [p.detach() for p in params]

    fast = run()
    reference_only(monkeypatch)
    for a, e in zip(fast, run(), strict=True):
        assert_same_bits(a, e)


def test_distinct_tensor_subclass_goes_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tensor subclass may have no data pointer of its own: the dispatch
    # must not hand it to the C kernels.
    class Tagged(torch.Tensor):
        pass

    calls: list[int] = []
    real: Callable[..., None] = kernels.reference.dense_step

    def recording(thetas, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(thetas))
        return real(thetas, *args, **kwargs)

    monkeypatch.setattr(kernels.reference, "dense_step", recording)
    theta = torch.ones(5).as_subclass(Tagged)
    c = rule.tf1_coefficients(
        lr=0.1,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-8,
        beta1_power=0.9,
        beta2_power=0.999,
        dtype=torch.float32,
    )
    kernels.dense_step([theta], [torch.ones(5)], [torch.zeros(5)], [torch.zeros(5)], None, c)
    assert calls == [1]
