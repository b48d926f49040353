"""Whether tensors still have the layout they had when a plan was made.

:func:`tfadam.engine.reuse` asks this every step of thousands of tensors: the
variables, and the new gradients. ``torch.compile`` asks the same question
before it reuses a compiled graph, and answers it in C++:
``torch._C._dynamo.guards.TensorGuards`` compares each tensor's exact Python
type, dispatch keys (device type, layout, autograd, conjugate and negative
bits), dtype, device index, ``requires_grad``, sizes and strides with the ones
it recorded, and that no tensor is given twice. One call reads what a Python
pass per attribute would, about 5x faster over 2,000 tensors (benchmarks/
RESULTS.md, session 7). It records metadata only: no tensor stays referenced.

It is a private torch API, present in every torch release since 2.0. Where
a torch lacks it (or its constructor changed), :meth:`Layouts.of` returns None
and no plan is reused: every step is prepared, which is exact, only slower;
``tests/test_plan_reuse.py`` fails there, so a release that drops it is seen.

>>> import torch
>>> a, b = torch.zeros(3), torch.zeros(2, 2)
>>> layouts = Layouts.of([a, b])
>>> layouts is None or layouts.hold([torch.ones(3), torch.ones(2, 2)])
True
>>> layouts is None or layouts.hold([torch.ones(3), torch.ones(2, 2).t()])  # strides differ
False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every supported torch has it (see the module docstring)
    _TensorGuards = None


class Layouts:
    """The layouts of some tensors, to compare other tensors with, in one C++ call."""

    def __init__(self, guards: Any, count: int) -> None:
        self._guards, self._count = guards, count

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> Layouts | None:
        """The tensors' layouts (sizes and strides exact); None where torch cannot record them."""
        if _TensorGuards is None:
            return None
        try:
            # None: every size and stride is static, compared exactly.
            guards = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        except (TypeError, RuntimeError):
            return None
        return cls(guards, len(tensors))

    def hold(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether these tensors, position by position, have the recorded layouts."""
        return len(tensors) == self._count and bool(self._guards.check(*tensors))
