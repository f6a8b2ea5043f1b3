"""``params`` in ``torch.optim``'s format: tensors, ``(name, tensor)`` pairs
(``named_parameters()``), generators, or parameter-group dicts whose ``"params"`` is one of
those."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["materialize_params", "parameter_ids"]


def materialize_params(params: Iterable[Any]) -> list[Any]:
    """``params`` as ``torch.optim`` takes them, with every iterable made a list (a
    generator such as ``layer.parameters()`` would be empty once read)."""
    out: list[Any] = []
    for item in params:
        if isinstance(item, dict) and not isinstance(item.get("params"), Tensor):
            out.append({**item, "params": list(item.get("params", []))})
        else:
            out.append(item)
    return out


def parameter_ids(params: Iterable[object]) -> set[int]:
    """The ``id`` of every tensor in ``params``, given as ``torch.optim`` takes them:
    tensors, ``(name, tensor)`` pairs (``named_parameters()``), or parameter-group dicts
    whose ``"params"`` is one of those or a tensor."""
    ids: set[int] = set()
    for item in params:
        if isinstance(item, dict):
            group = item.get("params", [])
            ids |= parameter_ids([group] if isinstance(group, Tensor) else group)
        elif isinstance(item, Tensor):
            ids.add(id(item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            ids.add(id(item[1]))
        else:
            raise TypeError(
                "params must hold tensors or parameter-group dicts (torch.optim's format); "
                f"got {type(item).__name__}"
            )
    return ids
