"""Functional tensors (``torch.func.functionalize``) have no memory of their own.

Their ``data_ptr()`` is 0 and their values live in a wrapped tensor, yet they
are plain ``torch.Tensor`` objects, strided, on the CPU. The kernels read and
write memory: a step given one crashed the process (it read address 0). Each
is refused, naming it, with nothing modified.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tests.reliab_support import differences, torch_face_tensors

import tfadam


def _functional(t: torch.Tensor) -> torch.Tensor:
    return torch._to_functional_tensor(t)


def _gradient(p: torch.nn.Parameter, opt: tfadam.Adam) -> None:
    p.grad = _functional(torch.ones(3))


def _variable(p: torch.nn.Parameter, opt: tfadam.Adam) -> None:
    q = _functional(torch.zeros(3))
    q.grad = torch.ones(3)
    opt.add_param_group({"params": [q]})


CASES: dict[str, tuple[Callable[[torch.nn.Parameter, tfadam.Adam], None], str]] = {
    "a functional gradient": (_gradient, "the gradient of param_groups[0]['params'][0]"),
    "a functional variable": (_variable, "param_groups[1]['params'][0]"),
}


@pytest.mark.parametrize("steps", [0, 3], ids=["first step", "after reused plans"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_functional_tensor_is_refused_naming_it(case: str, steps: int) -> None:
    make, culprit = CASES[case]
    p = torch.nn.Parameter(torch.linspace(-1, 1, 3))
    opt = tfadam.Adam([p])
    for _ in range(steps):
        p.grad = torch.full((3,), 0.5)
        opt.step()
    make(p, opt)
    before = torch_face_tensors(opt)
    with pytest.raises(ValueError, match="no memory of its own") as raised:
        opt.step()
    assert str(raised.value).startswith(culprit), str(raised.value)
    assert differences(before, torch_face_tensors(opt)) == []


def test_a_step_inside_functionalize_is_refused() -> None:
    p = torch.nn.Parameter(torch.linspace(-1, 1, 3))
    opt = tfadam.Adam([p])
    for _ in range(3):
        p.grad = torch.full((3,), 0.5)
        opt.step()
    before = p.detach().clone()

    def step(g: torch.Tensor) -> torch.Tensor:
        p.grad = g
        opt.step()
        return g

    with pytest.raises(ValueError, match="no memory of its own"):
        torch.func.functionalize(step)(torch.ones(3))
    assert torch.equal(p.detach(), before)


def test_functional_sparse_indices_are_refused() -> None:
    # (TF1's face takes IndexedSlices as given; the kernel read the indices at address 0)
    p = torch.linspace(-1, 1, 8).reshape(4, 2)
    opt = tfadam.AdamOptimizer(0.1)
    indices = _functional(torch.tensor([0, 2]))
    before = p.clone()
    with pytest.raises(ValueError, match="its indices have no memory of their own"):
        opt.apply_gradients([(tfadam.IndexedSlices(torch.ones(2, 2), indices, (4, 2)), p)])
    assert torch.equal(p, before)
