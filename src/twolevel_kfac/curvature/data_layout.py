"""Where the batch is in a tensor without autograd history that holds the model's first
argument's entries in another order: a copy of it permuted (``x.permute(2, 3, 0,
1).reshape(H·W·N, C)``, location-major rows), which no storage or stride relates to it.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

__all__ = ["SEVERAL", "batch_stride"]

SEVERAL = -1  # (batch_stride: permutations with other strides give the tensor)

_MAX_RANK = 4  # (the permutations tried: at most 4! = 24)
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
