"""Whether a layer's input rows are the batch's samples in the order every layer has them:
what the two-level coarse level and adaptive damping's exact Fisher products need.

KFAC's block of a layer averages over the layer's rows, whatever their order: rows that are
not the samples (two views concatenated inside ``forward``, gathered tokens, a graph's
edges) take KFAC's expand view (:func:`~.calls.per_sample`). The coarse level and the exact
Fisher products pair the layers' per-sample gradients row by row: ``∇ℓ_n`` is the sum over
the layers of row ``n``'s ``δ āᵀ``. A layer whose row ``r`` is another sample's than the
row ``r`` of the layer before it pairs one sample's gradient with another's, and a layer
on rows that are not samples (``R ≠ N``, not proved ``k`` per sample in order) has no
per-sample gradient at all: the Fisher they build is not the batch's (5e-2 off a step of
0.5 in a trial, silently). Such layers are refused when the forward runs.

The rows are moved by an autograd operation along the samples' dimension (indexing,
gathering, slicing, concatenating, repeating, flipping, rolling, scattering, a matrix
product ``P @ h``) between an earlier layer's output (``forward.per_sample``) and the
layer's input, the dimension followed back through transposes, permutes and reshapes
(attention's sequence-first internals keep it). One on parameters alone (a position table
sliced to the length), on another dimension, or before the first layer (the data) moves
nothing: every layer sees the data's order; indexes that take ``N`` rows of ``N`` are
composed, and a path on which they make the identity moved nothing (a sort undone).

Not seen: the samples split over several dimensions and moved there
(``h.view(2, N // 2, D).flip(0)``), pieces of the batch put back together in another order
(``chunk`` / ``split`` / ``unbind`` then ``cat`` / ``stack``), a time-major tensor with as
many positions as samples.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["moved_rows"]

_WALK = 512  # autograd nodes looked at, at most
_RESHAPES = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
    }
)
_ON_DIM = frozenset(  # operations along a ``dim`` that move, take or put rows
    {
        "CatBackward0",
        "GatherBackward0",
        "IndexAddBackward0",
        "IndexCopyBackward0",
        "ScatterBackward0",
        "ScatterAddBackward0",
        "ScatterReduceBackward0",
    }
)
Moved = str  # the name of what moved the rows


def _signed(value: int) -> int:
    """A saved ``int64`` as autograd returns it (``-1`` comes back as ``2⁶⁴ − 1``)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shape(node: Node | None, output_nr: int) -> list[int]:
    """The shape of a node's forward output ``output_nr``, from autograd's metadata."""
    meta = getattr(node, "_input_metadata", None) if node is not None else None
    if not meta or output_nr >= len(meta):
        return []
    return [int(n) for n in getattr(meta[output_nr], "shape", [])]


def _dim(node: Node, rank: int, attribute: str = "_saved_dim") -> int:
    return _signed(int(getattr(node, attribute))) % max(rank, 1)


def _reshaped(out: list[int], dim: int, inp: list[int], batch: int) -> int | None:
    """The dimension of ``inp`` that a reshape to ``out`` made ``out[dim]`` of: the one
    after the same leading elements, holding the samples too (``k`` per sample)."""
    lead, at = math.prod(out[:dim]), 0
    while at < len(inp) and (math.prod(inp[:at]) < lead or (inp[at] == 1 != out[dim])):
        at += 1  # (past dimensions of size 1 that a squeeze or unsqueeze added)
    if at < len(inp) and math.prod(inp[:at]) == lead and inp[at] % batch == 0:
        return at if out[dim] % batch == 0 else None
    return None


def _row_map(node: Node, where: int, inp: list[int], batch: int) -> Tensor | None:
    """``map`` of an index on the samples' dimension ``where`` of a parent of ``batch`` of
    them that takes ``batch`` again (``out[r] = in[map[r]]``: a permutation, or the identity
    of ``h[torch.arange(B), last]``); ``None`` otherwise."""
    if type(node).__name__ == "IndexSelectBackward0":
        index = node._saved_index  # type: ignore[attr-defined]
    else:
        index = node._saved_indices[where]  # type: ignore[attr-defined]
    if inp[where] != batch or index.dtype == torch.bool or index.numel() != batch:
        return None
    return index.reshape(-1).cpu() if index.shape[0] == batch else None


