"""Where the optimizers' warnings point: the user's line that led to them.

A warning raised inside the optimizer, its hooks or torch's machinery that runs them (a
forward hook inside ``model(x)``, a tensor hook inside ``loss.backward()``) is reported
at the first frame outside ``twolevel_kfac`` and ``torch``: the call in the training loop,
not a line of the library, whichever path reached it.
"""

from __future__ import annotations

import sys

__all__ = ["caller_level"]

_INSIDE = ("twolevel_kfac", "torch")


def caller_level() -> int:
    """The ``stacklevel`` for ``warnings.warn`` in the function that calls this one that
    names the first frame outside ``twolevel_kfac`` and ``torch`` (the outermost frame
    when there is none)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if not any(name == top or name.startswith(top + ".") for top in _INSIDE):
            break
        frame, level = frame.f_back, level + 1
    return level
