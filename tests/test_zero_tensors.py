"""A gradient that is torch's efficient zero tensor is applied as the zeros it holds.

``torch._efficientzerotensor`` (a plain strided ``torch.Tensor``, as autograd
may produce for a gradient known to be zero) has no memory: its data pointer
is null. The C kernels read memory, so before this was checked a step with
one read address 0 and the process died. Each face must give the bits of the
same step with ``torch.zeros`` (an ordinary tensor, proven against TF by the
oracle tests), on a first step and on steps that reuse their plan. (A
variable or slot that is one is refused: tests/test_reliab_bad_input.py.)
"""

from __future__ import annotations

import pytest
import torch
from tests.reliab_support import bits
from tests.test_negated_views import FACES

import tfadam


@pytest.mark.parametrize("face", FACES)
def test_an_efficient_zero_tensor_gradient_is_applied_as_zeros(face: str) -> None:
    zero_vars, zero_step = FACES[face](torch.float32)
    plain_vars, plain_step = FACES[face](torch.float32)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):  # from the third step on, tfadam.Adam reuses its plan
        values = [torch.randn(6, generator=gen) for _ in range(3)]
        values[step % 3] = torch.zeros(6)
        zero_step([torch._efficientzerotensor(6) if not v.any() else v for v in values])
        plain_step([v.clone() for v in values])
        assert bits(zero_vars) == bits(plain_vars), f"step {step + 1}"


@pytest.mark.parametrize("face", ["AdamOptimizer", "keras.Adam"])
def test_efficient_zero_tensor_sparse_values_are_applied_as_zeros(face: str) -> None:
    runs = []
    for values in (torch.zeros(2, 3), torch._efficientzerotensor(2, 3)):
        variable = torch.linspace(-1, 1, 15).reshape(5, 3)
        opt = tfadam.AdamOptimizer(0.01) if face == "AdamOptimizer" else tfadam.keras.Adam(0.01)
        for _ in range(2):
            opt.apply_gradients(
                [(tfadam.IndexedSlices(values, torch.tensor([1, 3]), (5, 3)), variable)]
            )
        runs.append(bits(variable))
    assert runs[0] == runs[1]
