"""The proof that a layer input of ``R = k·N`` rows holds them ``k`` per sample in the
batch's order (:func:`sample_major`), from how autograd's graph made them: the rows of
tokens flattened batch-first inside ``forward`` are then locations of their samples
(:mod:`.calls`), and a coarse level may pair them with the other layers' rows as samples.
A false proof regroups rows into the wrong samples, silently: every rule here refuses what
it cannot prove.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor, nn

from .batch_dim import batch_first_reshape, leads_to_batch
from .data_layout import batch_stride, rows_in_samples
from .row_ops import DROPS, REORDERS, RESHAPES, SLICES, moves_rows, node_shape, signed
from .written_slices import written_dims

if TYPE_CHECKING:
    from torch.autograd.graph import Node

    from .forward_pass import ForwardPass

__all__ = ["sample_major"]

_MIXED = frozenset({("MmBackward0", 1), ("AddmmBackward0", 2)})  # P @ h: h's rows mixed
_WALK = 256  # autograd nodes looked at, at most


def sample_major(inputs: Tensor, forward: ForwardPass) -> bool:
    """Whether a layer input (or a model output) of ``R = k·N`` rows, ``N`` the forward's
    samples, has them ``k`` per sample in the batch's order, as proved from how it was made.

    * a reshape (``view``, ``reshape``, ``flatten``) of a tensor whose first dimension is
      the ``N`` samples, not a transpose or permute of one that moved its first dimension
      (:func:`batch_first_reshape`), with row-wise operations after it (a reshape that
      keeps the first dimension among them: :func:`_keeps_rows`);
    * or row-wise operations on such a reshape or on a layer output proved so
      (``forward.ordered``): every path back through autograd's graph reaches one before
      an operation that makes rows (indexing, gathering, slicing, concatenating, stacking,
      repeating, expanding), moves or mixes them (:func:`moves_rows`; the right operand
      of a product ``P @ h`` is not followed), or a reshape of something else; paths to
      parameters aside;
    * or, without autograd history, a contiguous view of all of the model's first tensor
      argument (the data flattened).

    * or a forward of one sample: every row is its own (unless another tensor argument
      has other rows: the batch may be passed second, ``model(code, x)``).

    Otherwise (a mixture-of-experts expert's gathered tokens, a time-major flatten, a walk
    longer than :data:`_WALK` nodes) ``False``: the rows are not regrouped."""
    samples, rows = forward.batch_size, int(inputs.shape[0]) if inputs.dim() else 0  # (all)
    counted = _by_count(rows, forward)
    if counted is not None:
        return counted
    node = inputs.grad_fn
    if node is None:
        return _the_data_flattened(inputs, forward.first, samples)
    # (past a reshape, expand or pick that keeps the rows, ``strict``: a reshape of a tensor
    # with N rows first proves nothing by its size, whatever its other dimensions (at T = B
    # a time-major tensor has N rows, its batch perhaps merged into another dimension, two
    # reviews found such forwards proved, silently): only a layer's output of N rows does,
    # reached through row-wise steps that kept its first dimension first)
    stack, seen, proved = [(node, False)], {node}, False
    while stack:
        node, strict = stack.pop()
        name = type(node).__name__
        if _proves(node, name, forward, strict):
            proved = True
            continue
        step = _row_step(node, name, len(seen), samples)
        if step is False:
            return False
        if step is None or not isinstance(step, bool):  # (a weight; rows put back: from there)
            if step is not None and step not in seen:
                seen.add(step)
                stack.append((step, True))
            continue
        strict = strict or name in _KEEPS or name in _PICKS
        for edge, (parent, _) in enumerate(node.next_functions):
            if (name, edge) in _MIXED or _flat_batched(node, name, edge):  # P @ h: rows mixed
                if not (_frozen_weight(node) if parent is None else _parameters_alone(parent)):
                    return False  # (P @ x, P @ h: the right operand is no weight)
                continue  # (a weight, h @ Wᵀ: the rows are the left operand's)
            if parent is None or parent in seen or type(parent).__name__ == "AccumulateGrad":
                continue
            seen.add(parent)
            stack.append((parent, strict))
    return proved


def _by_count(rows: int, forward: ForwardPass) -> bool | None:
    """``False`` where the ``rows`` are not ``k·N`` with ``k > 1``, ``True`` where one
    sample has them all (before 2026-12-10 not proved: nanoGPT's positions broadcast,
    ``pos(arange(T))``, stepped 2–3× off at a batch of one, silently), else ``None``."""
    samples = forward.batch_size
    if rows in (0, samples) or rows % samples:
        return False
    alone = all(other == 1 for other in forward.other_rows)  # (not model(code, x))
    return True if samples == 1 and alone else None


def _the_data_flattened(inputs: Tensor, first: Tensor | None, samples: int) -> bool:
    """Whether ``inputs`` (without autograd history) is a view of the model's first tensor
    argument whose rows lie in its samples in order (:func:`~.data_layout.rows_in_samples`:
    the data flattened, overlapping patches), or a copy of it permuted with the batch first,
    or a view of one (:func:`~.data_layout.batch_stride`: ``x.permute(0, 2, 3,
    1).reshape(N·H·W, C)``, a patch embedding's rows, read as gathered rows before
    2026-12-11)."""
    if first is None or not inputs.dim():
        return False
    if inputs.untyped_storage().data_ptr() == first.untyped_storage().data_ptr():
        return rows_in_samples(inputs, first, samples)  # (a view: its rows' storage)
    rows = int(inputs.shape[0])
    if inputs.numel() != first.numel() or rows % samples:
        return False
    return batch_stride(inputs, first) == rows // samples * inputs[0].numel()


def _parameters_alone(node: Node) -> bool:
    """Whether the tensor of ``node`` is computed from parameters alone (every path back
    ends at a parameter's ``AccumulateGrad``; none at a tensor without a graph, such as
    the data, at a leaf that is no ``nn.Parameter`` (the data with ``requires_grad``, an
    attack's), nor past :data:`_WALK` nodes): a weight ``Wᵀ``, weight-normed or LoRA's,
    not a tensor of the batch (a layer's output, a ``LayerNorm`` of the data)."""
    stack, seen = [node], {node}
    while stack:
        node = stack.pop()
        if type(node).__name__ == "AccumulateGrad":  # (a leaf: a parameter, not the data)
            if not isinstance(getattr(node, "variable", None), nn.Parameter):
                return False
            continue
        for parent, _ in node.next_functions:
            if parent is None or len(seen) > _WALK:
                return False
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return True


def _frozen_weight(node: Node) -> bool:
    """Whether a product's right operand without a graph is a frozen weight: a parameter
    or a view of one (``Wᵀ``), not the data's rows (``P @ x``, ``P @ x.T``). A frozen
    weight cast under autocast, or held in a buffer, cannot be told from the data's rows
    (a transposed view of a tensor without a graph): not proved."""
    saved = getattr(node, "_saved_mat2", None)
    if saved is None:
        saved = getattr(node, "_saved_batch2", None)
    return any(isinstance(t, nn.Parameter) for t in (saved, getattr(saved, "_base", None)))


def _flat_batched(node: Node, name: str, edge: int) -> bool:
    """A batched product of one matrix pair (``bmm(P[None], h[None])``): the right
    operand's rows mixed as by ``P @ h``."""
    if (name, edge) not in (("BmmBackward0", 1), ("BaddbmmBackward0", 2)):
        return False
    left = getattr(node, "_saved_self", None)
    if left is None:
        left = getattr(node, "_saved_batch1", None)
    return left is None or int(left.shape[0]) == 1


_KEEPS = RESHAPES | {"ExpandBackward0"}  # (row-wise where the first dimension stays)
_PICKS = SLICES | DROPS | {"CatBackward0", "StackBackward0", "RepeatBackward0"}  # (beside)


def _beside_rows(node: Node) -> bool:
    """Whether a split, slice, select or unbind works along a dimension other than the
    rows (the ``q, k, v`` chunks of a fused projection of windows), or a ``cat`` or
    ``stack`` joins, or a ``repeat`` repeats, along one (a per-frame CLS token repeated
    over the frames and joined to their tokens folded into the rows, two streams'
    features: 1–3 off a step as gathered rows, silently, before 2026-12-12): every row is
    kept."""
    dim = getattr(node, "_saved_dim", None)
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    metadata = getattr(node, "_input_metadata", None)
    if type(node).__name__ in ("CatBackward0", "StackBackward0"):  # (dim: the output's)
        rank = len(node_shape(node, 0))
        return dim is not None and rank > 0 and signed(int(dim)) % rank != 0
    if type(node).__name__ == "RepeatBackward0":  # (TimeSformer's cls.repeat(1, T, 1))
        repeats = [int(r) for r in node._saved_repeats]  # type: ignore[attr-defined]
        return sizes is not None and len(repeats) == len(sizes) and repeats[0] == 1
    if sizes:
        rank = len(sizes)
    elif metadata and type(node).__name__ == "UnbindBackward0":  # (its outputs: one dim less)
        rank = len(metadata[0].shape) + 1
    else:
        return False
    return dim is not None and signed(int(dim)) % rank != 0


def _row_step(node: Node, name: str, walked: int, samples: int) -> Node | bool | None:
    """How :func:`sample_major`'s walk goes on at ``node``: ``True`` row-wise (on to its
    inputs), a node to go on from instead (:func:`_rows_put_back`), ``None`` for a branch
    of parameters alone (a weight broadcast in: Swin's position bias), ``False`` where the
    rows are not proved (made, moved or mixed, a reshape of something else, a walk past
    :data:`_WALK` nodes)."""
    if (name in _KEEPS and _keeps_rows(node, samples)) or (name in _PICKS and _beside_rows(node)):
        return True  # (its rows as its input's)
    if name == "CopySlices":  # (buf[:, t] = h_t keeps h_t's rows; buf[t] = h_t does not)
        where = written_dims(node, 0)
        rows = node_shape(node, 0)[:1]
        return where is not None and all(w.dim == 0 and list(w.shape[:1]) == rows for w in where)
    source = _rows_put_back(node) if name in DROPS else None
    if source is not None:
        return source
    if name in RESHAPES or name in REORDERS or moves_rows(node) or walked > _WALK:
        return None if _parameters_alone(node) else False
    return True


def _rows_put_back(node: Node) -> Node | None:
    """The input of a permute that moved the rows to the second dimension, where ``node``
    selects or unbinds along the first (``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1,
    4).unbind(0)``, timm's attention): the rows are first again, as in that input; else
    ``None``."""
    if signed(int(getattr(node, "_saved_dim", -1))) != 0 or not node.next_functions:
        return None
    permute = node.next_functions[0][0]
    if permute is None or type(permute).__name__ != "PermuteBackward0":
        return None
    dims = [signed(int(d)) for d in permute._saved_dims]  # type: ignore[attr-defined]
    if len(dims) < 2 or dims[1] % len(dims) != 0 or not permute.next_functions:
        return None
    source: Node | None = permute.next_functions[0][0]
    return source


def _keeps_rows(node: Node, samples: int) -> bool:
    """A reshape that groups rows contiguously, or an expand that keeps the first dimension:
    each row of one side is a run of rows of the other, or a part of one, in order
    (:func:`_rows_nest`: ``[R, h, n, d] → [R·h, n, d]``, a batched ``matmul`` over heads,
    the reverse, ``[B·N, T, D] → [B, N·T, D]``), so rows stay sample-major (Swin's windows
    ``[B·n, s, s, C] → [B·n, s², C]``; before 2026-12-09 such a reshape ended the proof,
    and Swin's window attention took KFC's step with the damping of gathered rows: 3× off,
    silently; TimeSformer's frames put back, before 2026-12-12). Both sides must have a
    multiple of the ``samples`` rows, each row inside one sample (a row spanning samples,
    ``[T, N, D]`` of a flattened ``[N·T, D]``, would let an op along another dimension mix
    them). An expand's new leading dimensions are no rows."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    metadata = getattr(node, "_input_metadata", None)
    if not sizes or not metadata or not len(metadata[0].shape):
        return False
    before, after = [int(s) for s in sizes], [int(s) for s in metadata[0].shape]
    if before[0] % samples or after[0] % samples:
        return False
    if type(node).__name__ == "ExpandBackward0":
        return len(before) == len(after) and before[0] == after[0]
    return _rows_nest(before, after)


def _rows_nest(before: list[int], after: list[int]) -> bool:
    """Whether each row of one side lies inside one row of the other: their sizes divide
    (in the flat order a reshape keeps, a row of either side is then a run of rows of the
    other, or a part of one: leading dimensions merged or split, and TimeSformer's frames
    put back, ``[B·N, T, D] → [B, N·T, D]``, read as gathered rows before 2026-12-12)."""
    row_before, row_after = math.prod(before[1:]), math.prod(after[1:])
    if not row_before or not row_after:
        return False
    return row_before % row_after == 0 or row_after % row_before == 0


def _proves(node: Node, name: str, forward: ForwardPass, strict: bool) -> bool:
    """Whether ``node``'s rows are proved sample-major: a layer output proved so, a
    batch-first reshape (:func:`batch_first_reshape`), or a transpose or permute that moved
    the batch first, ``k`` rows per sample, as :func:`~.batch_dim.leads_to_batch` follows
    it back (``nn.MultiheadAttention(batch_first=True)`` on ``[N·C, S, E]``: its output
    transposed back, read as gathered rows before 2026-12-11, 0.63–0.86 off a step in a
    trial); ``strict`` (past a step that keeps the rows), a layer's output of the ``N``
    samples instead of a reshape, its first dimension followed back to the batch (a
    ``Linear`` on a time-major ``[T, N, D]`` at ``T = N`` has ``N`` rows first: proved
    before 2026-12-10)."""
    if node in forward.ordered:
        return True
    if strict:
        return (
            node in forward.per_sample
            and _first_size(node) == forward.batch_size
            and leads_to_batch(node, forward)
        )
    if name in _TRANSPOSES and moves_rows(node):  # (rows moved first: followed back)
        rows, samples = _first_size(node) or 0, forward.batch_size
        return rows > 0 and not rows % samples and leads_to_batch(node, forward, rows // samples)
    return name in RESHAPES and batch_first_reshape(node, forward)


def _first_size(node: Node) -> int | None:
    """The first dimension of ``node``'s output (``None`` where torch does not tell)."""
    metadata = getattr(node, "_input_metadata", None)
    if not metadata or not len(metadata[0].shape):
        return None
    return int(metadata[0].shape[0])


_TRANSPOSES = frozenset({"TransposeBackward0", "TransposeBackward1", "PermuteBackward0"})
