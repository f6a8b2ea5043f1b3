"""Coarse vectors kept as outer products: ``r_j = l_j r̃_jᵀ`` on one layer.

The spectral vector of a Kronecker block is ``q_G q_Aᵀ`` (:func:`~twolevel_kfac.twolevel.
coarse_spaces.spectral`): ``d_out + d_in'`` numbers describe it, not ``d_out·d_in'``. A
layer's ``k`` such vectors are held as :class:`OuterVectors` (``left [k, d_out]``,
``right [k, d_in']``), and every product of the coarse level reads the two factors
instead of the dense ``[k, d_out, d_in']`` tensor, for ``v`` a layer matrix
``[d_out, d_in']`` (``k`` is 1 or 2):

* restriction ``⟨l r̃ᵀ, v⟩ = lᵀ v r̃`` (:func:`restrict_layer`): one pass over ``v``;
* prolongation ``v + α Σ_j y_j l_j r̃_jᵀ = v + α (lᵀ diag(y)) r̃`` (:func:`prolong_add_layer`):
  a rank-``k`` update, one pass over ``v``;
* per-sample products ``⟨l r̃ᵀ, Σ_t δ_t ā_tᵀ⟩ = Σ_t (δ_tᵀl)(ā_tᵀr̃)`` (:func:`sample_dots_layer`):
  ``N·T·(d_out + d_in')`` operations instead of ``N·T·d_out·d_in'``;
* Gram ``⟨l_i r̃_iᵀ, l_j r̃_jᵀ⟩ = (l_iᵀl_j)(r̃_iᵀr̃_j)`` (:func:`gram_layer`).

So the coarse level holds no copy of the basis as large as the parameters: the dense form
(:meth:`OuterVectors.dense`, ``l_j ⊗ r̃_j`` entry by entry) is formed only for the analysis
and the public ``basis`` attribute. A layer of a :data:`CoarseBasis` is either a dense
``[k, d_out, d_in']`` tensor or :class:`OuterVectors`; the functions here take both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, cast

import torch
from torch import Tensor

from twolevel_kfac.curvature.blocks import BlockStats, LayerStats
from twolevel_kfac.curvature.sample_products import per_sample_dots

__all__ = [
    "CoarseBasis",
    "LayerBasis",
    "OuterVectors",
    "dense_basis",
    "dense_layer",
    "gram_layer",
    "layer_count",
    "layer_dtype",
    "layer_numel",
    "layer_width",
    "normalized_outer",
    "prolong_add_layer",
    "restrict_layer",
    "sample_dots_layer",
]


class OuterVectors(NamedTuple):
    """A layer's ``k`` coarse vectors ``r_j = left_j right_jᵀ`` (``left [k, d_out]``,
    ``right [k, d_in']``; module docstring)."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        """The vectors as one ``[k, d_out, d_in']`` tensor."""
        return self.left.unsqueeze(2) * self.right.unsqueeze(1)


LayerBasis = Tensor | OuterVectors
"""A layer's coarse vectors: a dense ``[k, d_out, d_in']`` tensor or :class:`OuterVectors`."""

CoarseBasis = list[LayerBasis]
"""One :data:`LayerBasis` per layer (a dense :data:`~.coarse_spaces.Basis` is one)."""


def layer_count(b: LayerBasis) -> int:
    """``k``: how many coarse vectors the layer has."""
    return int(b.left.shape[0] if isinstance(b, OuterVectors) else b.shape[0])


def layer_dtype(b: LayerBasis) -> torch.dtype:
    """The dtype of the layer's vectors."""
    return b.left.dtype if isinstance(b, OuterVectors) else b.dtype


def layer_width(b: LayerBasis) -> int:
    """``d_in'``: the columns of the layer's vectors."""
    return int(b.right.shape[1] if isinstance(b, OuterVectors) else b.shape[-1])


def layer_numel(b: LayerBasis) -> int:
    """``d_out·d_in'``: how many entries one of the layer's vectors has."""
    if isinstance(b, OuterVectors):
        return int(b.left.shape[1] * b.right.shape[1])
    return int(b.shape[1:].numel())


