"""The model call's arguments: its batch (the first tensor argument, whose first
dimension is the samples) and the rows of the others (a batch of one whose real batch is
passed second, ``model(code, x)``, is refused by :mod:`.forward_misuse`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

__all__ = ["batch_argument", "first_tensor", "other_rows"]


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The first tensor among a call's positional and keyword arguments."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


def other_rows(args: tuple[Any, ...], kwargs: dict[str, Any], first: Tensor) -> tuple[int, ...]:
    """The first dimensions of a call's tensor arguments other than ``first``, and of the
    tensors in its dict, list and tuple arguments (``model(code, {"x": x})``)."""
    values = [*args, *kwargs.values()]
    values += [v for c in values if _container(c) for v in _items(c)]
    return tuple(
        int(v.shape[0]) for v in values if isinstance(v, Tensor) and v.dim() and v is not first
    )


def _container(value: Any) -> bool:
    """A dict, list, tuple or dataclass instance (``model(code, Batch(x=x))``)."""
    return isinstance(value, (dict, list, tuple)) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    )


def _items(container: Any) -> list[Any]:
    if dataclasses.is_dataclass(container):
        return [getattr(container, f.name) for f in dataclasses.fields(container)]
    return list(container.values() if isinstance(container, dict) else container)


def batch_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The model call's batch: its first tensor argument, with at least one dimension.

    Raises:
        RuntimeError: none (the batch inside a dict or a list), or a 0-d tensor.
    """
    x = first_tensor(args, kwargs)
    if x is not None and x.dim() > 0:
        return x
    first = next(iter((*args, *kwargs.values())), None)
    raise RuntimeError(
        "KFAC capture: the model's first tensor argument must be the batch, its first "
        f"dimension the samples (got {type(first).__name__ if x is None else '0-d tensor'}). "
        "A dict or list of tensors is not read: call model(**batch) or model(x, ...) with "
        "the batch's tensor first"
    )
