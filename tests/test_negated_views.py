"""A gradient with torch's negative bit (``z.conj().imag``) is applied by its values.

Such a tensor's memory holds the negated values; the C kernels read memory,
so before this was checked they applied ``-g``. Each face must give the same
bits as a step with the resolved gradient (``g.resolve_neg()``, an ordinary
tensor, which the oracle tests prove against TF), on a first step, on steps
that reuse their plan, and for a contiguous negated view as well as a strided
one. (A variable or slot with the bit is refused: tests/test_reliab_bad_input.py.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tests.reliab_support import bits

import tfadam
import tfadam.keras


def _negated(values: torch.Tensor, strided: bool) -> torch.Tensor:
    if strided:  # laid out as z.conj().imag is: every other element, negated
        memory = torch.zeros(2 * values.numel(), dtype=values.dtype)
        memory[1::2] = -values
        g = torch._neg_view(memory[1::2])
        assert g.stride() == (2,)
    else:
        g = torch._neg_view(-values)
    assert g.is_neg() and torch.equal(g.resolve_neg(), values)
    return g


def _torch(dtype: torch.dtype) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], None]]:
    params = [torch.nn.Parameter(torch.linspace(-1, 1, 6, dtype=dtype)) for _ in range(3)]
    opt = tfadam.Adam(params, lr=0.01)

    def step(grads: list[torch.Tensor]) -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    return params, step


def _pairs(make: Callable[[], object]) -> Callable[[torch.dtype], tuple[list, Callable]]:
    def face(dtype: torch.dtype) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], None]]:
        variables = [torch.linspace(-1, 1, 6, dtype=dtype) for _ in range(3)]
        opt = make()
        return variables, lambda grads: opt.apply_gradients(list(zip(grads, variables)))

    return face


FACES = {
    "tfadam.Adam": _torch,
    "AdamOptimizer": _pairs(lambda: tfadam.AdamOptimizer(0.01)),
    "keras.Adam": _pairs(lambda: tfadam.keras.Adam(0.01)),
}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("face", FACES)
def test_a_negated_view_gradient_is_applied_by_its_values(
    face: str, dtype: torch.dtype, strided: bool
) -> None:
    negated_vars, negated_step = FACES[face](dtype)
    plain_vars, plain_step = FACES[face](dtype)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):  # from the third step on, tfadam.Adam reuses its plan
        values = [torch.randn(6, generator=gen).to(dtype) for _ in range(3)]
        # a negated view among plain gradients, a different one each step
        grads = [_negated(v, strided) if i == step % 3 else v for i, v in enumerate(values)]
        negated_step(grads)
        plain_step([v.clone() for v in values])
        assert bits(negated_vars) == bits(plain_vars), f"step {step + 1}"


SPARSE_FACES = {
    "AdamOptimizer": lambda: tfadam.AdamOptimizer(0.01),
    "keras.Adam": lambda: tfadam.keras.Adam(0.01),
}
NEGATED_SLICES = {
    "values": lambda values, indices: (torch._neg_view(-values), indices),
    "int64 indices": lambda values, indices: (values, torch._neg_view(-indices)),
    "int32 indices": lambda values, indices: (values, torch._neg_view(-indices.int())),
}


@pytest.mark.parametrize("negated", NEGATED_SLICES)
@pytest.mark.parametrize("face", SPARSE_FACES)
def test_negated_views_in_a_sparse_gradient_are_applied_by_their_values(
    face: str, negated: str
) -> None:
    # A dense variable before the sparse one: a step refused midway would have written it.
    gen = torch.Generator().manual_seed(1)
    values, indices = torch.randn(2, 3, generator=gen), torch.tensor([1, 3])
    dense = torch.randn(4, generator=gen)
    runs = []
    for made in (lambda v, i: (v, i), NEGATED_SLICES[negated]):
        variables = [torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 15).reshape(5, 3)]
        opt = SPARSE_FACES[face]()
        for _ in range(3):
            slices = tfadam.IndexedSlices(*made(values.clone(), indices.clone()), (5, 3))
            opt.apply_gradients([(dense.clone(), variables[0]), (slices, variables[1])])
        runs.append(bits(variables))
    assert runs[0] == runs[1]
