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
nothing: every layer sees the data's order. Indexes, slices and the pieces of
concatenations and splits are carried along the path, through reshapes that regroup the
rows too (``r // k`` where ``k`` rows were merged: a token picked from ``[B·T]`` rows is
its sample's row), and a path on which the rows end at their samples moved nothing (a
sort undone, the last token of each sample picked).

Not seen (the README lists them): the samples split over several dimensions and moved
there (``h.view(2, N // 2, D).flip(0)``), samples stacked one at a time in another order,
in-place copies into slices of a buffer, linear algebra other than a 2-D ``P @ h``
(``einsum``, ``bmm``, ``solve``, sparse), windows over the samples, a time-major tensor
with as many positions as samples (a dimension followed by a coincidence of sizes is let
go at the earlier layer: the walk never refuses on a guess), a ``torch.compile``d graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import Node

from .row_ops import node_shape, signed

__all__ = ["moved_rows", "reaches", "reduced_dim", "transposed_dim"]

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
        "TopkBackward0",
        "SortBackward0",
        "IndexReduceBackward0",
    }
)
_SUMMING = frozenset(  # operations that add rows into others (a graph's message passing)
    {
        "IndexAddBackward0",
        "ScatterAddBackward0",
        "ScatterReduceBackward0",
        "IndexReduceBackward0",
        "IndexPutBackward0",
    }
)
Moved = str  # the name of what moved the rows


class Context(NamedTuple):
    """What an operation's rule needs beyond its node: the batch, which input (``edge``)
    the walk goes to and the shapes of all of them, and which output it came from."""

    batch: int
    edge: int
    inputs: list[list[int]]
    output_nr: int


def _dim(node: Node, rank: int, attribute: str = "_saved_dim") -> int:
    return signed(int(getattr(node, attribute))) % max(rank, 1)


def _reshaped(out: list[int], dim: int, inp: list[int], batch: int) -> int | None:
    """The dimension of ``inp`` that a reshape to ``out`` made ``out[dim]`` of: the one
    after the same leading elements, holding the samples too (``k`` per sample)."""
    lead, at = math.prod(out[:dim]), 0
    while at < len(inp) and (math.prod(inp[:at]) < lead or (inp[at] == 1 != out[dim])):
        at += 1  # (past dimensions of size 1 that a squeeze or unsqueeze added)
    if at < len(inp) and math.prod(inp[:at]) == lead and inp[at] % batch == 0:
        return at if out[dim] % batch == 0 else None
    return None


Rows = Callable[[Tensor], tuple["Tensor | None", Tensor]]
"""What an operation on the samples' dimension does to the rows followed: from the rows
``C`` of its output, ``(which of them come from this parent or None for all, their rows
in the parent)``."""
Step = tuple["int | None", "Rows | None", "Moved | None"]
"""Where the samples' dimension is in a parent's output (``None``: not followed), what
the operation did to its rows, and what moved them (a gather, a scatter, a flip)."""


def _index_rows(index: Tensor, size: int) -> Rows | None:
    """``out[r] = in[index[r]]`` for a 1-D integer index (or one column) into ``size`` rows,
    else ``None``."""
    if index.dtype == torch.bool or index.dim() == 0 or index.shape[1:].numel() != 1:
        return None
    taken = index.reshape(-1).cpu()
    taken = torch.where(taken < 0, taken + size, taken)  # rows counted from the end
    return lambda rows: (None, taken[rows])


def _shifted(start: int, step: int = 1) -> Rows:
    return lambda rows: (None, start + step * rows)


def _piece(offset: int, size: int) -> Rows:
    """The rows of one input of a concatenation (``offset`` to ``offset + size``)."""

    def rows_of(rows: Tensor) -> tuple[Tensor | None, Tensor]:
        keep = (rows >= offset) & (rows < offset + size)
        return keep, rows[keep] - offset

    return rows_of


