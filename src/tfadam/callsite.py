"""Where a warning should point: the user's line, past tfadam's and torch's frames.

A warning raised deep in a step (``opt.step()`` -> torch's hooks -> tfadam)
is only useful at the line of the user's code that started the step.

Example (the caller itself is the first frame outside these packages):
    >>> def warns():
    ...     return user_stacklevel(("no_such_package.",))
    >>> warns()
    1
"""

from __future__ import annotations

import sys

__all__ = ["user_stacklevel"]


def user_stacklevel(packages: tuple[str, ...] = ("tfadam.", "torch.")) -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function:
    the first frame outward whose module is not in ``packages``."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(packages):
        frame, level = frame.f_back, level + 1
    return level
