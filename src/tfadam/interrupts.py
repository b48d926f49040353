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
  the handler up when it runs it. Two ``signal.signal`` calls per held signal
  and step cost ~3 µs in all (``python -m timeit`` of :func:`held` around
  nothing: 2.8-3.4 µs with the default handlers), against a step's ≥ 50 µs.

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

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["held"]

# The signals a Python program commonly handles in Python. SIGINT's default
# handler is Python's (it raises KeyboardInterrupt); the others are held only
# where a Python handler was installed for them.
_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")
    if hasattr(signal, name)
)
_MAIN = threading.main_thread()
_depth = 0  # held blocks open on the main thread


@contextmanager
def held() -> Iterator[None]:
    """Run the block with Python-handled signals recorded; handle them after it."""
    global _depth
    if _depth or threading.current_thread() is not _MAIN:
        yield
        return
    previous: dict[int, Any] = {}
    arrived: list[tuple[int, FrameType | None]] = []

    def record(signum: int, frame: FrameType | None) -> None:
        if all(signum != seen for seen, _ in arrived):  # the OS, too, keeps one of each
            arrived.append((signum, frame))

    try:
        _depth = 1
        for signum in _SIGNALS:
            handler = signal.getsignal(signum)
            # SIG_DFL and SIG_IGN are ints (the OS acts, Python never runs);
            # a handler installed from C reads as None: both are left alone.
            if callable(handler):
                previous[signum] = handler
                signal.signal(signum, record)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _depth = 0
        for signum, frame in arrived:
            previous[signum](signum, frame)
