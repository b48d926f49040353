"""Tensors off the CPU are updated on the CPU, with the CPU's bits.

Until a GPU run proves a CUDA kernel bitwise-equal to the reference, no Adam
arithmetic runs on a GPU: :func:`tfadam.kernels.path_for` sends every device
but the CPU ``"through-cpu"`` (copy, update, copy back). The CPU tests below
prove the dispatch decision and that the copy-update-copy path gives the
reference's bits (driven on CPU tensors by forcing the decision); the GPU
tests prove it on a real CUDA device and are skipped without one.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, assert_same_bits, random_tensor

import tfadam
from tfadam import kernels, rule
from tfadam.kernels import cpu, reference

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: the through-CPU path is proven on CPU tensors above",
)


def coefficients(dtype: torch.dtype) -> rule.Coefficients:
    return rule.tf1_coefficients(
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-8,
        beta1_power=torch.tensor(0.9**3),
        beta2_power=torch.tensor(0.999**3),
        dtype=dtype,
    )


FUSED = "fused-cpu" if cpu.available() else "reference"

# (device, plain tensors?, the path the step takes)
PATHS = [
    ("cpu", True, FUSED),
    ("cpu", False, "reference"),
    ("cuda", True, "through-cpu"),
    ("cuda:1", False, "through-cpu"),
    ("mps", True, "through-cpu"),
    ("xpu", True, "through-cpu"),
    ("meta", True, "reference"),
]


@pytest.mark.parametrize(("device", "plain", "expected"), PATHS)
def test_dispatch_decision(device: str, plain: bool, expected: str) -> None:
    assert kernels.path_for(torch.device(device), plain=plain) == expected


def dense_case(dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
    """θ, g, m, v, vhat for a few shapes, with NaNs, infinities and subnormals."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(), (0,), (7,), (1000,), (3, 5, 7)]
    theta = [random_tensor(s, dtype, generator, special_fraction=0.05) for s in shapes]
    grads = [
        random_tensor(s, dtype, generator, low=-40, high=4, special_fraction=0.05) for s in shapes
    ]
    m = [random_tensor(s, dtype, generator, low=-40, high=1) for s in shapes]
    v = [random_tensor(s, dtype, generator, low=-40, high=2, positive=True) for s in shapes]
    vhat = [random_tensor(s, dtype, generator, low=-40, high=2, positive=True) for s in shapes]
    return [theta, grads, m, v, vhat]


def force_through_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "path_for", lambda device, plain=True: "through-cpu")


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_cpu_dense_equals_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, nesterov: bool, amsgrad: bool
) -> None:
    theta, grads, m, v, vhat = dense_case(dtype, seed=3)
    expected = [[t.clone() for t in ts] for ts in (theta, m, v, vhat)]
    grads_before = [g.clone() for g in grads]
    c = coefficients(dtype)
    reference.dense_step(
        expected[0], grads, expected[1], expected[2], expected[3] if amsgrad else None, c,
        nesterov=nesterov,
    )  # fmt: skip
    force_through_cpu(monkeypatch)
    kernels.dense_step(theta, grads, m, v, vhat if amsgrad else None, c, nesterov=nesterov)
    for name, want, got in zip("θ m v vhat".split(), expected, (theta, m, v, vhat), strict=True):
        for e, a in zip(want, got, strict=True):
            assert_same_bits(a, e, name)
    for before, after in zip(grads_before, grads, strict=True):
        assert_same_bits(after, before, "gradient (read only)")


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_cpu_sparse_equals_reference(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, lazy: bool
) -> None:
    generator = torch.Generator().manual_seed(4)
    shape = (50, 4)
    theta, m = (random_tensor(shape, dtype, generator) for _ in range(2))
    v = random_tensor(shape, dtype, generator, positive=True)
    indices = torch.randint(0, shape[0], (70,), generator=generator)  # with repeats
    values = random_tensor((70, 4), dtype, generator, special_fraction=0.05)
    c = coefficients(dtype)
    expected = [t.clone() for t in (theta, m, v)]
    reference.sparse_step(*expected, indices, values, c, lazy=lazy, numerics="eager")
    force_through_cpu(monkeypatch)
    kernels.sparse_step(theta, m, v, indices, values, c, lazy=lazy)
    for name, e, a in zip("θ m v".split(), expected, (theta, m, v), strict=True):
        assert_same_bits(a, e, name)


