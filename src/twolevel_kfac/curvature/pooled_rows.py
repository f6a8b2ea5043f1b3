"""Whether a model output's rows are sums (or means, maxima) of the batch's rows: a
graph-level model called as ``model(x, edge_index, batch)`` pools its ``N`` node rows
into ``G`` graph rows, and KFAC would take the nodes as the samples (the empirical Fisher
``N/G`` times the per-graph one). Rows taken one for one from the samples' (a masked-LM
head on ``h[mask]``, the real tokens ``out[attention_mask]``, a ``PackedSequence``'s
``data``, a time-major ``[T, N, C]``) are each one sample's and pass: under the MC Fisher
their count sets the mean's scale (:func:`~.loss_mask.counted_positions`).

The walk goes back from each output tensor whose rows are not a multiple of the batch
through at most :data:`_WALK` autograd nodes and names the first that reduces rows of a
multiple of the batch into rows that are not: ``index_add``, ``scatter_add``,
``scatter_reduce``, ``index_reduce`` or ``index_put(accumulate=True)`` along dimension 0,
``segment_reduce`` along it, or a matrix product ``P @ h``. Not seen: pools written as a
loop over the graphs (``torch.stack([h[batch == g].mean(0) for g in …])``) or a reshape
and a reduction (``h.view(G, n, D).sum(1)``), a compiled graph.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from torch import Tensor
from torch.autograd.graph import Node

from .row_order import node_shape, reaches, signed

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


def _pools(node: Node, out: list[int], batch: int, stops: Collection[Node]) -> bool:
    """Whether ``node``, whose output (shape ``out``) has rows that are not a multiple of
    ``batch``, made them by reducing rows of a multiple of it computed from a layer's
    output (``stops``: their nodes; a ``Linear``'s ``x @ W.t()`` reduces no rows)."""
    name = type(node).__name__
    edges = list(enumerate(node.next_functions))
    if name in _PRODUCTS:
        edges = [e for e in edges if e[0] == _PRODUCTS[name]]
    elif name == "IndexPutBackward0":
        edges = edges if getattr(node, "_saved_accumulate", False) else []
    elif name in _ALONG_DIM:
        dim = getattr(node, "_saved_dim", getattr(node, "_saved_axis", None))
        edges = edges if dim is not None and signed(int(dim)) % len(out) == 0 else []
    else:
        return False
    for _, (parent, nr) in edges:
        shape = node_shape(parent, nr)
        if parent is None or not shape or shape[0] % batch:
            continue
        if parent in stops or reaches(parent, stops):
            return True
    return False


def pooled_by(outputs: Iterable[Tensor], batch: int, stops: Collection[Node]) -> str | None:
    """The autograd node that pooled the batch's rows, computed from the layers' outputs
    (``stops``: their nodes), into the rows of one of the model's ``outputs`` (module
    docstring), as ``"<its name> into <R> rows"``, or ``None``."""
    if batch < 2:
        return None
    stack: list[tuple[Node, int]] = [
        (t.grad_fn, t.output_nr)
        for t in outputs
        if t.grad_fn is not None and t.dim() and len(t) % batch
    ]
    seen: set[Node] = set()
    while stack and len(seen) <= _WALK:
        node, nr = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        out = node_shape(node, nr)
        if out and out[0] % batch and _pools(node, out, batch, stops):
            return f"{type(node).__name__} into {out[0]} rows"
        stack.extend((p, n) for p, n in node.next_functions if p is not None)
    return None
