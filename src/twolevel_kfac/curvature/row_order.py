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

The rows are moved by an autograd operation along the first dimension of a tensor that
holds the samples there (``N`` rows, or ``k`` per sample: indexing, gathering, slicing,
concatenating, repeating, flipping, rolling, scattering) between an earlier layer's output
(``forward.per_sample``) and the layer's input. One on parameters alone (a position table
sliced to the length), on another dimension (a transpose only relabels them: attention's
sequence-first internals) or before the first layer (the data) moves nothing: every layer
sees the data's order. A permutation undone before the next layer is refused too.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["moved_rows"]

_WALK = 256  # autograd nodes looked at, at most
_ON_DIM = frozenset(
    {
        "IndexSelectBackward0",
        "GatherBackward0",
        "CatBackward0",
        "IndexAddBackward0",
        "IndexCopyBackward0",
        "ScatterBackward0",
        "ScatterAddBackward0",
        "ScatterReduceBackward0",
    }
)


def _signed(value: int) -> int:
    """A saved ``int64`` dimension as autograd returns it (``-1`` comes back as ``2⁶⁴ − 1``)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _on_first_dim(node: Node) -> bool:
    """Whether the operation of ``node`` takes, moves or puts rows along its input's first
    dimension (a transpose or permute only relabels the dimensions; selecting, splitting
    and stacking change the rows' count, which :func:`~.calls.sample_major` judges)."""
    name, saved = type(node).__name__, node
    if name in _ON_DIM:
        return _signed(int(saved._saved_dim)) == 0  # type: ignore[attr-defined]
    if name in ("IndexBackward0", "IndexPutBackward0"):
        indices = saved._saved_indices  # type: ignore[attr-defined]
        return bool(indices) and indices[0] is not None
    if name == "SliceBackward0":
        rows = int(saved._saved_self_sym_sizes[0])  # type: ignore[attr-defined]
        start, step = int(saved._saved_start), int(saved._saved_step)  # type: ignore[attr-defined]
        full = start == 0 and step == 1 and _signed(int(saved._saved_end)) >= rows  # type: ignore[attr-defined]
        return _signed(int(saved._saved_dim)) == 0 and not full  # type: ignore[attr-defined]
    if name in ("FlipBackward0", "RollBackward0"):
        dims = [_signed(int(d)) for d in saved._saved_dims]  # type: ignore[attr-defined]
        return not dims or 0 in dims
    if name == "RepeatBackward0":
        return int(saved._saved_repeats[0]) != 1  # type: ignore[attr-defined]
    return name == "MaskedSelectBackward0"


def _moves(node: Node, batch: int) -> bool:
    """Whether ``node`` moves rows of a tensor whose first dimension holds the batch's
    samples (``batch`` rows, or ``k`` per sample: its inputs' shapes, from autograd)."""
    if not _on_first_dim(node):
        return False
    for parent, _ in node.next_functions:
        meta = getattr(parent, "_input_metadata", None) if parent is not None else None
        shape = list(getattr(meta[0], "shape", [])) if meta else []
        if shape and int(shape[0]) > 0 and int(shape[0]) % batch == 0:
            return True
    return False


def _parents(node: Node) -> list[Node]:
    return [
        parent
        for parent, _ in node.next_functions
        if parent is not None and type(parent).__name__ != "AccumulateGrad"
    ]


def _reaches(node: Node, stops: Collection[Node]) -> bool:
    """Whether an earlier layer's output (``stops``) is among ``node``'s inputs' history."""
    stack, seen = [node], {node}
    while stack and len(seen) <= _WALK:
        for parent in _parents(stack.pop()):
            if parent in stops:
                return True
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return len(seen) > _WALK  # not proved apart from the layers: counted as reaching one


def moved_rows(inputs: Tensor, stops: Collection[Node], batch: int) -> str | None:
    """The autograd operation that moved rows of the ``batch`` samples along the first
    dimension between an earlier layer's output (``stops``: their nodes) and ``inputs``, on
    a path from such an output, or ``None`` (a walk longer than :data:`_WALK` nodes stops
    without a finding)."""
    node = inputs.grad_fn
    if node is None or node in stops:
        return None
    stack, seen = [node], {node}
    while stack and len(seen) <= _WALK:
        node = stack.pop()
        if _moves(node, batch) and _reaches(node, stops):
            return type(node).__name__
        for parent in _parents(node):
            if parent not in seen and parent not in stops:
                seen.add(parent)
                stack.append(parent)
    return None