def transposed_dim(node: Node, dim: int, rank: int) -> int:
    """The input dimension that a ``transpose``, ``.t()`` or ``permute`` (of ``rank``
    dimensions) made dimension ``dim`` of its output."""
    if type(node).__name__ == "TBackward0":  # ``.t()`` of a matrix
        return 1 - dim if rank == 2 else dim
    if type(node).__name__ == "PermuteBackward0":
        return signed(int(node._saved_dims[dim])) % rank  # type: ignore[attr-defined]
    a, b = _dim(node, rank, "_saved_dim0"), _dim(node, rank, "_saved_dim1")
    return b if dim == a else a if dim == b else dim


def _transposed(node: Node, dim: int, inp: list[int], at: Context) -> Step:
    return transposed_dim(node, dim, len(inp)), None, None


def _dropped(node: Node, dim: int, inp: list[int], at: Context) -> Step:
    """``select`` / ``unbind`` removed a dimension (the output's samples are after it or
    before it); ``stack`` added one (the samples' own: not followed)."""
    if type(node).__name__ == "StackBackward0":
        where = _dim(node, len(inp) + 1)
        return (None if where == dim else dim - (where < dim)), None, None
    return dim + (_dim(node, len(inp)) <= dim), None, None


def _indexed(node: Node, dim: int, inp: list[int], at: Context) -> Step:
    name = type(node).__name__
    indices = node._saved_indices  # type: ignore[attr-defined]
    indexed = [i for i, ix in enumerate(indices) if ix is not None]
    if not indexed or min(indexed) > dim:
        return dim, None, None
    if name == "IndexBackward0" and indexed[0] == dim:
        rows = _index_rows(indices[dim], inp[dim])
        return (dim, rows, None) if rows is not None else (None, None, name)
    return None, None, (name if dim in indexed else None)


def _on_dim(node: Node, dim: int, inp: list[int], at: Context) -> Step:
    """An operation along one dimension: on the samples' one it takes rows (an index, a
    slice, a piece of a concatenation or of a split, followed) or moves them."""
    name = type(node).__name__
    if _dim(node, len(inp)) != dim:
        return dim, None, None
    if name == "IndexSelectBackward0":
        rows = _index_rows(node._saved_index, inp[dim])  # type: ignore[attr-defined]
        return (dim, rows, None) if rows is not None else (None, None, name)
    if name == "SliceBackward0":  # (every row, in order: nothing taken)
        bounds = (node._saved_start, node._saved_end, node._saved_step)  # type: ignore[attr-defined]
        taken = range(
            *slice(*(None if b is None else signed(int(b)) for b in bounds)).indices(inp[dim])
        )
        return dim, (None if taken == range(inp[dim]) else _shifted(taken.start, taken.step)), None
    if name in ("SplitBackward0", "SplitWithSizesBackward0"):
        sizes = (
            [int(node._saved_split_size)] * (at.output_nr + 1)  # type: ignore[attr-defined]
            if name == "SplitBackward0"
            else [int(n) for n in node._saved_split_sizes]  # type: ignore[attr-defined]
        )
        return dim, _shifted(sum(sizes[: at.output_nr])), None
    if name == "CatBackward0":
        sizes = [shape[dim] if len(shape) > dim else -1 for shape in at.inputs]
        if min(sizes) >= 0:  # every piece's rows known
            return dim, _piece(sum(sizes[: at.edge]), sizes[at.edge]), None
    return None, None, name


def _along(node: Node, dim: int, inp: list[int], at: Context) -> Step:
    """``flip`` / ``roll`` (all dimensions when none is given), ``repeat``, ``masked_select``."""
    name = type(node).__name__
    if name == "RepeatBackward0":
        repeats = [int(r) for r in node._saved_repeats]  # type: ignore[attr-defined]
        where = dim + len(repeats) - len(inp)  # its repeats may add leading dimensions
        return (dim, None, None) if repeats[where] == 1 else (None, None, name)
    if name == "MaskedSelectBackward0":
        return None, None, name
    dims = [signed(int(d)) % len(inp) for d in node._saved_dims]  # type: ignore[attr-defined]
    return (dim, None, None) if dims and dim not in dims else (None, None, name)


