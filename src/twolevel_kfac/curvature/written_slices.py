"""Where a write into part of a tensor puts its values (autograd's ``CopySlices``: ``buf[t] =
h``, ``buf[:, t] = h``, ``buf[t:t + 1] = v[None]``, an in-place op on a view). Autograd keeps
no record of the part written; the shapes tell it where no other dimension of the tensor
has as many entries as the one asked about, and the node's own backward tells it where one
does (a time-major ``[T, N, D]`` buffer at ``T = N`` has the sizes of a batch-first one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .row_ops import node_shape

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
    graph: the tensor written into (edge 0) keeps it whole; a value holds it whole along
    one of its dimensions (``buf[:, t] = h_t``), or is written into part of it (an entry,
    ``buf[t] = h_t``; a run, ``rows[t·N:(t + 1)·N] = h_t``; ``entry`` ``-1``, or a run's
    dimension with fewer entries), or is not placed. Where no other dimension of the output
    has a multiple of ``dim``'s entries the shapes say it; where one has (``[T, N, D]`` at
    ``T = N``, ``[T, N·D]``: the shapes do not tell), the node's backward does
    (:func:`_probed`). ``None`` where neither tells (the shapes fit two ways, the probe is
    not exact in the output's dtype, the graph is freed)."""
    out = node_shape(node, 0)
    if dim >= len(out):
        return None
    if out[dim] > 1 and any(n % out[dim] == 0 for k, n in enumerate(out) if k != dim):
        return _probed(node, dim, out)
    where = []
    for edge, (parent, nr) in enumerate(node.next_functions):
        if parent is None:
            continue
        shape = tuple(node_shape(parent, nr)) if edge else tuple(out)
        if len(shape) == len(out):
            where.append(Written(parent, shape, dim))  # (fewer entries there: a run)
            continue
        fits = {k for k in range(len(out)) if _fits(shape, out[:k] + out[k + 1 :])}
        whole = {dim - (k < dim) for k in fits if k != dim and shape[dim - (k < dim)] == out[dim]}
        if len(whole) > 1:
            return None
        where.append(
            Written(parent, shape, whole.pop()) if whole else Written(parent, shape, None, -1)
        )
    return where


def _fits(shape: tuple[int, ...], room: list[int]) -> bool:
    """Whether a value of ``shape`` fits in a part of ``room`` (no more entries anywhere)."""
    return len(shape) == len(room) and all(v <= r for v, r in zip(shape, room, strict=True))


def _probed(node: Node, dim: int, out: list[int]) -> list[Written] | None:
    """:func:`written_dims` from the node's backward: the gradient each value receives of
    a probe holding every entry's coordinate along ``dim`` plus one is, for each of the
    value's entries, that number times the factor the write applies (``-=``: ``-1``;
    ``lerp_(v, 0.5)``: ``0.5``): one constant (an entry: its index where the factor is 1),
    or ``s·(c + 1), s·(c + 2), …`` along one of the value's dimensions and constant along
    the others (a run from ``c``, in order), else the value is not placed."""
    metadata = getattr(node, "_input_metadata", None)
    if not metadata or not metadata[0].dtype.is_floating_point:
        return None
    dtype, device = metadata[0].dtype, metadata[0].device
    if out[dim] > 2 / torch.finfo(dtype).eps:  # (integers exact up to there)
        return None
    shape = [1] * len(out)
    shape[dim] = out[dim]
    probe = torch.arange(1, out[dim] + 1, dtype=dtype, device=device).view(shape).expand(out)
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
        placed = _placed(coordinates.to(torch.float64), out[dim])
        where.append(Written(parent, tuple(coordinates.shape), *placed))
    return where


def _placed(numbers: torch.Tensor, whole: int) -> tuple[int | None, int | None]:
    """Where a value's probe ``numbers`` (:func:`_probed`) place it in a dimension of
    ``whole`` entries: ``(j, None)``, a run in order along the value's dimension ``j``;
    ``(None, e)``, entry ``e`` (``-1``: scaled, its index unknown); ``(None, None)``, not
    placed (not one factor: ``*= g``, a reversed run, a zero)."""
    if not numbers.numel() or not bool((numbers != 0).all() and numbers.isfinite().all()):
        return None, None
    first = float(numbers.reshape(-1)[0])
    if bool((numbers == first).all()):
        return (
            (None, round(first) - 1)
            if first == round(first) and 1 <= first <= whole
            else (None, -1)
        )
    varying = [j for j in range(numbers.dim()) if bool(numbers.diff(dim=j).ne(0).any())]
    if len(varying) != 1:
        return None, None
    steps = numbers.diff(dim=varying[0])
    step = float(steps.reshape(-1)[0])
    start = first / step  # (c + 1)
    length = int(numbers.shape[varying[0]])
    regular = bool(torch.allclose(steps, torch.full_like(steps, step), rtol=1e-9, atol=0.0))
    ordered = abs(start - round(start)) < 1e-6 and 1 <= round(start) <= whole - length + 1
    return (varying[0], None) if regular and ordered else (None, None)