def test_through_cpu_writes_nothing_when_the_step_raises() -> None:
    theta, m = torch.arange(4.0), torch.ones(4)
    before = [theta.clone(), m.clone()]

    def step(written: list[torch.Tensor], read: list[torch.Tensor]) -> None:
        written[0].add_(1)
        raise RuntimeError("stopped half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        kernels.through_cpu([theta, m], [], step)
    assert_same_bits(theta, before[0])
    assert_same_bits(m, before[1])


def test_through_cpu_steps_on_copies_and_writes_them_back() -> None:
    theta, g = torch.zeros(3), torch.ones(3)
    seen: list[torch.Tensor] = []

    def step(written: list[torch.Tensor], read: list[torch.Tensor]) -> None:
        seen.extend(written + read)
        written[0].sub_(read[0])

    kernels.through_cpu([theta], [g], step)
    assert seen[0] is not theta and seen[0].device.type == "cpu"
    assert theta.tolist() == [-1.0, -1.0, -1.0]


# --- on a GPU ---------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dense_equals_cpu_reference(dtype: torch.dtype, nesterov: bool, amsgrad: bool) -> None:
    theta, grads, m, v, vhat = dense_case(dtype, seed=0)
    c = coefficients(dtype)
    cpu_state = [[t.clone() for t in ts] for ts in (theta, m, v, vhat)]
    gpu = [[t.cuda() for t in ts] for ts in (theta, m, v, vhat)]
    reference.dense_step(
        cpu_state[0], grads, cpu_state[1], cpu_state[2], cpu_state[3] if amsgrad else None, c,
        nesterov=nesterov,
    )  # fmt: skip
    kernels.dense_step(
        gpu[0], [g.cuda() for g in grads], gpu[1], gpu[2], gpu[3] if amsgrad else None, c,
        nesterov=nesterov,
    )  # fmt: skip
    for name, expected, actual in zip("θ m v vhat".split(), cpu_state, gpu, strict=True):
        for e, a in zip(expected, actual, strict=True):
            assert a.device.type == "cuda"
            assert_same_bits(a.cpu(), e, name)


@needs_gpu
@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_sparse_equals_cpu_reference(dtype: torch.dtype, lazy: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    shape = (500, 16)
    tensors = [random_tensor(shape, dtype, generator) for _ in range(3)]
    tensors[2] = tensors[2].abs()
    indices = torch.randint(0, shape[0], (700,), generator=generator)
    values = random_tensor((700, 16), dtype, generator)
    c = coefficients(dtype)
    cpu_state = [t.clone() for t in tensors]
    gpu = [t.cuda() for t in tensors]
    reference.sparse_step(*cpu_state, indices, values, c, lazy=lazy, numerics="eager")
    kernels.sparse_step(*gpu, indices.cuda(), values.cuda(), c, lazy=lazy)
    for e, a in zip(cpu_state, gpu, strict=True):
        assert_same_bits(a.cpu(), e)


@needs_gpu
def test_cuda_optimizer_equals_cpu_optimizer() -> None:
    generator = torch.Generator().manual_seed(2)
    start = [random_tensor((1000,), torch.float32, generator) for _ in range(3)]
    grads = [[random_tensor((1000,), torch.float32, generator) for _ in range(3)] for _ in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(t.to(device)) for t in start]
        opt = tfadam.Adam(params, lr=0.01, amsgrad=True)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.to(device)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, e in zip(results[1], results[0], strict=True):
        assert_same_bits(a, e)