_RULES: dict[str, Callable[[Node, int, list[int], Context], Step]] = {
    "TransposeBackward0": _transposed,
    "TBackward0": _transposed,
    "PermuteBackward0": _transposed,
    "SelectBackward0": _dropped,
    "UnbindBackward0": _dropped,
    "StackBackward0": _dropped,
    "IndexBackward0": _indexed,
    "IndexPutBackward0": _indexed,
    "IndexSelectBackward0": _on_dim,
    "SliceBackward0": _on_dim,
    "SplitBackward0": _on_dim,
    "SplitWithSizesBackward0": _on_dim,
    **dict.fromkeys(_ON_DIM, _on_dim),
    **dict.fromkeys(
        ("FlipBackward0", "RollBackward0", "Rot90Backward0", "RepeatBackward0"), _along
    ),
    "MaskedSelectBackward0": _along,
}


def _parent_dim(node: Node, out: list[int], dim: int, inp: list[int], at: Context) -> Step:
    """Where the samples' dimension ``dim`` of ``node``'s output (shape ``out``) is in its
    parent ``at.edge``'s output (shape ``inp``), by the rules of the operations that move
    dimensions or rows; a reshape keeps it after the same leading elements; an
    element-wise operation (anything else) where the shapes, aligned from the right,
    agree. A move counts only on a parent dimension that holds the samples."""
    name = type(node).__name__
    if not inp:
        return None, None, None
    if name in _RESHAPES:
        return _reshaped(out, dim, inp, at.batch), None, None
    if dim == 0 and (name, at.edge) in (("MmBackward0", 1), ("AddmmBackward0", 2)):
        return None, None, (name if inp[0] % at.batch == 0 else None)  # P @ h: rows mixed
    rule = _RULES.get(name)
    if rule is not None:
        where, rows, moved = rule(node, dim, inp, at)
        if moved is not None and dim < len(inp) and inp[dim] % at.batch:
            if name not in _SUMMING or out[dim] % at.batch:
                return None, None, None  # not the samples' rows that moved
            # rows of another count summed into the samples' rows: a graph's E messages
        return where, rows, moved
    if hasattr(node, "_saved_keepdim"):  # a reduction (sum, mean, amax, std, norm, …)
        return reduced_dim(node, dim, inp), None, None
    shift = len(out) - len(inp)  # broadcast from the right (not a reduction: fewer dims)
    if 0 <= shift and 0 <= dim - shift < len(inp) and inp[dim - shift] == out[dim]:
        return dim - shift, None, None
    if shift and dim == 0 and inp[0] == out[0]:  # unfold, im2col, diag_embed, complex views
        return 0, None, None
    return None, None, None


def reduced_dim(node: Node, dim: int, inp: list[int]) -> int | None:
    """The input dimension of a reduction's output dimension ``dim`` (``keepdim`` or not);
    ``None`` where the samples' own dimension was reduced."""
    saved = getattr(node, "_saved_dim", ())
    dims = {signed(int(d)) % len(inp) for d in (saved if isinstance(saved, tuple) else (saved,))}
    if node._saved_keepdim:  # type: ignore[attr-defined]
        return None if dim in dims else dim
    kept = [d for d in range(len(inp)) if d not in dims]
    return kept[dim] if dim < len(kept) else None


def _parents(node: Node) -> list[tuple[int, Node, int]]:
    return [
        (edge, parent, nr)
        for edge, (parent, nr) in enumerate(node.next_functions)
        if parent is not None and type(parent).__name__ != "AccumulateGrad"
    ]


def reaches(node: Node, stops: Collection[Node]) -> bool:
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


