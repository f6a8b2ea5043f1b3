"""One cheap finiteness check for many tensors (gradients, factors, parameters, buffers)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["all_finite"]

_HALF = (torch.float16, torch.bfloat16)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of every floating-point tensor is finite, from one sum per tensor.

    A NaN/Inf entry makes its tensor's sum NaN/Inf; reading each tensor once is cheaper
    than ``isfinite().all()``, which also writes a mask. A sum that overflows from finite
    entries (float32: |Σ| ≳ 3e38) counts as non-finite too: values that large would
    overflow an update anyway. Half tensors are summed in float32 (a float16 factor with
    finite entries of 10 and 141² of them sums past float16's 65504).
    """
    with torch.no_grad():  # one context instead of a detach per tensor
        sums = [
            t.sum(dtype=torch.float32) if t.dtype in _HALF else t.sum()
            for t in tensors
            if t.is_floating_point()
        ]
        if not sums:
            return True
        if len({s.dtype for s in sums}) > 1:  # stack needs one dtype
            sums = [s.double() for s in sums]
        return bool(torch.stack(sums).isfinite().all())
