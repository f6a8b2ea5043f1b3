"""Second moments of a layer's rows, ``scale · XᵀX``, as one GEMM each (the Kronecker
factors' batch estimates, Martens & Grosse 2015 eq. (1) and §5)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["position_gram", "scaled_gram"]


def position_gram(x: Tensor, scale: float) -> Tensor:
    """``scale · Σ_{n,t} x_nt x_ntᵀ`` of ``x`` ``[N, T, d]`` as one GEMM. In im2col's order
    (``[N, d, T]`` in memory: a convolution's patches and output gradients) from a
    ``[d, N·T]`` copy of contiguous runs of ``T``, where the ``[N·T, d]`` one transposes
    (twice as slow on 8 channels of 32 × 32)."""
    d = x.shape[-1]
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        cols = x.permute(2, 0, 1).reshape(d, -1)
        return torch.addmm(cols.new_zeros(()), cols, cols.T, beta=0.0, alpha=scale)
    return scaled_gram(x.reshape(-1, d), scale)


def scaled_gram(rows: Tensor, scale: float) -> Tensor:
    """``scale · XᵀX`` as one GEMM (``scale`` is its α): dividing the product afterwards
    would write a second full-size matrix."""
    return torch.addmm(rows.new_zeros(()), rows.T, rows, beta=0.0, alpha=scale)