def _moved(here: Tensor, of: int, there: Tensor, rows: int, batch: int) -> bool:
    """Whether the rows ``here`` of a tensor of ``of`` rows, found at rows ``there`` of an
    earlier layer's output of ``rows``, moved: compared as samples where both counts are
    ``k`` per sample (a token picked per sample from ``[B·T]`` rows is its sample's row),
    else row for row."""
    if of % batch == 0 and rows % batch == 0 and of and rows:
        return not torch.equal(here // (of // batch), there // (rows // batch))
    return not torch.equal(here, there)


Carried = tuple["Tensor | None", "Tensor | None", int]
"""The input rows followed, their rows in the tensor the walk is at, and the rows of the
tensor the input rows count (where they were first followed)."""


def _carried(
    here: Tensor | None, there: Tensor | None, of: int, taken: Rows | None, size: int, parent: int
) -> Carried | None:
    """The rows followed from a node's output (``size`` rows) to its parent's (``parent``),
    ``None`` where the path is let go (none left). A reshape that regroups the rows maps
    row ``r`` to ``r // k`` where ``k`` rows were merged (``[B, T, D] → [B·T, D]``), to the
    first ``r·k`` of the ``k`` it was split into; by a count that divides neither, let go."""
    if there is not None and parent != size and taken is None:
        if size % parent and parent % size:
            return None
        there = there // (size // parent) if size % parent == 0 else there * (parent // size)
    if taken is not None:  # out[r] = in[f(r)], read from the layer back
        if there is None:
            here, there, of = torch.arange(size), torch.arange(size), size
        keep, there = taken(there)
        here = here if keep is None else here[keep]  # type: ignore[index]
        if not len(there):
            return None
    return here, there, of


def moved_rows(inputs: Tensor, stops: Collection[Node], batch: int) -> str | None:
    """What moved the ``batch`` samples' rows between an earlier layer's output (``stops``:
    their nodes) and ``inputs`` (samples first), or ``None``. The walk follows the samples'
    dimension back through the graph (a transpose or permute moves it to another
    dimension, a reshape keeps it where the leading elements match, an element-wise
    operation where the shapes do) and stops following a path where it cannot tell (a
    walk longer than :data:`_WALK` nodes stops without a finding). Along a path it carries
    which rows of the input come from which rows of the tensor it is at (indexes, slices,
    pieces of concatenations and splits): a path that reaches an earlier layer's output
    with every row where it was moved nothing (a sort undone, as
    ``pack_padded_sequence(enforce_sorted=False)``'s; ``h[torch.arange(B), last]``; a
    recurrent state gathered from its time steps)."""
    node = inputs.grad_fn
    if node is None or node in stops:
        return None
    # (node, its output followed, samples' dimension, input rows, their rows here, and the
    # rows of the tensor the input rows count: where the rows were first followed)
    stack: list[tuple[Node, int, int, Tensor | None, Tensor | None, int]] = [
        (node, inputs.output_nr, 0, None, None, 0)  # None, None: every row, in place
    ]
    seen: set[tuple[object, ...]] = set()
    while stack and len(seen) <= _WALK:
        node, nr, dim, layer, rows, counted = stack.pop()
        out = node_shape(node, nr) or list(inputs.shape)
        shapes = [node_shape(parent, n) for parent, n in node.next_functions]
        for edge, parent, parent_nr in _parents(node):
            inp = shapes[edge]
            at, taken, moved = _parent_dim(node, out, dim, inp, Context(batch, edge, shapes, nr))
            if moved is not None and (parent in stops or reaches(parent, stops)):
                return moved  # (rows of data, not of parameters alone, were moved)
            if at is None:
                continue
            if (carried := _carried(layer, rows, counted, taken, out[dim], inp[at])) is None:
                continue
            here, there, of = carried
            if parent in stops:
                if at == 0 and there is not None and _moved(here, of, there, inp[0], batch):  # type: ignore[arg-type]
                    return "rows moved by indexing, slicing or concatenating"
                continue  # (another dimension: a size that happened to match, let go)
            key = (
                parent,
                parent_nr,
                at,
                *(None if t is None else tuple(t.tolist()) for t in (here, there)),
            )
            if key not in seen:
                seen.add(key)
                stack.append((parent, parent_nr, at, here, there, of))
    return None
