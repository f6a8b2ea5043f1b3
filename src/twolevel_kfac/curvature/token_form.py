"""Which form an embedding table's token factor takes: the vector of token frequencies
``f`` (:mod:`.tokens`) or the dense one-hot ``G = diag(f)`` (:mod:`.layer_types`).

Tables of more than :data:`~.layer_types.EMBEDDING_MAX_ROWS` rows always keep ``f``. A
smaller table takes the form that the most recently built optimizer still alive that
preconditions it chose (:func:`choose_token_factors`, from its options and the table's
ties): ``f`` where the two forms are the same block, the dense ``G`` where they are not or
where the optimizer reads more than ``G`` itself; dense where no live optimizer chose. An
optimizer whose choice another live one built later overrides refuses to step
(:func:`~.block_checks.check_blocks`) until that one is dropped; one that failed to build,
or was dropped, chooses nothing (before the 2026-12-09 review every construction that
scanned the model chose for all its tables, for good).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

from torch import nn

from . import layer_types

__all__ = ["choose_token_factors", "is_small_table", "keeps_frequencies"]

_CHOICES: weakref.WeakKeyDictionary[nn.Module, list[tuple[weakref.ref[object], bool]]] = (
    weakref.WeakKeyDictionary()
)
"""Per small table, the optimizers that chose its form (weakly), oldest first, and whether
each chose the vector."""


def is_small_table(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Embedding`` of at most ``EMBEDDING_MAX_ROWS`` rows
    (whose form an optimizer chooses)."""
    if not isinstance(module, nn.Embedding):
        return False
    return module.num_embeddings <= layer_types.EMBEDDING_MAX_ROWS


def keeps_frequencies(module: nn.Module) -> bool:
    """Whether an embedding table's block keeps its token factor as the vector ``f``: above
    ``EMBEDDING_MAX_ROWS`` rows always, a smaller table as the latest live optimizer that
    chose for it did (dense where none did)."""
    rows = int(getattr(module, "num_embeddings", 0))
    if rows > layer_types.EMBEDDING_MAX_ROWS:
        return True
    choices = _CHOICES.get(module)
    while choices:
        owner, vector = choices[-1]
        if owner() is not None:
            return vector
        choices.pop()  # (an optimizer dropped, or one whose construction failed)
    return False


def choose_token_factors(owner: object, tables: Mapping[nn.Module, bool]) -> None:
    """Record ``owner``'s choice for each small table of ``tables`` (``True``: the vector
    ``f``; larger tables are left out: theirs is always ``f``). ``owner`` (an optimizer's
    preconditioner) is held weakly: its choice ends with it."""
    for module, vector in tables.items():
        if is_small_table(module):
            choices = _CHOICES.setdefault(module, [])
            choices[:] = [(ref, v) for ref, v in choices if ref() not in (None, owner)]
            choices.append((weakref.ref(owner), vector))