Step = tuple[int | None, Tensor | None, Moved | None]
"""Where the samples' dimension is in a parent's output (``None``: not followed), the
rows an index took from it, and what moved them."""


def _transposed(node: Node, dim: int, inp: list[int], batch: int) -> Step:
    rank = len(inp)
    if type(node).__name__ == "TBackward0":  # ``.t()`` of a matrix
        return (1 - dim if rank == 2 else dim), None, None
    a, b = _dim(node, rank, "_saved_dim0"), _dim(node, rank, "_saved_dim1")
    return (b if dim == a else a if dim == b else dim), None, None


def _permuted(node: Node, dim: int, inp: list[int], batch: int) -> Step:
    return _signed(int(node._saved_dims[dim])) % len(inp), None, None  # type: ignore[attr-defined]


def _dropped(node: Node, dim: int, inp: list[int], batch: int) -> Step:
    """``select`` / ``unbind`` removed a dimension (the output's samples are after it or
    before it); ``stack`` added one (the samples' own: not followed)."""
    if type(node).__name__ == "StackBackward0":
        at = _dim(node, len(inp) + 1)
        return (None if at == dim else dim - (at < dim)), None, None
    return dim + (_dim(node, len(inp)) <= dim), None, None


def _indexed(node: Node, dim: int, inp: list[int], batch: int) -> Step:
    name = type(node).__name__
    indexed = [i for i, ix in enumerate(node._saved_indices) if ix is not None]  # type: ignore[attr-defined]
    if not indexed or min(indexed) > dim:
        return dim, None, None
    if name == "IndexBackward0" and indexed[0] == dim:
        rows = _row_map(node, dim, inp, batch)
        return (dim, rows, None) if rows is not None else (None, None, name)
    return None, None, (name if dim in indexed else None)


def _on_dim(node: Node, dim: int, inp: list[int], batch: int) -> Step:
    """An operation along one dimension: it moves the samples' rows when it is theirs."""
    name = type(node).__name__
    if _dim(node, len(inp)) != dim:
        return dim, None, None
    if name == "IndexSelectBackward0":
        rows = _row_map(node, dim, inp, batch)
        return (dim, rows, None) if rows is not None else (None, None, name)
    if name == "SliceBackward0":
        start, step = int(node._saved_start), int(node._saved_step)  # type: ignore[attr-defined]
        if start == 0 and step == 1 and _signed(int(node._saved_end)) >= inp[dim]:  # type: ignore[attr-defined]
            return dim, None, None
    return None, None, name


def _along(node: Node, dim: int, inp: list[int], batch: int) -> Step:
    """``flip`` / ``roll`` (all dimensions when none is given), ``repeat``, ``masked_select``."""
    name = type(node).__name__
    if name == "RepeatBackward0":
        repeats = [int(r) for r in node._saved_repeats]  # type: ignore[attr-defined]
        at = dim + len(repeats) - len(inp)  # its repeats may add leading dimensions
        return (dim, None, None) if repeats[at] == 1 else (None, None, name)
    if name == "MaskedSelectBackward0":
        return None, None, name
    dims = [_signed(int(d)) % len(inp) for d in node._saved_dims]  # type: ignore[attr-defined]
    return (dim, None, None) if dims and dim not in dims else (None, None, name)


_RULES = {
    "TransposeBackward0": _transposed,
    "TBackward0": _transposed,
    "PermuteBackward0": _permuted,
    "SelectBackward0": _dropped,
    "UnbindBackward0": _dropped,
    "StackBackward0": _dropped,
    "IndexBackward0": _indexed,
    "IndexPutBackward0": _indexed,
    "IndexSelectBackward0": _on_dim,
    "SliceBackward0": _on_dim,
    **dict.fromkeys(_ON_DIM, _on_dim),
    **dict.fromkeys(("FlipBackward0", "RollBackward0", "RepeatBackward0"), _along),
    "MaskedSelectBackward0": _along,
}


