"""Where the batch is in a tensor without autograd history: a view of the model's first
argument (by its strides), a copy of it permuted (``x.permute(2, 3, 0, 1).reshape(H·W·N,
C)``, location-major rows, which no storage or stride relates to it: by its values), the
data a recurrent op ran on.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.autograd.graph import Node

__all__ = [
    "SEVERAL",
    "batch_stride",
    "data_dim_is_batch",
    "recurrent_on_data",
    "rows_in_samples",
]

SEVERAL = -1  # (batch_stride: permutations with other strides give the tensor)

_MAX_RANK = 5  # (the permutations tried: at most 5! = 120, video [B, C, T, H, W])
_PREFIX = 64  # (entries compared before a whole comparison)


def batch_stride(data: Tensor, first: Tensor) -> int | None:
    """The flat stride of the batch in ``data``, where ``data`` is ``first.permute(p)``
    reshaped to its shape for a permutation ``p`` of ``first``'s dimensions (``first``: the
    model's first tensor argument, its first dimension the batch): ``∏ first.shape[p_j]``
    over the dimensions after ``0`` in ``p``. :data:`SEVERAL` where several permutations
    with other strides give it (``first`` holding equal entries in places: small integers,
    a constant channel), ``None`` where none does, or ``first`` has more than
    :data:`_MAX_RANK` dimensions. Each permutation is tried on the first :data:`_PREFIX`
    entries, then whole."""
    if data.numel() != first.numel() or not 1 < first.dim() <= _MAX_RANK or not first.numel():
        return None
    if data.dtype.is_floating_point != first.dtype.is_floating_point:
        return None
    flat = data.reshape(-1)
    if not torch.equal(first.reshape(-1)[:1].to(data.dtype), flat[:1]):
        return None  # (the first entry is every permutation's: another tensor)
    count = min(_PREFIX, flat.numel())
    strides = set()
    for order in itertools.permutations(range(first.dim())):
        view = first.permute(order)
        coords = torch.unravel_index(torch.arange(count, device=first.device), view.shape)
        if not torch.equal(view[coords].to(data.dtype), flat[:count]):
            continue
        if torch.equal(view.reshape(-1).to(data.dtype), flat):
            after = order[order.index(0) + 1 :]
            strides.add(math.prod(first.shape[d] for d in after))
    return strides.pop() if len(strides) == 1 else SEVERAL if strides else None


def data_dim_is_batch(data: Tensor, dim: int, first: Tensor | None, inner: int = 1) -> bool | None:
    """Whether dimension ``dim`` of a tensor without a graph is the batch (``inner`` apart
    in it), ``first`` being the model's first tensor argument: of a view of it, the one
    with the batch's stride; of a copy of it permuted, or a view of one
    (:func:`batch_stride`: location-major rows at ``H·W = N`` were proved ``H·W`` per
    sample before 2026-12-11, 1.6–6.8 off a step under ``reduce`` in a trial and a review),
    the one holding the batch at that stride, ``False`` where several permutations give
    it; ``None`` for another tensor (where the data came from is not told)."""
    if first is None:
        return None
    if data.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():  # (a copy)
        stride = batch_stride(data, first)
        return None if stride is None else stride == inner * math.prod(data.shape[dim + 1 :])
    return data.stride(dim) * inner == first.stride(0) and data.shape[dim] == len(first) * inner


def rows_in_samples(view: Tensor, first: Tensor, samples: int) -> bool:
    """Whether each row of ``view``, a view of the storage of ``first`` (the model's first
    tensor argument, ``samples`` rows), lies inside one sample's block of that storage,
    ``k = rows / samples`` consecutive rows per sample in the batch's order: the data
    flattened, or cut into overlapping patches (``x.reshape(N·C, L).unfold(-1, P, S)``,
    PatchTST's: read as gathered rows before 2026-12-11, 0.64–1.0 off a step in a trial).
    ``False`` where the samples' storage is not in disjoint blocks, or a stride is
    negative."""
    rows = int(view.shape[0]) if view.dim() else 0
    if not rows or rows % samples or not first.dim() or len(first) != samples:
        return False
    block = first.stride(0)
    extent = sum((n - 1) * s for n, s in zip(first.shape[1:], first.stride()[1:], strict=True))
    if block <= 0 or extent >= block or min(view.stride(), default=0) < 0:
        return False
    span = sum((n - 1) * s for n, s in zip(view.shape[1:], view.stride()[1:], strict=True))
    offset = int(view.storage_offset() - first.storage_offset())
    starts = torch.arange(rows) * int(view.stride(0)) + offset
    low = torch.arange(rows) // (rows // samples) * block
    inside = torch.logical_and(torch.ge(starts, low), torch.le(starts + span, low + extent))
    return bool(inside.all())


def recurrent_on_data(
    node: Node, out: list[int], dim: int, batch: int, first: Tensor | None
) -> list[tuple[Node, int]] | Literal[False] | None:
    """A recurrent op's time-major output ``[T, N, H]`` on an input without a graph (the
    data): the batch is its second dimension where ``T ≠ N``, or where its input is the
    model's first argument time-major (``nn.LSTM(batch_first=True)`` on the data)."""
    if dim != 1 or len(out) < 2:
        return None
    if out[0] != batch:
        return []
    saved = getattr(node, "_saved_input", None)
    if saved is None or first is None or first.dim() < 2:
        return False
    flipped = first.transpose(0, 1)
    same = saved.shape == flipped.shape and saved.dtype == flipped.dtype
    return [] if same and bool(torch.equal(saved, flipped)) else False
