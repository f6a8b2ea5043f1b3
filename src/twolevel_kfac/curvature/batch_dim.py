"""Whether the first dimension of a tensor reshaped inside ``forward`` is the batch: a
first dimension of ``N`` entries may be another one moved first (a time-major sequence of
``T = N`` positions: ``tanh(h.transpose(0, 1)).reshape(T * N, D)``), whose rows a proof by
its size alone would regroup into the wrong samples, silently (1.7–3.0 off in a review,
before 2026-12-10). The dimension is followed back through autograd's graph instead
(:func:`batch_first_reshape`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from torch import nn

from .row_ops import REORDERS, RESHAPES, moves_rows
from .row_order import node_shape, signed

if TYPE_CHECKING:
    from torch.autograd.graph import Node

    from .forward_pass import ForwardPass

__all__ = ["batch_first_reshape"]

_WALK = 256  # (node, dimension) pairs looked at, at most
_TRANSPOSES = frozenset(
    {"TransposeBackward0", "TransposeBackward1", "PermuteBackward0", "TBackward0"}
)
_PICKS = frozenset({"SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0"})
_DROPS = frozenset({"SelectBackward0", "UnbindBackward0"})
_OPAQUE = frozenset(  # (their output's dimensions are not one operand's)
    {
        "MmBackward0",
        "AddmmBackward0",
        "BmmBackward0",
        "BaddbmmBackward0",
        "MvBackward0",
        "AddmvBackward0",
        "Rot90Backward0",
        "AsStridedBackward0",
        "AsStridedBackward1",
    }
)
Path = tuple["Node", int]  # a node, and the dimension of its output followed


def batch_first_reshape(node: Node, forward: ForwardPass) -> bool:
    """Whether a reshape node's input has the batch first: ``N`` entries first (its saved
    sizes), and on every path back through autograd's graph that dimension, followed
    through transposes, permutes, reshapes that keep it or merge it with the dimensions
    after it, picks beside it and operations that keep their input's shape
    (:func:`_parents`), is the first one of the tensor the path ends at: a layer's output,
    the data, an operation that does not tell (a product; the status quo before
    2026-12-10: taken as the batch there), or a recurrent op's time steps stacked first
    (``nn.GRU``'s). A path ending at another dimension (a time-major tensor, the batch of
    a layer's output moved away) refuses the proof. ``nn.LSTM(batch_first=True)``'s
    ``[B, T, H] → [T, B, H] → rnn → [B, T, H]`` is proved at any ``T`` (the rnn keeps its
    input's dimensions); before 2026-12-10 only where ``T ≠ N``. Past :data:`_WALK` pairs
    (a deep residual stream) the paths still open are taken as proved where they follow
    the first dimension."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if not sizes or int(sizes[0]) != forward.batch_size:
        return False
    parent = node.next_functions[0][0] if node.next_functions else None
    stack: list[Path] = [] if parent is None else [(parent, 0)]
    seen = set(stack)
    while stack:
        if len(seen) > _WALK:
            return all(dim == 0 for _, dim in stack)
        here, dim = stack.pop()
        parents = _parents(here, dim, forward)
        if parents is False or (parents is None and dim):
            return False
        if parents is None:
            continue
        for path in parents:
            if path not in seen:
                seen.add(path)
                stack.append(path)
    return True


def _parents(node: Node, dim: int, forward: ForwardPass) -> list[Path] | Literal[False] | None:
    """The inputs of ``node`` to follow dimension ``dim`` of its output into, with where
    that dimension is in each (``[]``: the path ends at the batch; ``None``: it ends at
    ``node``, proving the batch first only where ``dim`` is ``0``; ``False``: refused)."""
    name = type(node).__name__
    if node in forward.per_sample or node in forward.ordered:  # (a layer's output)
        return None
    if name == "AccumulateGrad":  # (a parameter has no batch: the path tells nothing)
        return [] if isinstance(getattr(node, "variable", None), nn.Parameter) else None
    if name == "StackBackward0":
        return _stacked(node, dim)
    out = node_shape(node, 0)
    if name in _OPAQUE or not out or not node.next_functions:
        return None
    parent, nr = node.next_functions[0]
    if "Rnn" in name:  # (a recurrent op keeps its input's sequence and batch dimensions)
        return None if parent is None or dim > 1 else [(parent, dim)]
    if name in _TRANSPOSES:
        source = _transposed(node, name, dim, len(out))
        return None if parent is None or source is None else [(parent, source)]
    if name in RESHAPES:
        source = _major(node_shape(parent, nr), out, dim)
        return None if parent is None or source is None else [(parent, source)]
    if name in _DROPS | _PICKS:
        at = signed(int(getattr(node, "_saved_dim", 0)))
        rank = len(out) + (name in _DROPS)
        drop = name in _DROPS and at % rank <= dim
        return None if parent is None else [(parent, dim + 1 if drop else dim)]
    same = [(p, dim) for p, n in node.next_functions if p is not None and node_shape(p, n) == out]
    return same or None


def _transposed(node: Node, name: str, dim: int, rank: int) -> int | None:
    """The input's dimension that a transpose or permute made dimension ``dim`` of."""
    if name == "TBackward0":
        return 1 - dim if rank == 2 else dim
    if name == "PermuteBackward0":
        order = [signed(int(d)) % rank for d in node._saved_dims]  # type: ignore[attr-defined]
        return order[dim] if dim < len(order) else None
    pair = [signed(int(getattr(node, f"_saved_dim{i}"))) % rank for i in (0, 1)]
    return pair[1] if dim == pair[0] else pair[0] if dim == pair[1] else dim


def _major(before: list[int], after: list[int], dim: int) -> int | None:
    """The dimension of a reshape's input ``before`` whose entries are the major part of
    its output's dimension ``dim`` (``after``): the same one, one of the dimensions merged
    into it, the first (``[a, b, D] → [a·b, D]``: ``a``), or the one split into it and the
    dimensions after it (``[a·b, D] → [a, b, D]``); ``None`` where the dimensions before it
    are regrouped too."""
    lead, at, product = 1, 0, 1
    for size in after[:dim]:
        lead *= size
    while at < len(before) and product < lead:
        product *= before[at]
        at += 1
    if product != lead or at >= len(before) or dim >= len(after):
        return None
    return at if before[at] % after[dim] == 0 or after[dim] % before[at] == 0 else None


def _stacked(stack: Node, dim: int) -> list[Path] | Literal[False]:
    """Where a stack's dimension ``dim`` is in the tensors stacked: one of theirs (the
    batch itself where they are a recurrent op's time steps: ``nn.GRU``'s ``[T, N, H]``;
    refused where they are rows gathered, each in its own order);
    the stacked one is the batch only where they are the rows of one tensor picked in
    order (``torch.stack([h[i] for i in range(N)])``), not the positions of a
    batch-first tensor (``torch.stack([h[:, t] for t in range(T)])`` at ``T = N``)."""
    rank = len(node_shape(stack, 0))
    made = signed(int(getattr(stack, "_saved_dim", 0))) % max(rank, 1)
    parents = [parent for parent, _ in stack.next_functions]
    if dim != made:
        item = dim if dim < made else dim - 1
        if _steps(stack):
            return [] if item == 0 else False
        if any(type(p).__name__ in REORDERS - _DROPS - _PICKS for p in parents):
            return False  # (each picked in its own order: h[perm_t, t] for each t)
        return [(parent, item) for parent in parents if parent is not None]
    picks = {  # (each stacked tensor: source, dimension, index)
        (p.next_functions[0][0], signed(int(p._saved_dim)), int(p._saved_index))  # type: ignore[attr-defined]
        for p in parents
        if p is not None and type(p).__name__ == "SelectBackward0" and p.next_functions
    }
    sources = {source for source, _, _ in picks}
    rows = {(at, index) for _, at, index in picks}
    if len(sources) != 1 or rows != {(0, i) for i in range(len(parents))}:
        return False
    source = sources.pop()
    return [] if source is None else [(source, 0)]


def _steps(stack: Node) -> bool:
    """Whether a stack's tensors are time steps computed in place (a native ``nn.GRU``'s
    cells), none picked, moved or unbound from rows (``h[perm, t]``, ``x.unbind(0)``)."""
    return all(
        parent is not None
        and type(parent).__name__ not in REORDERS | RESHAPES
        and not moves_rows(parent)
        for parent, _ in stack.next_functions
    )
