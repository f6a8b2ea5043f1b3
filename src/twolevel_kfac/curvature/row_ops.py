"""What autograd's nodes do to the rows of a tensor (its first dimension), and what they
say of their shapes and saved dimensions: the vocabulary of :mod:`.row_proof` (rows proved
sample-major), :mod:`.batch_dim` (the batch first) and :mod:`.row_order` (rows moved).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = [
    "DROPS",
    "REORDERS",
    "RESHAPES",
    "SLICES",
    "moves_rows",
    "node_shape",
    "picks_rows",
    "placed_along",
    "reorders_along",
    "signed",
]


def signed(value: int) -> int:
    """A saved ``int64`` as autograd returns it (``-1`` comes back as ``2⁶⁴ − 1``)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def node_shape(node: Node | None, output_nr: int) -> list[int]:
    """The shape of a node's forward output ``output_nr``, from autograd's metadata."""
    meta = getattr(node, "_input_metadata", None) if node is not None else None
    if not meta or output_nr >= len(meta):
        return []
    return [int(n) for n in getattr(meta[output_nr], "shape", [])]


RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
DROPS = frozenset({"SelectBackward0", "UnbindBackward0"})  # (they remove a dimension)
SLICES = frozenset({"SliceBackward0", "SplitBackward0", "SplitWithSizesBackward0"})
REORDERS = frozenset(
    {
        "IndexBackward0",
        "IndexSelectBackward0",
        "GatherBackward0",
        "MaskedSelectBackward0",
        "CatBackward0",
        "StackBackward0",
        "RepeatBackward0",
        "RepeatInterleaveBackward0",
        "ExpandBackward0",
        "IndexPutBackward0",
        "SliceBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnbindBackward0",
        "SelectBackward0",
        "EmbeddingBackward0",  # (F.embedding(index, h): rows of h picked)
        "IndexCopyBackward0",
        "IndexAddBackward0",
        "IndexReduceBackward0",
        "ScatterBackward0",
        "ScatterAddBackward0",
        "ScatterReduceBackward0",
        "MaskedScatterBackward0",
        "SortBackward0",
        "TopkBackward0",
        "TakeBackward0",
    }
)
_ALONG = frozenset(  # (along the dimensions they saved)
    {
        "FlipBackward0",
        "RollBackward0",
        "Rot90Backward0",
        "CumsumBackward0",
        "CumprodBackward0",
        "CummaxBackward0",
        "CumminBackward0",
        "LogcumsumexpBackward0",
        "UnfoldBackward0",
    }
)
_RANKED = _ALONG | {  # (what _moves_rows reads an output's rank for)
    "PermuteBackward0",
    "UnsqueezeBackward0",
    "ConstantPadNdBackward0",
    "TransposeBackward0",
    "TransposeBackward1",
}


def moves_rows(node: Node) -> bool:
    """Whether ``node`` moves or mixes the rows of its output's first dimension: a flip,
    roll, rotation, cumulative op, unfold or padding along it (a roll of the flattened
    tensor too), a 2-D transpose, a transpose or permute that moves it (``P = gates.T``
    for ``P @ h``), an unsqueeze before it (``h[None]``, after which ops along the rows
    are not seen).
    Without the output's rank (before torch's ``_input_metadata``) a dimension saved
    negative counts as the first for the former, and the latter are taken as row-wise."""
    name = type(node).__name__
    if name == "TBackward0":
        return True
    if name not in _RANKED:  # (the rest move no rows: no metadata read for them)
        return False
    metadata = getattr(node, "_input_metadata", None)
    rank = len(metadata[0].shape) if metadata else None
    if name == "PermuteBackward0":
        first = signed(int(node._saved_dims[0]))  # type: ignore[attr-defined]
        return rank is not None and first % rank != 0
    if name == "UnsqueezeBackward0":  # (x[None]: the rows leave the first dimension)
        return rank is None or signed(int(node._saved_dim)) % rank == 0  # type: ignore[attr-defined]
    if name == "ConstantPadNdBackward0":  # (F.pad of the rows: shifted, cropped)
        pad = [signed(int(p)) for p in node._saved_pad]  # type: ignore[attr-defined]
        return rank is None or (len(pad) >= 2 * rank and pad[2 * rank - 2 : 2 * rank] != [0, 0])
    if name in ("TransposeBackward0", "TransposeBackward1"):
        dims = [signed(int(getattr(node, f"_saved_dim{i}"))) for i in (0, 1)]
        return rank is not None and 0 in {d % rank for d in dims}
    saved = getattr(node, "_saved_dims", None)  # (one of _ALONG from here)
    if saved is None:  # (a cumulative op's one dimension, an unfold's)
        one = getattr(node, "_saved_dim", None)
        saved = (getattr(node, "_saved_dimension", 0) if one is None else one,)
    dims = [signed(int(d)) for d in saved]
    if not dims:  # (a roll of the flattened tensor)
        return True
    return 0 in {d % rank for d in dims} if rank else any(d <= 0 for d in dims)


def reorders_along(node: Node, name: str, dim: int) -> bool:
    """Whether ``node`` reorders or picks the entries of its output's dimension ``dim``
    (an index, gather, sort, flip or roll along it)."""
    if picks_rows(node, dim):
        return True
    if name not in ("SortBackward0", "TopkBackward0", "FlipBackward0", "RollBackward0"):
        return False
    saved = getattr(node, "_saved_dims", None) or (getattr(node, "_saved_dim", None),)
    rank = len(node_shape(node, 0))
    return any(d is not None and signed(int(d)) % max(rank, 1) == dim for d in saved)


_PLACES = frozenset(
    {"IndexAddBackward0", "IndexCopyBackward0", "IndexReduceBackward0", "ScatterBackward0"}
    | {"ScatterBackward1", "ScatterAddBackward0", "ScatterReduceBackward0"}
)


def placed_along(node: Node, name: str, dim: int) -> bool:
    """Whether ``node`` places rows along its output's dimension ``dim`` by an index
    (``index_add``, ``index_put``, ``scatter``): a mixture of experts putting its sorted
    tokens back. The walk ends there, as the proof by size did (a review found its rows
    refused when followed into the sorted source, 0.5–1.5 off and two-level KFAC refusing,
    in the first version of 2026-12-10), and so it does at rows picked by an index along a
    merged dimension (``ys[argsort(perm)]``): proved where the batch is its major factor
    there, refused where it is the minor one (a time-major ``[T·B]`` shuffled)."""
    if name == "IndexPutBackward0":
        indices = list(getattr(node, "_saved_indices", ()) or ())
        return dim < len(indices) and indices[dim] is not None
    return name in _PLACES and signed(int(getattr(node, "_saved_dim", -1))) == dim


def picks_rows(node: Node | None, dim: int) -> bool:
    """Whether ``node`` picks entries of its output's dimension ``dim`` by an index from its
    input's (``h[perm]``, ``index_select``, ``gather`` along it)."""
    name = type(node).__name__
    if name == "IndexBackward0":
        indices = list(getattr(node, "_saved_indices", ()) or ())
        return dim < len(indices) and indices[dim] is not None
    if name in ("IndexSelectBackward0", "GatherBackward0"):
        return signed(int(getattr(node, "_saved_dim", 0))) == dim
    return False
