"""Functions that ``torch.compile`` must run eagerly, without the cost of saying so.

tfadam's steps call C through ctypes, which dynamo cannot trace; tracing the
validation in front of them would only burn compile time. ``torch.compiler.disable``
says so, but its wrapper swaps dynamo's frame hooks on every call: a few µs
warm, and ~100 µs on a step whose memory traffic has just flushed the caches
(measured on D1 of the benchmark, where a whole step's Python is ~0.5 ms).
:func:`eager_only` pays that only while dynamo is tracing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def eager_only(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, which dynamo sees as ``torch.compiler.disable``d (a graph break).

    Called eagerly it is ``fn`` behind one ``is_compiling()`` test; under
    ``torch.compile`` dynamo traces that test as true and meets the disabled
    function, so ``fn`` runs eagerly between two graphs.

    >>> @eager_only
    ... def double(x: int) -> int:
    ...     return 2 * x
    >>> double(3)
    6
    """
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call
