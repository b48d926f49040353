"""Whether tensors are still laid out, and where, as when a plan was made.

:func:`tfadam.engine.reuse` asks this every step of thousands of tensors: the
variables and slots (which must also stay at their addresses: the kernel's
pointers were gathered once), and the new gradients (whose addresses it
needs). A tensor's layout here is its exact Python type, dispatch keys
(device type, layout, autograd, the conjugate, negative and zero-tensor
bits), dtype, device index, ``requires_grad``, whether it is a leaf, sizes
and strides: anything that changes how the kernels must walk its memory, or
whether they may (an update in place reaches a non-leaf's graph, not the
variable it came from: ``prepare`` refuses it).

Read from Python, that is a pass over the tensors per attribute; where their
metadata is cold in cache (after another optimizer's step, say), each pass
costs 0.2-0.8 ms over 2,000 tensors. So it is read in one C++ call a list:

- where :mod:`tfadam.kernels.addresses` is built, by its recorder, which
  returns the layouts as bytes and fills in the addresses (one pass:
  measured ~1.0 ms for 6,000 slots and variables and 2,000 gradients, cold,
  against ~2.4 ms for the next way; benchmarks/RESULTS.md, session 7);
- else by ``torch._C._dynamo.guards.TensorGuards``, the check
  ``torch.compile`` makes before it reuses a compiled graph (a private torch
  API, in every release since 2.0; it also requires the tensors distinct),
  which does not see leafness (one ``is_leaf`` a tensor), and the addresses
  one ``data_ptr()`` call per tensor.

Which one is chosen when the layouts are recorded; both refuse every change
above (``tests/test_layouts.py``). Where neither can record them,
:meth:`Layouts.of` returns None and no plan is reused: every step is
prepared, which is exact, only slower (``tests/test_plan_reuse.py`` fails
there, so a torch that drops ``TensorGuards`` is seen). Nothing here keeps a
tensor alive.

>>> import torch
>>> a, b = torch.zeros(3), torch.zeros(2, 2)
>>> layouts = Layouts.of([a, b], fixed=True)
>>> layouts is None or list(layouts.hold([a, b])) == [a.data_ptr(), b.data_ptr()]
True
>>> layouts is None or layouts.hold([a, b.t()]) is None  # strides differ
True
>>> layouts is None or layouts.hold([a, b.clone()]) is None  # elsewhere
True
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch

from .kernels import addresses

try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every supported torch has it (see the module docstring)
    _TensorGuards = None

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_data_ptr = torch.Tensor.data_ptr
_is_leaf = attrgetter("is_leaf")


class Layouts:
    """The layouts of some tensors, and their addresses where they must stay put."""

    def __init__(
        self,
        count: int,
        record: addresses.Recorder | None,
        recorded: bytes | None,
        guards: Any,
        leaves: bytes | None,
        pointers: array | None,
    ) -> None:
        self._count, self._record, self._recorded = count, record, recorded
        self._guards, self._leaves, self._pointers = guards, leaves, pointers

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], *, fixed: bool) -> Layouts | None:
        """The tensors' layouts (and, if ``fixed``, addresses); None where they cannot be read."""
        record = addresses.recorder()
        if record is not None:
            out = array("Q", (0,)) * len(tensors)
            recorded = record(tensors, out, _PLAIN)
            if recorded is None:
                return None
            return cls(len(tensors), record, recorded, None, None, out if fixed else None)
        if _TensorGuards is None:
            return None
        try:
            # None: every size and stride is static, compared exactly.
            guards = _TensorGuards(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
            pointers = array("Q", map(_data_ptr, tensors)) if fixed else None
        except (TypeError, RuntimeError):
            return None
        return cls(len(tensors), None, None, guards, bytes(map(_is_leaf, tensors)), pointers)

    def hold(self, tensors: Sequence[torch.Tensor]) -> array | None:
        """The tensors' addresses if, position by position, they have the recorded layouts
        (and addresses, if fixed); else None."""
        if len(tensors) != self._count:
            return None
        if self._record is not None:
            out = array("Q", (0,)) * len(tensors)
            if self._record(tensors, out, _PLAIN) != self._recorded:
                return None
        elif self._guards.check(*tensors) and bytes(map(_is_leaf, tensors)) == self._leaves:
            out = array("Q", map(_data_ptr, tensors))
        else:
            return None
        if self._pointers is not None and out != self._pointers:
            return None
        return out
