"""Whether the first dimension of a tensor reshaped inside ``forward`` is the batch: a
first dimension of ``N`` entries may be another one moved first (a time-major sequence of
``T = N`` positions: ``tanh(h.transpose(0, 1)).reshape(T * N, D)``), whose rows a proof by
its size alone would regroup into the wrong samples, silently (1.7–3.0 off in a review,
before 2026-12-10). The dimension is followed back through autograd's graph instead
(:func:`batch_first_reshape`). Where the walk cannot follow it, it takes the dimension
for the batch if it is the first there (as the proof by size did), and refuses it if not.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from torch import Tensor, nn

from .data_layout import data_dim_is_batch, recurrent_on_data
from .row_ops import (
    DROPS,
    REORDERS,
    RESHAPES,
    SLICES,
    moves_rows,
    node_shape,
    picks_rows,
    placed_along,
    reorders_along,
    signed,
)
from .row_order import reduced_dim, transposed_dim
from .written_slices import written_dims

if TYPE_CHECKING:
    from torch.autograd.graph import Node

    from .forward_pass import ForwardPass

__all__ = ["batch_first_reshape", "first_is_batch", "leads_to_batch"]

_WALK = 1024  # (node, dimension) pairs looked at, at most
_TRANSPOSES = frozenset(
    {"TransposeBackward0", "TransposeBackward1", "PermuteBackward0", "TBackward0"}
)
_SHAPED = RESHAPES | {  # (their dimensions followed by shape, as a reshape's)
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "UnsqueezeBackward0",
}
_ROWS_OF = {"MmBackward0": 0, "AddmmBackward0": 1}  # (an output's rows: this operand's)
_BATCHED = {"BmmBackward0": (0, 1), "BaddbmmBackward0": (1, 2)}  # (its two operands' edges)
_OPAQUE = frozenset({"AsStridedBackward0", "AsStridedBackward1"})
Path = tuple["Node", int]  # a node, and the dimension of its output followed
Parents = list[Path] | Literal[False] | None
Track = tuple["Node", int, int]  # and the batch's stride inside that dimension (merged)


def batch_first_reshape(node: Node, forward: ForwardPass) -> bool:
    """Whether a reshape node's input has the batch first: ``N`` entries first (its saved
    sizes), and on every path back through autograd's graph that dimension, followed
    through transposes, permutes, reshapes, squeezes, picks beside it, a ``Linear`` or
    ``Embedding`` (layer output to layer input), a product's rows and operations that keep it
    (:func:`_parents`), is the first one where the path ends: a layer's output, the data,
    an operation that does not tell (the proof by size before 2026-12-10 took every first
    dimension of ``N`` entries for the batch), or a recurrent op's time steps stacked
    (``nn.GRU``'s ``[T, N, H]``: the second). A path ending at another dimension (a
    time-major tensor, a layer's output with its batch moved away) refuses the proof.
    ``nn.LSTM(batch_first=True)``'s ``[B, T, H] → [T, B, H] → rnn → [B, T, H]`` is proved
    at any ``T`` (the rnn keeps its input's dimensions); before 2026-12-10 only where
    ``T ≠ N``. Past :data:`_WALK` pairs (a deep residual stream) the paths still open are
    taken as proved where they follow the first dimension, as the proof by size did. The
    pairs found leading to the batch are kept for the forward's other layers
    (``forward.batch_led``)."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if not sizes or int(sizes[0]) != forward.batch_size:
        return False
    return leads_to_batch(node.next_functions[0][0] if node.next_functions else None, forward)


def first_is_batch(inputs: Tensor, forward: ForwardPass) -> bool:
    """Whether a layer input's first dimension is (the major part of) the batch, as
    :func:`batch_first_reshape` follows it: ``False`` for a time-major ``[T, N, D]`` made
    inside ``forward`` or a view of the model's first argument that moved its first
    dimension (``x.transpose(0, 1)``), ``True`` where not told."""
    inner = max(1, len(inputs) // forward.batch_size)  # (k·N rows first: sample-major)
    if inputs.grad_fn is not None:
        return leads_to_batch(inputs.grad_fn, forward, inner)
    return data_dim_is_batch(inputs, 0, forward.first, inner) is not False


def leads_to_batch(
    parent: Node | None, forward: ForwardPass, inner: int = 1, dim: int = 0, strict: bool = False
) -> bool:
    """Whether dimension ``dim`` of ``parent``'s output leads to the batch on every path
    (:func:`batch_first_reshape`), the batch's entries ``inner`` apart in it (``k`` for
    ``k·N`` rows sample-major). Through a reshape the batch is followed as a factor of a
    merged dimension (``nn.MultiheadAttention``'s ``[T, N, E] → [T·N, E] → Linear → [T, N,
    E]``: the batch the minor factor, :func:`_regrouped`). ``strict``: a path that ends at
    a layer output's features (its last dimension) does not lead to the batch."""
    stack: list[Track] = [] if parent is None else [(parent, dim, inner)]
    seen = set(stack)
    while stack:
        if len(seen) > _WALK:
            return all(dim == 0 for _, dim, _ in stack)
        here, dim, inner = stack.pop()
        if (here, dim, inner) in forward.batch_led:
            continue
        parents: list[Track] | Literal[False] | None
        name, batch = type(here).__name__, forward.batch_size
        shape = node_shape(here, 0)
        merged = shape[dim : dim + 1] != [batch]  # (the batch one factor of it)
        if name in _SHAPED and here not in forward.per_sample and here not in forward.ordered:
            parents = _regrouped(here, dim, inner, batch)
        elif placed_along(here, name, dim) or (merged and reorders_along(here, name, dim)):
            parents = None  # (rows placed or picked by an index: a permutation put back)
        else:
            found = _parents(here, dim, forward, inner, strict)
            parents = (
                found if found is None or found is False else [(p, d, inner) for p, d in found]
            )
        ends_off = dim or shape[:1] > [batch * inner]  # (the batch minor there)
        if parents is False or (parents is None and ends_off):
            return False
        for track in parents or ():
            if track not in seen:
                seen.add(track)
                stack.append(track)
    forward.batch_led |= seen
    return True


def _parents(
    node: Node, dim: int, forward: ForwardPass, inner: int = 1, strict: bool = False
) -> Parents:
    """The inputs of ``node`` to follow dimension ``dim`` of its output into, with where
    that dimension is in each (``[]``: the path ends at the batch; ``None``: it ends at
    ``node``, proving the batch first only where ``dim`` is ``0``; ``False``: refused, as
    a layer output's features are where ``strict``)."""
    name = type(node).__name__
    if node in forward.per_sample or node in forward.ordered:  # (a layer's output)
        return _through_layer(node, dim, forward, inner, strict)
    if name == "AccumulateGrad":  # (a parameter has no batch: the path tells nothing)
        return [] if isinstance(getattr(node, "variable", None), nn.Parameter) else None
    if name == "CopySlices":
        return _copied_slices(node, dim, forward, inner)
    if name in _SPECIAL:
        return _SPECIAL[name](node, dim, forward)
    out = node_shape(node, 0)
    if name in _OPAQUE or not out or not node.next_functions:
        return None
    parent = node.next_functions[0][0]
    if "Rnn" in name or name in _ROWS_OF or name in _BATCHED:
        return _operands(node, name, out, dim, forward)
    if name in _TRANSPOSES:
        if parent is None or dim >= len(out):
            return None
        return [(parent, transposed_dim(node, dim, len(out)))]
    if name in DROPS | SLICES:
        at = signed(int(getattr(node, "_saved_dim", 0)))
        rank = len(out) + (name in DROPS)
        drop = name in DROPS and at % rank <= dim
        return None if parent is None else [(parent, dim + 1 if drop else dim)]
    source = _reduced(node, name, dim)
    if source is not None:
        return None if parent is None else [(parent, source)]
    return _kept(node, name, out, dim)


def _through_layer(node: Node, dim: int, forward: ForwardPass, inner: int, strict: bool) -> Parents:
    """A layer output's dimension ``dim`` in the layer's input (its features, the last
    dimension, are another layer's: not followed, refused where ``strict``)."""
    layer_input, rank = forward.through.get(node), len(node_shape(node, 0))
    if dim >= rank - 1 and strict:
        return False
    if layer_input is None or dim >= rank - 1:  # (another layer's: its first dim the batch)
        return None
    if layer_input.grad_fn is not None:
        return [(layer_input.grad_fn, dim)]
    told = data_dim_is_batch(layer_input, dim, forward.first, inner)
    return [] if told in (None, True) else False


def _operands(node: Node, name: str, out: list[int], dim: int, forward: ForwardPass) -> Parents:
    """Where a recurrent op's or a product's dimension ``dim`` is in its operands: a
    recurrent op keeps its input's sequence and batch dimensions; a product's rows are its
    left operand's (``mm``); ``bmm``'s batch is both operands', its rows the left's and
    its columns the right's."""
    if "Rnn" in name:
        parent = node.next_functions[0][0]
        if parent is None:
            return recurrent_on_data(node, out, dim, forward.batch_size, forward.first)
        return None if dim > 1 else [(parent, dim)]
    if name in _ROWS_OF:
        left = node.next_functions[_ROWS_OF[name]][0]
        return None if left is None or dim else [(left, 0)]
    left, right = (node.next_functions[i][0] for i in _BATCHED[name])
    follow = [left] if dim == 1 else [right] if dim == 2 else [left, right]
    return [(p, dim) for p in follow if p is not None]


def _kept(node: Node, name: str, out: list[int], dim: int) -> list[Path] | None:
    """The inputs of an operation of another kind that keep dimension ``dim`` where it is:
    of the output's shape (an elementwise op, a norm, attention's output), else of its
    rank with the same size there (a ``pad``, ``repeat``, ``gather`` or broadcast op along
    other dimensions), or every piece of a ``cat``; ``None`` where none does."""
    edges = [(p, node_shape(p, n)) for p, n in node.next_functions if p is not None]
    same = [(p, dim) for p, shape in edges if shape == out]
    if same:
        return same
    kept = [
        (p, dim)
        for p, shape in edges
        if len(shape) == len(out) and (shape[dim] == out[dim] or name == "CatBackward0")
    ]
    return kept or None


def _reduced(node: Node, name: str, dim: int) -> int | None:
    """The input's dimension that a reduction over other dimensions (``sum(-1)``, ``amax``)
    or an ``unfold`` made dimension ``dim`` of its output; ``None`` for another op."""
    if name == "UnfoldBackward0":
        return dim if dim != signed(int(getattr(node, "_saved_dimension", -1))) else None
    saved = getattr(node, "_saved_dim", None)
    if getattr(node, "_saved_keepdim", None) is None or not isinstance(saved, tuple):
        return None
    inp = node_shape(node.next_functions[0][0], node.next_functions[0][1])
    return reduced_dim(node, dim, inp) if inp else None


def _regrouped(node: Node, dim: int, inner: int, batch: int) -> list[Track] | None:
    """Where a reshape's (or a squeeze's) input holds the batch that its output holds in
    dimension ``dim``, ``inner`` apart: the input's dimension holding the whole factor of
    ``batch`` entries at the same flat stride, and its entries' stride in it (the same
    dimension; one merged into it, as the major or the minor factor; one split out of
    it); ``None`` where the factor is split across the input's dimensions, or the
    reshape's input has no graph."""
    parent, nr = node.next_functions[0] if node.next_functions else (None, 0)
    before, after = node_shape(parent, nr), node_shape(node, 0)
    if parent is None or not before or dim >= len(after):
        return None
    stride, tail = inner * math.prod(after[dim + 1 :]), 1  # (the batch's flat stride)
    for at in reversed(range(len(before))):
        if stride % tail == 0 and tail <= stride and stride * batch <= tail * before[at]:
            return [(parent, at, stride // tail)]
        tail *= before[at]
    return None


def _stacked(stack: Node, dim: int, forward: ForwardPass) -> Parents:
    """Where a stack's dimension ``dim`` is in the tensors stacked: one of theirs (the
    batch itself where they are a recurrent op's time steps: ``nn.GRU``'s ``[T, N, H]``;
    refused where one is rows picked by an index along it, each in its own order:
    ``h[perm_t, t]``); the stacked one refused where a tensor is a position picked beside
    the rows (``torch.stack([h[:, t] for t in range(T)])`` at ``T = N``), followed into
    the source where every tensor is its row ``i`` (``torch.stack([h[i] …])``, a
    per-sample loop), refused where each holds the batch (an RNN's steps ``stack(outs)``,
    2.8 off at ``T = N`` in a review; merged, ``[v_t.view(N·D) …]``, 0.99 off before
    2026-12-12), else ended there (``torch.stack([f(x[i]) …])``)."""
    rank = len(node_shape(stack, 0))
    made = signed(int(getattr(stack, "_saved_dim", 0))) % max(rank, 1)
    parents = [parent for parent, _ in stack.next_functions]
    if dim != made:
        item = dim if dim < made else dim - 1
        if made == 0 and item == 0 and _steps(stack):
            return []
        if any(picks_rows(p, item) for p in parents):
            return False
        return [(parent, item) for parent in parents if parent is not None]
    picked = [_picked_row(p) for p in parents]
    if any(row is False for row in picked):
        return False
    sources = {row[0] for row in picked if row}
    if len(sources) == 1 and [row[1] for row in picked if row] == list(range(len(parents))):
        return [(sources.pop(), 0)]
    items = [parent for parent in parents if parent is not None]
    if items and all(
        leads_to_batch(it, forward) or _holds_batch(it, node_shape(it, 0), forward, None)
        for it in items
    ):
        return False  # (each holds the batch: torch.stack(outs); merged: [v_t.view(N·D) …])
    return []


def _rotated(node: Node, dim: int, forward: ForwardPass) -> Parents:
    """A ``rot90``'s input dimension of its output's ``dim``: refused where it rotates it."""
    rank = max(len(node_shape(node, 0)), 1)
    dims = [signed(int(d)) % rank for d in node._saved_dims]  # type: ignore[attr-defined]
    parent = node.next_functions[0][0]
    return False if dim in dims else None if parent is None else [(parent, dim)]


def _packed(node: Node, dim: int, forward: ForwardPass) -> Parents:
    """A packed sequence's rows (each time step's samples, packed): the padded input's
    batch dimension."""
    padded = node.next_functions[0][0] if node.next_functions else None
    rows = 0 if getattr(node, "_saved_batch_first", False) else 1
    return None if padded is None or dim else [(padded, rows)]


def _copied_slices(node: Node, dim: int, forward: ForwardPass, inner: int) -> Parents:
    """A write into part of a tensor (:func:`~.written_slices.written_dims`): followed into
    the tensor written into and each value holding ``dim`` whole; a value written into one
    entry or a run of it ends the walk there (``out[i] = f(x[i])``, a per-sample loop; a
    packed sequence's shorter steps), refused where it holds the batch: first, where the
    shapes placed it, in any other dimension where the backward did (a loop's time steps
    written, as :func:`_stacked` refuses them stacked; a run of a merged dimension, its
    batch ``inner`` apart, holding the batch along the run too: time-major rows written in
    slices, ``rows[t·N:(t + 1)·N] = h_t``); where the backward placed row ``i``
    of a source into entry ``j``, followed into the source where ``i = j``, else refused.
    Refused where a value is not placed or the backward cannot tell (a time-major ``[T, N,
    D]`` buffer filled by ``buf[t] = h_t``, ``buf[t:t + 1] = h_t[None]``, a ``narrow`` or in
    halves at ``T = N`` was taken for a batch-first one: 0.55–7.2 off a step in two
    reviews, before 2026-12-11)."""
    where = written_dims(node, dim)
    if where is None:
        return False
    whole, follow = node_shape(node, 0)[dim], []
    for parent, shape, at, entry in where:
        if at is not None and shape[at] == whole:
            follow.append((parent, at))
            continue
        if at is None and entry is None:
            return False
        row = _picked_row(parent) if entry is not None and entry >= 0 else None
        if row is False or (row and row[1] != entry):
            return False  # (``buf[t, n] = h[n, t]``: another entry's row)
        if row:
            follow.append((row[0], 0))  # (``out[i] = h[i]``: row i of a source)
            continue
        if _holds_batch(parent, shape, forward, at if inner == 1 else None):
            return False  # (one entry, or a run, of ``dim`` written with the batch: time steps)
    return follow or None


def _holds_batch(
    parent: Node, shape: tuple[int, ...] | list[int], forward: ForwardPass, skip: int | None
) -> bool:
    """Whether a value written into part of a dimension holds the batch in another one of
    its dimensions, whole or as a factor of a merged one (``[N·D]``), as
    :func:`leads_to_batch` follows it (``strict``: a per-sample loop's value, a layer's
    output on ``x[i]``, holds features, not the batch)."""
    batch = forward.batch_size
    for d, n in enumerate(shape):
        if d != skip and n % batch == 0:
            for inner in {n // batch, 1}:
                if leads_to_batch(parent, forward, inner, dim=d, strict=True):
                    return True
    return False


def _resampled(node: Node, dim: int, forward: ForwardPass) -> Parents:
    """``F.grid_sample``'s output: its batch is its input's and its grid's, its channels
    its input's; its spatial dimensions are resampled, refused (a grid transposing
    ``[1, D, N, T]`` moved the batch: 5.0 off a step at ``T = N`` in a review, before
    2026-12-11)."""
    if dim >= 2:
        return False
    image, grid = (parent for parent, _ in node.next_functions[:2])
    return [(p, dim) for p in ([image] if dim else [image, grid]) if p is not None] or None


_SPECIAL = {
    "StackBackward0": _stacked,
    "Rot90Backward0": _rotated,
    "PackPaddedSequenceBackward0": _packed,
    "GridSampler2DBackward0": _resampled,
    "GridSampler3DBackward0": _resampled,
}


def _picked_row(node: Node | None) -> tuple[Node, int] | Literal[False] | None:
    """Which row of which tensor a stacked tensor is (``h[i]``, through operations that
    keep its shape: ``tanh(h[i])``), ``False`` for an entry along another dimension
    (``h[:, t]``), ``None`` where not told (a layer's output on ``x[i]``)."""
    for _ in range(_WALK):
        name = type(node).__name__
        if node is None or not node.next_functions:
            return None
        if name == "SelectBackward0":
            if signed(int(getattr(node, "_saved_dim", 0))) != 0:
                return False
            source = node.next_functions[0][0]
            return None if source is None else (source, int(getattr(node, "_saved_index", -1)))
        shape = node_shape(node, 0)
        same = [p for p, n in node.next_functions if p is not None and node_shape(p, n) == shape]
        if len(same) != 1:
            return None
        node = same[0]
    return None


def _steps(stack: Node) -> bool:
    """Whether a stack's tensors are time steps computed in place (a native ``nn.GRU``'s
    cells), none picked, moved or unbound from rows (``h[perm, t]``, ``x.unbind(0)``)."""
    return all(
        parent is not None
        and type(parent).__name__ not in REORDERS | RESHAPES
        and not moves_rows(parent)
        for parent, _ in stack.next_functions
    )
