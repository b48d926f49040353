"""The CUDA path gives the CPU reference's bits (skipped without a GPU).

``tfadam.kernels.cuda`` runs one rounding per torch op, so no FMA can merge
two roundings; CUDA's sqrt and division are IEEE. These tests are what proves
it on a machine with a GPU; without one they report themselves skipped.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import DTYPES, assert_same_bits, random_tensor

import tfadam
from tfadam import kernels, rule
from tfadam.kernels import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA path is unmeasured here"
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


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_dense_equals_cpu_reference(dtype: torch.dtype, nesterov: bool, amsgrad: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(), (0,), (7,), (1000,), (3, 5, 7), (300_001,)]
    theta = [random_tensor(s, dtype, generator, special_fraction=0.02) for s in shapes]
    m = [random_tensor(s, dtype, generator, low=-8, high=1) for s in shapes]
    v = [random_tensor(s, dtype, generator, low=-12, high=2, positive=True) for s in shapes]
    vhat = [random_tensor(s, dtype, generator, low=-12, high=2, positive=True) for s in shapes]
    grads = [
        random_tensor(s, dtype, generator, low=-8, high=4, special_fraction=0.02) for s in shapes
    ]
    c = coefficients(dtype)
    cpu = [[t.clone() for t in ts] for ts in (theta, m, v, vhat)]
    gpu = [[t.cuda() for t in ts] for ts in (theta, m, v, vhat)]
    reference.dense_step(
        cpu[0], grads, cpu[1], cpu[2], cpu[3] if amsgrad else None, c, nesterov=nesterov
    )
    kernels.dense_step(
        gpu[0],
        [g.cuda() for g in grads],
        gpu[1],
        gpu[2],
        gpu[3] if amsgrad else None,
        c,
        nesterov=nesterov,
    )
    for name, expected, actual in zip("θ m v vhat".split(), cpu, gpu, strict=True):
        for e, a in zip(expected, actual, strict=True):
            assert_same_bits(a.cpu(), e, name)


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
    cpu = [t.clone() for t in tensors]
    gpu = [t.cuda() for t in tensors]
    reference.sparse_step(*cpu, indices, values, c, lazy=lazy, numerics="eager")
    kernels.sparse_step(*gpu, indices.cuda(), values.cuda(), c, lazy=lazy)
    for e, a in zip(cpu, gpu, strict=True):
        assert_same_bits(a.cpu(), e)


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
