"""Refusing copies of the optimizers and preconditioners.

``copy.deepcopy(opt)`` and ``torch.save(opt)`` pickle an object. A torch optimizer pickles
its defaults, state and param groups alone, so a KFAC optimizer's copy had no
preconditioner and failed at its first step; a preconditioner's copy held a copy of the
model whose hooks feed the copy, not the original, so its ``step()`` found no statistics
of the model being trained and did nothing while the torch optimizer beside it took a
plain step. Both are refused, naming the way that works: their ``state_dict()``.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["NotCopyable"]


class NotCopyable:
    """A base whose instances refuse ``copy``, ``deepcopy`` and pickling (module docstring)."""

    def __getstate__(self) -> NoReturn:
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: it holds hooks on its model "
            "and curvature state tied to it, which a copy would lose. Save its state_dict() "
            "(torch.save(opt.state_dict(), path)) and load it into one built on the model "
            "(or its copy)"
        )

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        self.__getstate__()