def _parent_dim(
    node: Node, out: list[int], dim: int, edge: int, inp: list[int], batch: int
) -> Step:
    """Where the samples' dimension ``dim`` of ``node``'s output (shape ``out``) is in its
    parent ``edge``'s output (shape ``inp``), by the rules of the operations that move
    dimensions or rows; a reshape keeps it after the same leading elements; an
    element-wise operation (anything else) where the shapes, aligned from the right,
    agree. A move counts only on a parent dimension that holds the samples."""
    name = type(node).__name__
    if not inp:
        return None, None, None
    if name in _RESHAPES:
        return _reshaped(out, dim, inp, batch), None, None
    if name == "MmBackward0" and edge == 1 and dim == 0:  # P @ h: h's rows mixed
        return None, None, (name if inp[0] % batch == 0 else None)
    rule = _RULES.get(name)
    if rule is not None:
        at, rows, moved = rule(node, dim, inp, batch)
        if moved is not None and dim < len(inp) and inp[dim] % batch:
            return None, None, None  # not the samples' rows that moved
        return at, rows, moved
    shift = len(out) - len(inp)  # broadcast from the right
    if 0 <= dim - shift < len(inp) and inp[dim - shift] == out[dim]:
        return dim - shift, None, None
    return None, None, None


def _parents(node: Node) -> list[tuple[int, Node, int]]:
    return [
        (edge, parent, nr)
        for edge, (parent, nr) in enumerate(node.next_functions)
        if parent is not None and type(parent).__name__ != "AccumulateGrad"
    ]


def _reaches(node: Node, stops: Collection[Node]) -> bool:
    """Whether an earlier layer's output (``stops``) is among ``node``'s inputs' history."""
    stack, seen = [node], {node}
    while stack and len(seen) <= _WALK:
        for _, parent, _ in _parents(stack.pop()):
            if parent in stops:
                return True
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return len(seen) > _WALK  # not proved apart from the layers: counted as reaching one


def moved_rows(inputs: Tensor, stops: Collection[Node], batch: int) -> str | None:
    """What moved the ``batch`` samples' rows between an earlier layer's output (``stops``:
    their nodes) and ``inputs`` (samples first), or ``None``. The walk follows the samples'
    dimension back through the graph (a transpose or permute moves it to another
    dimension, a reshape keeps it where the leading elements match, an element-wise
    operation where the shapes do) and stops following a path where it cannot tell (a
    walk longer than :data:`_WALK` nodes stops without a finding). Indexes that take
    ``batch`` rows of ``batch`` are composed along the path: one that ends at an earlier
    layer as the identity moved nothing (a sort undone, as
    ``pack_padded_sequence(enforce_sorted=False)``'s; ``h[torch.arange(B), last]``)."""
    node = inputs.grad_fn
    if node is None or node in stops:
        return None
    State = tuple[Node, int, int, "Tensor | None"]
    stack: list[State] = [(node, inputs.output_nr, 0, None)]  # None: no row moved yet
    seen: set[tuple[Node, int, int, tuple[int, ...] | None]] = set()
    while stack and len(seen) <= _WALK:
        node, nr, dim, rows = stack.pop()
        out = _shape(node, nr) or list(inputs.shape)
        for edge, parent, parent_nr in _parents(node):
            inp = _shape(parent, parent_nr)
            at, taken, moved = _parent_dim(node, out, dim, edge, inp, batch)
            if moved is not None and _reaches(node, stops):
                return moved
            if at is None:
                continue
            path = rows  # out[r] = in[map[r]], read from the layer back:
            if taken is not None:
                path = taken if rows is None else taken[rows]
            if parent in stops:
                if path is not None and not torch.equal(path, torch.arange(batch)):
                    return "rows permuted by indexing"
                continue
            key = (parent, parent_nr, at, None if path is None else tuple(path.tolist()))
            if key not in seen:
                seen.add(key)
                stack.append((parent, parent_nr, at, path))
    return None
