"""The forms a layer's coarse vectors are held in: dense, outer products, or split parts.

A layer ``i``'s ``k`` coarse vectors (``k`` is 1 or 2) are ``[d_out, d_in']`` matrices like
its ``W̄ = [W, b]``. The coarse level holds each layer's in the smallest form that the
coarse space gives, and every product reads that form (:data:`LayerBasis`):

* a dense ``[k, d_out, d_in']`` tensor;
* :class:`OuterVectors` ``r_j = l_j r̃_jᵀ`` (``left [k, d_out]``, ``right [k, d_in']``):
  the spectral vector of a Kronecker block ``q_G q_Aᵀ`` (:func:`~twolevel_kfac.twolevel.
  coarse_spaces.spectral`), the Nicolaides ``1·1ᵀ``, and Krylov-Nicolaides' ``M⁻¹1 =
  (G⁻¹1)(A⁻¹1)ᵀ`` under a factored damping: ``d_out + d_in'`` numbers a vector, not
  ``d_out·d_in'``, with, for ``v`` a layer matrix,

  * restriction ``⟨l r̃ᵀ, v⟩ = lᵀ v r̃``: one pass over ``v``;
  * prolongation ``v + α Σ_j y_j l_j r̃_jᵀ = v + α (lᵀ diag(y)) r̃``: a rank-``k`` update;
  * per-sample products ``⟨l r̃ᵀ, Σ_t δ_t ā_tᵀ⟩ = Σ_t (δ_tᵀl)(ā_tᵀr̃)``:
    ``N·T·(d_out + d_in')`` operations instead of ``N·T·d_out·d_in'``;
  * Gram ``⟨l_i r̃_iᵀ, l_j r̃_jᵀ⟩ = (l_iᵀl_j)(r̃_iᵀr̃_j)``;

* :class:`SplitVectors` (``weight [k, d_out, d_in]`` contiguous, ``bias [k, d_out]``):
  a dense vector of a layer with a bias (the residual spaces' ``M⁻¹res``) held as the
  parts the steps on parts read (:mod:`.parts`), so no contiguous copy of its weight
  columns is made beside it; a ``W̄``-matrix product (at a refresh) copies the other
  operand's weight columns instead, one layer at a time.

So the coarse level holds at most one copy of a basis, and none as large as the parameters
for the outer-product spaces; the dense form (:func:`dense_layer`) is formed only for the
analysis and the public ``basis`` attribute.
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
    "SplitVectors",
    "add_rows",
    "dense_basis",
    "dense_layer",
    "gram_layer",
    "layer_count",
    "layer_dtype",
    "layer_from_state",
    "layer_numel",
    "layer_state",
    "layer_width",
    "normalized_outer",
    "prolong_add_layer",
    "restrict_layer",
    "sample_dots_layer",
    "split_vectors",
    "zero_rows",
]


class OuterVectors(NamedTuple):
    """A layer's ``k`` coarse vectors ``r_j = left_j right_jᵀ`` (``left [k, d_out]``,
    ``right [k, d_in']``; module docstring)."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        """The vectors as one ``[k, d_out, d_in']`` tensor."""
        return self.left.unsqueeze(2) * self.right.unsqueeze(1)


class SplitVectors(NamedTuple):
    """A layer's ``k`` dense coarse vectors ``[V_j, b_j]`` held as their weight columns
    (``weight [k, d_out, d_in]``, contiguous) and bias column (``bias [k, d_out]``)."""

    weight: Tensor
    bias: Tensor

    def dense(self) -> Tensor:
        """The vectors as one ``[k, d_out, d_in + 1]`` tensor."""
        return torch.cat([self.weight, self.bias.unsqueeze(2)], dim=2)


LayerBasis = Tensor | OuterVectors | SplitVectors
"""A layer's coarse vectors: a dense ``[k, d_out, d_in']`` tensor, :class:`OuterVectors`
or :class:`SplitVectors`."""

CoarseBasis = list[LayerBasis]
"""One :data:`LayerBasis` per layer (a dense :data:`~.coarse_spaces.Basis` is one)."""


def _first(b: LayerBasis) -> Tensor:
    """A tensor of the layer's form whose first dimension is ``k``."""
    if isinstance(b, OuterVectors):
        return b.left
    return b.weight if isinstance(b, SplitVectors) else b


