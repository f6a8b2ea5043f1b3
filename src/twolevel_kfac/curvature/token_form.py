"""Which form an embedding table's token factor takes: the vector of token frequencies
``f`` (:mod:`.tokens`) or the dense one-hot ``G = diag(f)`` (:mod:`.layer_types`).

Tables of more than :data:`~.layer_types.EMBEDDING_MAX_ROWS` rows always keep ``f``. A
smaller table keeps what the last optimizer built on it chose (:func:`choose_token_factors`,
from its options and the tables' ties): ``f`` where the two forms are the same block, the
dense ``G`` where they are not or where the optimizer reads more than ``G`` itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

from torch import Tensor, nn

from . import layer_types

__all__ = ["choose_token_factors", "keeps_frequencies"]

_DIAGONAL: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""Each small table's form, as the last optimizer built on it chose (absent: dense)."""


def keeps_frequencies(module: nn.Module) -> bool:
    """Whether an embedding table's block keeps its token factor as the vector ``f``: above
    ``EMBEDDING_MAX_ROWS`` rows always, smaller tables as :func:`choose_token_factors`
    chose for them (dense before any optimizer did)."""
    rows = int(getattr(module, "num_embeddings", 0))
    return rows > layer_types.EMBEDDING_MAX_ROWS or _DIAGONAL.get(module, False)


def choose_token_factors(layers: Mapping[str, nn.Module], diagonal: bool) -> None:
    """Set the form of the token factor of each table of ``layers`` with at most
    ``EMBEDDING_MAX_ROWS`` rows: the vector ``f`` where ``diagonal`` (the optimizer's
    options give the table's block no other reading: expand view, a fine level that only
    inverts ``G``) and no module of another type in ``layers`` computes with its weight (a
    tied ``Linear`` head adds a dense ``δδᵀ``); else the dense one-hot ``G``. Both forms are
    the same block where both apply. The choice stays with the table until an optimizer
    built later chooses again (one that keeps the other form then refuses to step:
    :func:`~.block_checks.check_blocks`)."""
    other = {
        id(m.weight)
        for m in layers.values()
        if not isinstance(m, nn.Embedding) and isinstance(getattr(m, "weight", None), Tensor)
    }
    for module in layers.values():
        if isinstance(module, nn.Embedding) and (
            module.num_embeddings <= layer_types.EMBEDDING_MAX_ROWS
        ):
            _DIAGONAL[module] = diagonal and id(module.weight) not in other
