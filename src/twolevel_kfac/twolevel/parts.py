"""The coarse level on layer vectors given as weight and bias parts (:data:`Parts`).

Autograd leaves a layer's gradient as ``∇W`` and ``∇b``; between refreshes the two-level
steps restrict from and prolong into those parts directly, with each layer's basis
``[k_i, d_out_i, d_in'_i]`` split once into its ``W`` and ``b`` columns, so the
``W̄ = [V, b]`` matrices are never formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from twolevel_kfac.twolevel.coarse_spaces import Basis
from twolevel_kfac.twolevel.vectors import Parts

SplitBasis = list[tuple[Tensor, Tensor | None]]
"""Per layer, the basis as ``([k_i, d_out·d_in], [k_i, d_out] or None)``."""


def split_basis(basis: Basis, has_bias: Sequence[bool]) -> SplitBasis:
    """Each layer's basis as contiguous ``[k_i, d_out·d_in]`` weight and ``[k_i, d_out]``
    bias parts (the bias is ``W̄``'s last column where ``has_bias``)."""
    out: SplitBasis = []
    for b, bias in zip(basis, has_bias, strict=True):
        if bias:
            out.append((b[:, :, :-1].reshape(b.shape[0], -1), b[:, :, -1].contiguous()))
        else:
            out.append((b.flatten(1), None))
    return out


def restrict_parts(split: SplitBasis, v: Parts) -> Tensor:
    """``R₀v`` (:func:`~twolevel_kfac.twolevel.coarse_matrix.restrict`) of a vector given
    as :data:`Parts` (``split`` from :func:`split_basis`):
    ``⟨r_k, v⟩ = ⟨r_k^W, V⟩ + ⟨r_k^b, b⟩``."""
    coefficients = []
    for (bw, bb), (vw, vb) in zip(split, v, strict=True):
        y = bw @ vw.reshape(-1)
        if bb is not None and vb is not None:
            y = y.addmv_(bb, vb)
        coefficients.append(y)
    return torch.cat(coefficients)


def prolong_add_into_parts(split: SplitBasis, y: Tensor, target: Parts, alpha: float) -> Parts:
    """``target ← target + α R₀ᵀy`` in place
    (:func:`~twolevel_kfac.twolevel.coarse_matrix.prolong_add_into`) for a contiguous
    target given as :data:`Parts`."""
    sizes = [int(bw.shape[0]) for bw, _ in split]
    for (bw, bb), yi, (tw, tb) in zip(split, torch.split(y, sizes), target, strict=True):
        coefficients = yi.to(tw.dtype)
        tw.view(-1).addmv_(bw.T, coefficients, alpha=alpha)
        if bb is not None and tb is not None:
            tb.addmv_(bb.T, coefficients, alpha=alpha)
    return target
