"""Where a write into part of a tensor puts its values (autograd's ``CopySlices``: ``buf[t] =
h``, ``buf[:, t] = h``, ``buf[t:t + 1] = v[None]``, an in-place op on a view). Autograd keeps
no record of the part written; the shapes tell it where no other dimension of the tensor
has as many entries as the one asked about, and the node's own backward tells it where one
does (a time-major ``[T, N, D]`` buffer at ``T = N`` has the sizes of a batch-first one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .row_order import node_shape

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = ["Written", "written_dims"]


class Written(NamedTuple):
    """Where dimension ``d`` of a ``CopySlices`` node's output is in one of its inputs (of
    ``shape``): its dimension ``dim`` (the tensor written into; a value holding all or a run
    of ``d``'s entries along it), or entry ``entry`` of ``d`` written with the whole value
    (``entry`` ``-1`` where the shapes alone said so), or neither (a value not placed)."""

    parent: Node
    shape: tuple[int, ...]
    dim: int | None = None
    entry: int | None = None


def written_dims(node: Node, dim: int) -> list[Written] | None:
    """Where dimension ``dim`` of a ``CopySlices`` node's output is in each input with a
    graph: the tensor written into (edge 0) keeps it; where no other dimension of the output
    has as many entries, the shapes place a value: of the same rank with as many entries
    there, in the same place (with fewer, a slice of ``dim``: left out); of one dimension
    fewer, the output's shape without one dimension, written into one entry of ``dim`` or
    holding it one place up; others (broadcast) are left out. Where another dimension has
    as many entries (the shapes do not tell), the node's backward places every value
    (:func:`_probed`). ``None`` where it cannot (the probe not exact in the output's dtype,
    an op on a view that scales what it writes, the graph freed)."""
    out = node_shape(node, 0)
    if dim >= len(out):
        return None
    if any(n == out[dim] for k, n in enumerate(out) if k != dim):
        return _probed(node, dim, out)
    where = []
    for edge, (parent, nr) in enumerate(node.next_functions):
        shape = node_shape(parent, nr) if parent is not None else []
        if parent is None or len(shape) not in (len(out), len(out) - 1):
            continue  # (a value broadcast into the part: no entries of ``dim``)
        size = tuple(shape)
        if edge == 0 or len(shape) == len(out):
            if shape[dim] == out[dim]:  # (else a slice of ``dim`` written: not followed)
                where.append(Written(parent, size, dim))
            continue
        picked = {k for k in range(len(out)) if out[:k] + out[k + 1 :] == shape}
        places = {-1 if k == dim else dim - (k < dim) for k in picked}
        if len(places) > 1:
            return None
        where += [Written(parent, size, *((None, -1) if at < 0 else (at, None))) for at in places]
    return where


def _probed(node: Node, dim: int, out: list[int]) -> list[Written] | None:
    """:func:`written_dims` from the node's backward: the gradient each value receives of
    a probe holding every entry's coordinate along ``dim`` is that coordinate for each of
    the value's entries: one constant (entry ``entry`` written), or running ``0, 1, …``
    (or a run of them) along one of its dimensions and constant along the others (``dim``
    is that one), else the value is not placed."""
    metadata = getattr(node, "_input_metadata", None)
    if not metadata or not metadata[0].dtype.is_floating_point:
        return None
    dtype, device = metadata[0].dtype, metadata[0].device
    if out[dim] > 2 / torch.finfo(dtype).eps:  # (integers exact up to there)
        return None
    shape = [1] * len(out)
    shape[dim] = out[dim]
    probe = torch.arange(out[dim], dtype=dtype, device=device).view(shape).expand(out)
    try:
        with torch.no_grad():
            grads = node(probe.contiguous())  # type: ignore[operator]
    except RuntimeError:  # (its graph freed: a backward ran through it)
        return None
    where = []
    for edge, (parent, _) in enumerate(node.next_functions):
        if parent is None:
            continue
        if edge == 0:
            where.append(Written(parent, tuple(out), dim))
            continue
        coordinates = grads[edge]
        if coordinates is None:
            return None
        placed = _placed(coordinates.to(torch.float64))
        if placed is None:
            return None
        where.append(Written(parent, tuple(coordinates.shape), *placed))
    return where


def _placed(coordinates: torch.Tensor) -> tuple[int | None, int | None] | None:
    """``(dim, None)`` where ``coordinates`` run ``c, c + 1, …`` along dimension ``dim`` and
    are constant along the others; ``(None, entry)`` where all are ``entry``; ``(None,
    None)`` for another pattern of whole numbers; ``None`` for other numbers (scaled)."""
    if not coordinates.numel() or not bool((coordinates == coordinates.round()).all()):
        return None if coordinates.numel() else (None, None)
    first = coordinates.reshape(-1)[0]
    if bool((coordinates == first).all()):
        return None, int(first)
    varying = [j for j in range(coordinates.dim()) if bool(coordinates.diff(dim=j).ne(0).any())]
    if len(varying) != 1:
        return None, None
    steps = coordinates.diff(dim=varying[0])
    return (varying[0], None) if bool((steps == 1).all()) else (None, None)