def dense_layer(b: LayerBasis) -> Tensor:
    """The layer's vectors as a dense ``[k, d_out, d_in']`` tensor."""
    return b.dense() if isinstance(b, OuterVectors) else b


def dense_basis(basis: Sequence[LayerBasis]) -> list[Tensor]:
    """Every layer's vectors dense (:func:`dense_layer`); a list without outer products is
    returned as it is."""
    if isinstance(basis, list) and not any(isinstance(b, OuterVectors) for b in basis):
        return cast(list[Tensor], basis)
    return [dense_layer(b) for b in basis]


def normalized_outer(left: Tensor, right: Tensor) -> OuterVectors:
    """``l r̃ᵀ / ‖l r̃ᵀ‖_∞`` of each of the ``k`` pairs (``[k, d_out]``, ``[k, d_in']``), as
    :func:`~.coarse_spaces.normalize_inf` does for a dense vector:
    ``‖l r̃ᵀ‖_∞ = ‖l‖_∞‖r̃‖_∞``, so each factor is scaled by its own peak. A pair with a
    zero or non-finite factor becomes zero."""
    peaks = [torch.linalg.vector_norm(f, ord=math.inf, dim=1, keepdim=True) for f in (left, right)]
    ok = torch.isfinite(peaks[0]) & (peaks[0] > 0) & torch.isfinite(peaks[1]) & (peaks[1] > 0)
    scaled = []
    for factor, peak in zip((left, right), peaks, strict=True):
        out = factor / torch.where(ok, peak, torch.ones_like(peak))
        scaled.append(out.masked_fill_(~ok.expand_as(out), 0.0))
    return OuterVectors(scaled[0], scaled[1])


def restrict_layer(b: LayerBasis, v: Tensor) -> Tensor:
    """``⟨r_j, v⟩`` for the layer's ``k`` vectors and a layer matrix ``v`` (``[k]``):
    ``l_jᵀ v r̃_j`` for :class:`OuterVectors`."""
    if isinstance(b, OuterVectors):
        return ((b.left @ v) * b.right).sum(1)
    return b.flatten(1) @ v.flatten()


def prolong_add_layer(b: LayerBasis, y: Tensor, target: Tensor, alpha: float) -> Tensor:
    """``target ← target + α Σ_j y_j r_j`` in place (``y``: ``[k]`` in ``target``'s dtype);
    for :class:`OuterVectors` the rank-``k`` update ``α (lᵀ diag(y)) r̃``."""
    if isinstance(b, OuterVectors):
        return target.addmm_(b.left.T * y, b.right, alpha=alpha)
    if target.is_contiguous():
        target.view(-1).addmv_(b.flatten(1).T, y, alpha=alpha)
        return target
    return target.add_(torch.einsum("k,koi->oi", y, b), alpha=alpha)


def sample_dots_layer(stats: LayerStats, b: LayerBasis) -> Tensor:
    """``⟨r_j, ∇ℓ_n⟩`` (``[N, k]``; :func:`~twolevel_kfac.curvature.sample_products.
    per_sample_dots`): ``Σ_t (δ_{n,t}ᵀl_j)(ā_{n,t}ᵀr̃_j)`` for :class:`OuterVectors` on the
    plain ``(ā, δ)`` rows; a block with statistics of its own gets the dense vectors."""
    if not isinstance(b, OuterVectors):
        return per_sample_dots(stats, b)
    if isinstance(stats, BlockStats):
        return per_sample_dots(stats, b.dense())
    projected = stats.g @ b.left.T.to(stats.g.dtype)  # [N, T, k]
    return projected.mul_(stats.a @ b.right.T.to(stats.a.dtype)).sum(1)


def gram_layer(b: LayerBasis) -> Tensor:
    """``⟨r_i, r_j⟩`` of the layer's vectors (``[k, k]``)."""
    if isinstance(b, OuterVectors):
        return (b.left @ b.left.T) * (b.right @ b.right.T)
    flat = b.flatten(1)
    return flat @ flat.T