def layer_count(b: LayerBasis) -> int:
    """``k``: how many coarse vectors the layer has."""
    return int(_first(b).shape[0])


def layer_dtype(b: LayerBasis) -> torch.dtype:
    """The dtype of the layer's vectors."""
    return _first(b).dtype


def layer_width(b: LayerBasis) -> int:
    """``d_in'``: the columns of the layer's vectors."""
    if isinstance(b, OuterVectors):
        return int(b.right.shape[1])
    return int(b.weight.shape[2] + 1 if isinstance(b, SplitVectors) else b.shape[-1])


def layer_numel(b: LayerBasis) -> int:
    """``d_out·d_in'``: how many entries one of the layer's vectors has."""
    rows = int(b.left.shape[1]) if isinstance(b, OuterVectors) else int(_first(b).shape[1])
    return rows * layer_width(b)


def dense_layer(b: LayerBasis) -> Tensor:
    """The layer's vectors as a dense ``[k, d_out, d_in']`` tensor."""
    return b if isinstance(b, Tensor) else b.dense()


def dense_basis(basis: Sequence[LayerBasis]) -> list[Tensor]:
    """Every layer's vectors dense (:func:`dense_layer`); a list of dense tensors is
    returned as it is."""
    if isinstance(basis, list) and all(isinstance(b, Tensor) for b in basis):
        return cast(list[Tensor], basis)
    return [dense_layer(b) for b in basis]


def split_vectors(vectors: Tensor) -> SplitVectors:
    """Dense ``[k, d_out, d_in + 1]`` vectors of a layer with a bias as
    :class:`SplitVectors` (a contiguous copy of the weight columns and of the bias)."""
    return SplitVectors(vectors[:, :, :-1].contiguous(), vectors[:, :, -1].contiguous())


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


def zero_rows(b: LayerBasis, rows: Sequence[int]) -> LayerBasis:
    """The layer's vectors with the rows ``rows`` of every ``[d_out, d_in']`` matrix set to
    zero, as new tensors (the rows of ``l`` for outer products ``l r̃ᵀ``)."""
    if isinstance(b, OuterVectors):
        left = b.left.clone()
        left[:, rows] = 0.0
        return OuterVectors(left, b.right)
    if isinstance(b, SplitVectors):
        weight, bias = b.weight.clone(), b.bias.clone()
        weight[:, rows], bias[:, rows] = 0.0, 0.0
        return SplitVectors(weight, bias)
    out = b.clone()
    out[:, rows] = 0.0
    return out


def layer_state(b: LayerBasis) -> Tensor | dict[str, Tensor]:
    """The layer's vectors as plain tensors for a checkpoint: a form's fields by name."""
    return b if isinstance(b, Tensor) else b._asdict()


def layer_from_state(saved: Tensor | dict[str, Tensor]) -> LayerBasis:
    """:func:`layer_state` read back."""
    if isinstance(saved, Tensor):
        return saved
    if set(saved) == {"left", "right"}:
        return OuterVectors(saved["left"], saved["right"])
    if set(saved) == {"weight", "bias"}:
        return SplitVectors(saved["weight"], saved["bias"])
    raise ValueError(f"not a saved coarse basis layer: keys {sorted(saved)}")


