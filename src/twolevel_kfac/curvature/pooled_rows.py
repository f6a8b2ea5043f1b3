"""Whether a model output's rows are sums (or means, maxima) of the batch's rows: a
graph-level model called as ``model(x, edge_index, batch)`` pools its ``N`` node rows
into ``G`` graph rows, and KFAC would take the nodes as the samples (the empirical Fisher
``N/G`` times the per-graph one). Rows taken one for one from the samples' (a masked-LM
head on ``h[mask]``, the real tokens ``out[attention_mask]``, a ``PackedSequence``'s
``data``, a time-major ``[T, N, C]``) are each one sample's and pass: under the MC Fisher
their count sets the mean's scale (:func:`~.loss_mask.counted_positions`).

The walk goes back from the model's main output (:func:`main_output`) where its rows are
not a multiple of the batch, through at most :data:`_WALK` autograd nodes, and names the
first that pools rows of a multiple of the batch, computed from a layer's output: a
reduction of dimension 0 (``h.mean(0)``, ``(a * h).sum(0)``, ``amax``), or into fewer
rows than the samples ``index_add``, ``scatter_add``, ``scatter_reduce``,
``index_reduce``, ``segment_reduce`` or ``index_put(accumulate=True)`` along dimension 0,
or a matrix product ``P @ h``. A mixture of experts' dispatch into capacity slots and
its combine back into the tokens keep more rows than the samples, and its load beside the
logits is not the main output: they pass. Not seen: pools into as many rows as the
samples or more, a compiled graph. Since 2026-12-10 a reduction of rows picked along
dimension 0 (a loop over the graphs, ``torch.stack([h[batch == g].sum(0) …])``, or over
``h.split(sizes)``) and a reshape splitting the rows whose split is reduced
(``h.view(G, n, D).sum(1)``) are named too (they passed: the nodes taken as the samples,
silently, 0.65–1.9 off in a trial).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor
from torch.autograd.graph import Node

from .row_ops import RESHAPES, node_shape, signed
from .row_order import reaches

__all__ = ["pooled_by"]

_WALK = 512  # autograd nodes looked at, at most
_ALONG_DIM = frozenset(  # (their dimension is saved as ``dim``, segment_reduce's as ``axis``)
    {
        "IndexAddBackward0",
        "ScatterAddBackward0",
        "ScatterReduceBackward0",
        "IndexReduceBackward0",
        "SegmentReduceBackward0",
    }
)
_PRODUCTS = {"MmBackward0": 1, "AddmmBackward0": 2}  # the edge of ``h`` in ``P @ h``
_FULL = frozenset({"SumBackward0", "MeanBackward0", "MaxBackward1", "MinBackward1"})


def _reduced_dims(node: Node, rank: int) -> set[int] | None:
    """The input dimensions a reduction (``sum``, ``mean``, ``amax``, …; all of them for a
    full one) reduced, or ``None`` for another operation."""
    if type(node).__name__ in _FULL:
        return set(range(rank))
    if not hasattr(node, "_saved_keepdim"):
        return None
    saved = getattr(node, "_saved_dim", ())
    dims = saved if isinstance(saved, tuple) else (saved,)
    return {signed(int(d)) % max(rank, 1) for d in dims}


def _summing(node: Node, out: list[int]) -> bool:
    """Whether ``node`` adds rows into the rows of its output (shape ``out``): ``P @ h``,
    ``index_add``, ``scatter_add``/``scatter_reduce``, ``index_reduce``, ``segment_reduce``
    along dimension 0, ``index_put(accumulate=True)``."""
    name = type(node).__name__
    if name in _PRODUCTS:
        return True
    if name == "IndexPutBackward0":
        return bool(getattr(node, "_saved_accumulate", False))
    dim = getattr(node, "_saved_dim", getattr(node, "_saved_axis", None))
    return name in _ALONG_DIM and dim is not None and signed(int(dim)) % len(out) == 0


def _pools(node: Node, out: list[int], batch: int, stops: Collection[Node]) -> int | None:
    """The rows ``node`` (output shape ``out``) pooled rows of a multiple of ``batch``,
    computed from a layer's output (``stops``: their nodes), into, or ``None``: a reduction
    of dimension 0 (``h.mean(0)``, attention-MIL's ``(a * h).sum(0)``), or a summing
    operation (:func:`_summing`) into fewer rows than the samples (``G`` graphs of ``N``
    nodes; a mixture-of-experts dispatch into capacity slots or its combine into the
    tokens has more: not a pool; a ``Linear``'s ``x @ W.t()`` reduces no rows)."""
    edges = [(p, n) for p, n in node.next_functions if p is not None]
    dims = _reduced_dims(node, max((len(node_shape(p, n)) for p, n in edges), default=0))
    if dims is not None:
        judged = [_through_split_or_pick(p, n, dims, batch) for p, n in edges]
        if 0 not in dims and not any(split for _, _, split in judged):
            return None
        rows = out[0] if out and 0 not in dims else 1
        edges = [(p, n) for p, n, _ in judged]
    elif out and out[0] < batch and _summing(node, out):
        name, rows = type(node).__name__, out[0]
        if name in _PRODUCTS:
            parent, nr = node.next_functions[_PRODUCTS[name]]
            edges = [] if parent is None else [(parent, nr)]
    else:
        return None
    for parent, nr in edges:
        shape = node_shape(parent, nr)
        if parent is None or not shape or shape[0] % batch or shape[0] <= rows:
            continue
        if parent in stops or reaches(parent, stops):
            return rows
    return None


_PICKS = frozenset(
    {"IndexBackward0", "IndexSelectBackward0", "MaskedSelectBackward0", "SliceBackward0"}
    | {"SplitBackward0", "SplitWithSizesBackward0"}
)


def _through_split_or_pick(
    parent: Node, nr: int, dims: set[int], batch: int
) -> tuple[Node, int, bool]:
    """The input of a reduction to judge (``parent``), or the rows it came from: those of a
    reshape that split them into leading dimensions one of which the reduction reduced
    (``h.view(G, n, D).sum(1)``: graphs of ``n`` nodes each; ``True``), or of rows picked
    along dimension 0 for a reduction of it (``h[batch == g].sum(0)``, stacked over the
    graphs: each sum is of a part of the rows)."""
    name = type(parent).__name__
    source = parent.next_functions[0] if parent.next_functions else (None, 0)
    if source[0] is None:
        return parent, nr, False
    if name in _PICKS and 0 in dims and _picked_along_rows(parent):
        return source[0], source[1], False
    before = [int(d) for d in getattr(parent, "_saved_self_sym_sizes", ()) or ()]
    after = node_shape(parent, nr)
    if name not in RESHAPES or not before or before[0] % batch or len(after) < 2:
        return parent, nr, False
    product = 1
    for at, size in enumerate(after):
        product *= size
        if product == before[0]:
            split = at > 0 and any(0 < d <= at for d in dims)
            return (source[0], source[1], True) if split else (parent, nr, False)
        if product > before[0]:
            break
    return parent, nr, False


def _picked_along_rows(node: Node) -> bool:
    """Whether an index, index_select, masked select, slice or split picks rows along dim
    0."""
    name = type(node).__name__
    if name in ("SliceBackward0", "IndexSelectBackward0") or "Split" in name:
        return signed(int(getattr(node, "_saved_dim", 0))) == 0
    return True  # (h[mask], h[index]: the first indexed dimension is the rows)


def main_output(output: Any) -> Tensor | None:
    """The model's main output: a tensor, a dict's (an HF ``ModelOutput``'s) ``"logits"``,
    a tuple's or list's first item (``(logits, aux)``: a mixture of experts' load, summed
    over the tokens, is not a pool of the samples' losses)."""
    while isinstance(output, (tuple, list)) and output:
        output = output[0]
    if isinstance(output, dict):
        output = output.get("logits")
    return output if isinstance(output, Tensor) else None


def pooled_by(output: Any, batch: int, stops: Collection[Node]) -> str | None:
    """The autograd node that pooled the batch's rows, computed from the layers' outputs
    (``stops``: their nodes), into the rows of the model's :func:`main_output` (module
    docstring), as ``"<its name> into <R> rows"``, or ``None``."""
    main = main_output(output)
    if batch < 2 or main is None or main.grad_fn is None or not main.dim():
        return None  # (a 0-dim output, a model returning its loss: no rows to judge)
    if len(main) % batch == 0:
        return None
    stack: list[tuple[Node, int]] = [(main.grad_fn, main.output_nr)]
    seen: set[Node] = set()
    while stack and len(seen) <= _WALK:
        node, nr = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        rows = _pools(node, node_shape(node, nr), batch, stops)
        if rows is not None:
            return f"{type(node).__name__} into {rows} rows"
        stack.extend((p, n) for p, n in node.next_functions if p is not None)
    return None
