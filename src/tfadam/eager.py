"""Functions that ``torch.compile`` must run eagerly, without the cost of saying so.

tfadam's steps call C through ctypes, which dynamo cannot trace; tracing the
validation in front of them would only burn compile time. ``torch.compiler.disable``
says so, but its wrapper swaps dynamo's frame hooks on every call: a few µs
warm, and ~100 µs on a step whose memory traffic has just flushed the caches
(measured on D1 of the benchmark, where a whole step's Python is ~0.5 ms).
:func:`eager_only` pays that only while dynamo is tracing.

It also never imports dynamo itself: ``torch.compiler.disable`` does (about
1 s), and dynamo loads triton, which segfaults in a process where
TensorFlow >= 2.20 was loaded first (see :mod:`tfadam.import_order`). The
disabled wrapper is made on the first call under ``torch.compile``, when
dynamo (and triton) are loaded already.
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

    Called eagerly it is ``fn`` behind one ``is_compiling()`` test (which
    needs no dynamo); under ``torch.compile`` dynamo traces that test as true
    and meets the disabled function, so ``fn`` runs eagerly between two graphs.

    >>> @eager_only
    ... def double(x: int) -> int:
    ...     return 2 * x
    >>> double(3)
    6
    """
    disabled: list[Callable[P, R]] = []  # made on the first call under torch.compile

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if torch.compiler.is_compiling():
            if not disabled:
                # dynamo does not trace torch.compiler.disable itself: the
                # first compile breaks the graph here, later ones at the
                # disabled function; either way once, and fn runs eagerly.
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)

    return call