def restrict_layer(b: LayerBasis, v: Tensor) -> Tensor:
    """``⟨r_j, v⟩`` for the layer's ``k`` vectors and a layer matrix ``v`` (``[k]``):
    ``l_jᵀ v r̃_j`` for :class:`OuterVectors`; ``⟨V_j, v_W⟩ + ⟨b_j, v_b⟩`` for
    :class:`SplitVectors` (``v``'s weight columns copied, one layer at a time)."""
    if isinstance(b, OuterVectors):
        return ((b.left @ v) * b.right).sum(1)
    if isinstance(b, SplitVectors):
        weight = b.weight.flatten(1) @ v[:, :-1].reshape(-1)
        return weight.addmv_(b.bias, v[:, -1])
    return b.flatten(1) @ v.flatten()


def add_rows(target: Tensor, rows: Tensor, y: Tensor, alpha: float) -> Tensor:
    """``target ← target + α yᵀrows`` in place for a vector ``target`` (``[n]``) and
    ``rows`` ``[k, n]``: one vector's multiple (``addcmul_``) where ``k = 1``, a GEMV
    otherwise. Torch's CPU GEMV on the ``[n, 1]`` transpose is slow where it reads from
    memory: a residual basis' prolongation between refreshes took 0.98 ms on a 784 × 1000
    layer of the MNIST autoencoder (``addcmul_``: 0.65 ms); the two round alike
    to the last bit or so (``α·r·y`` and ``α·(r·y)``)."""
    if rows.shape[0] == 1:
        return target.addcmul_(rows[0], y, value=alpha)
    return target.addmv_(rows.T, y, alpha=alpha)


def prolong_add_layer(b: LayerBasis, y: Tensor, target: Tensor, alpha: float) -> Tensor:
    """``target ← target + α Σ_j y_j r_j`` in place (``y``: ``[k]`` in ``target``'s dtype);
    for :class:`OuterVectors` the rank-``k`` update ``α (lᵀ diag(y)) r̃``."""
    if isinstance(b, OuterVectors):
        return target.addmm_(b.left.T * y, b.right, alpha=alpha)
    if isinstance(b, SplitVectors):
        target[:, :-1].add_(torch.tensordot(y, b.weight, dims=1), alpha=alpha)
        add_rows(target[:, -1], b.bias, y, alpha)
        return target
    if target.is_contiguous():
        add_rows(target.view(-1), b.flatten(1), y, alpha)
        return target
    return target.add_(torch.einsum("k,koi->oi", y, b), alpha=alpha)


def sample_dots_layer(stats: LayerStats, b: LayerBasis) -> Tensor:
    """``⟨r_j, ∇ℓ_n⟩`` (``[N, k]``; :func:`~twolevel_kfac.curvature.sample_products.
    per_sample_dots`): ``Σ_t (δ_{n,t}ᵀl_j)(ā_{n,t}ᵀr̃_j)`` for :class:`OuterVectors` on the
    plain ``(ā, δ)`` rows, the weight and bias columns for :class:`SplitVectors`; a block
    with statistics of its own gets the dense vectors."""
    if isinstance(b, Tensor) or isinstance(stats, BlockStats):
        return per_sample_dots(stats, dense_layer(b))
    if isinstance(b, SplitVectors):  # Σ_t δᵀV a + (δᵀb)·ā_last, a = ā without its last entry
        a, last = stats.a[..., :-1], stats.a[..., -1]
        dots = [
            (stats.g @ w).mul_(a).sum((1, 2)) + (stats.g @ bias).mul_(last).sum(1)
            for w, bias in zip(b.weight, b.bias, strict=True)
        ]
        return torch.stack(dots, dim=1)
    projected = stats.g @ b.left.T.to(stats.g.dtype)  # [N, T, k]
    return projected.mul_(stats.a @ b.right.T.to(stats.a.dtype)).sum(1)


def gram_layer(b: LayerBasis) -> Tensor:
    """``⟨r_i, r_j⟩`` of the layer's vectors (``[k, k]``)."""
    if isinstance(b, OuterVectors):
        return (b.left @ b.left.T) * (b.right @ b.right.T)
    if isinstance(b, SplitVectors):
        weight = b.weight.flatten(1)
        return (weight @ weight.T).addmm_(b.bias, b.bias.T)
    flat = b.flatten(1)
    return flat @ flat.T
