"""Steps that an interrupt cannot split: signals are held while a step writes.

A KeyboardInterrupt is raised by Python's SIGINT handler between two
bytecodes of the main thread — between the kernels of two parameter groups,
say, leaving some variables moved and their accumulators not. While
:func:`held` is active, SIGINT (and every other signal whose handler is a
Python function) is recorded instead, and its handler runs when the block
ends: the step is then complete, and the exception (or whatever the handler
does) happens after it.

Why this mechanism (measured on this project's 2-core machine, CPython 3.11):

* ``signal.pthread_sigmask`` would block the signal for the main thread
  only: the kernel then delivers a process-directed SIGINT (Ctrl-C, ``kill``)
  to another thread — torch keeps a pool of them — whose C handler marks it
  pending, and the main thread runs the Python handler at its next bytecode,
  mid-step, all the same. ``_thread.interrupt_main()`` bypasses the mask too.
* ordering the writes so that one write commits the step is impossible: a
  step writes thousands of tensors in place.
* swapping the Python-level handler catches all of these, because Python looks
  the handler up when it runs it. Its cost is per step, not per tensor:
  ``python -m timeit`` of ``with held(): pass`` gave 17-22 µs, against
  1.7-2.9 µs for ``contextlib.nullcontext()``, on this project's 2-core
  machine while ~20 processes shared it (a D2 step of 2,000 tensors took
  ~100 ms there; a one-tensor step ~0.2 ms).

Only the main thread can change handlers, and only it runs them; elsewhere
:func:`held` does nothing (a signal's handler then runs in the main thread,
not inside this step). Nested blocks hold once, for the outermost.

Example:
    >>> import _thread
    >>> try:
    ...     with held():
    ...         _thread.interrupt_main()  # recorded, not raised here
    ...         finished = True
    ... except KeyboardInterrupt:
    ...     print("interrupted after the block, which finished:", finished)
    interrupted after the block, which finished: True
"""

from __future__ import annotations

import _signal  # signal's C functions: see _SIGNALS
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["held"]

# The signals a Python program commonly handles in Python. SIGINT's default
# handler is Python's (it raises KeyboardInterrupt); the others are held only
# where a Python handler was installed for them. As plain ints, for the C
# functions of _signal: signal.getsignal and signal.signal wrap them to
# convert ints to enums, which costs 100x the call itself (measured with
# timeit on this busy 2-core machine: 15 µs against 0.15 µs for getsignal,
# 27 µs against 2.3 µs for signal).
_SIGNALS = tuple(
    int(getattr(signal, name))
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)
_MAIN = threading.main_thread().ident


class held:  # noqa: N801 (used as a function: ``with held():``)
    """Run the block with Python-handled signals recorded; handle them after it."""

    # Shared by nested and successive blocks: only the main thread uses them.
    _depth = 0
    _previous: dict[int, Any] = {}  # noqa: RUF012
    _arrived: list[tuple[int, FrameType | None]] = []  # noqa: RUF012

    def __enter__(self) -> None:
        if held._depth or threading.get_ident() != _MAIN:
            held._depth += held._depth > 0  # nested on the main thread; elsewhere stays 0
            return
        held._depth = 1
        previous = held._previous
        try:
            for signum in _SIGNALS:
                handler = _signal.getsignal(signum)
                # SIG_DFL and SIG_IGN are ints (the OS acts, Python never runs);
                # a handler installed from C reads as None: both are left alone.
                if callable(handler):
                    previous[signum] = handler
                    # signal.signal first runs the handlers of signals already
                    # arrived: an interrupt may be raised here, before the block.
                    _signal.signal(signum, _record)
        except BaseException:
            for signum, handler in previous.items():
                _signal.signal(signum, handler)
            previous.clear()
            held._arrived.clear()
            held._depth = 0
            raise

    def __exit__(self, *exc: object) -> None:
        if held._depth != 1:
            held._depth -= held._depth > 0
            return
        previous, arrived = held._previous, held._arrived
        try:
            for signum, handler in previous.items():
                _signal.signal(signum, handler)
        finally:
            held._depth = 0
            handlers = dict(previous)
            previous.clear()
            pending = list(arrived)
            arrived.clear()
        for signum, frame in pending:
            handlers[signum](signum, frame)


def _record(signum: int, frame: FrameType | None) -> None:
    if all(signum != seen for seen, _ in held._arrived):  # the OS, too, keeps one of each
        held._arrived.append((signum, frame))
