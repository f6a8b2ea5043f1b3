"""The coarse basis ``R₀`` of a coarse level's ``coarse_space`` (:class:`~.coarse.CoarseLevel`
``build_basis``): the spaces of :mod:`twolevel_kfac.twolevel.coarse_spaces` on the level's
layers, with the spectral vectors read from the fine level's current decompositions (a
Kronecker block's ``q_G q_Aᵀ`` kept as its two factors: :mod:`twolevel_kfac.twolevel.layer_basis`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..curvature.blocks import block_parameters, has_bias, layer_shape
from ..curvature.extreme_eigen import frozen_eigenpairs
from ..curvature.kronecker import KroneckerFactors
from ..curvature.token_factors import frozen_diagonal, table_spectral_vector
from ..twolevel.coarse_spaces import (
    RESIDUAL_SPACES,
    build_basis,
    kronecker_spectral_pair,
    krylov_nicolaides,
    normalize_inf_,
)
from ..twolevel.layer_basis import (
    CoarseBasis,
    LayerBasis,
    OuterVectors,
    normalized_outer,
    split_vectors,
    zero_rows,
)
from ..twolevel.vectors import LayerVector, sub_into

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = [
    "nicolaides_basis",
    "refresh_layer_basis",
    "residual_terms",
    "space_basis",
    "spectral_vectors",
    "with_fixed_rows",
]

Terms = tuple[LayerVector | None, LayerVector | None, LayerVector | None]


def spectral_vectors(level: CoarseLevel) -> list[Tensor | OuterVectors]:
    """Per block of the level the eigenvector of its smallest (largest) eigenvalue, from
    the factors frozen at the last refresh (:func:`_layer_spectral_vector`). Not normalised."""
    return [_layer_spectral_vector(level, name) for name in level.names]


def _layer_spectral_vector(level: CoarseLevel, name: str) -> Tensor | OuterVectors:
    """Layer ``name``'s eigenvector of its block's smallest (largest) eigenvalue: ``q_G q_Aᵀ``
    of a Kronecker block, as its two factors; among the seen tokens for an embedding table;
    a block of its own gives its own ``spectral_vector``. From the factors frozen at the
    last refresh: the cached eigenpairs under ``inverse_method="eigen"``, else the one
    certified extreme pair of each factor (:func:`~twolevel_kfac.curvature.extreme_eigen.
    frozen_eigenpairs`, kept for the refresh's basis). Not normalised."""
    which, host = level.options.spectral_which, level.host
    factors = host.factors[name]
    if type(factors) is not KroneckerFactors:
        return factors.spectral_vector(which)  # type: ignore[attr-defined]
    decomp_a, decomp_g = factors.decomp_a, factors.decomp_g
    assert decomp_a is not None and decomp_g is not None
    vals_a, vecs_a = frozen_eigenpairs(decomp_a, which)
    if name in host.token_tables:  # G = diag(f): its eigenvectors are e_v
        return table_spectral_vector(frozen_diagonal(decomp_g), vals_a, vecs_a, which)
    vals_g, vecs_g = frozen_eigenpairs(decomp_g, which)
    q_g, q_a = kronecker_spectral_pair(vecs_a, vals_a, vecs_g, vals_g, which)
    return OuterVectors(q_g.unsqueeze(0), q_a.unsqueeze(0))


def refresh_layer_basis(level: CoarseLevel, names: Sequence[str], name: str) -> LayerBasis:
    """Layer ``name``'s vectors of the basis a refresh on the layers ``names`` builds
    (:func:`space_basis` with :func:`with_fixed_rows`, in the first layer's dtype and on
    its device), formed once the layer's statistics are folded and before the fine level
    refreshes: the Nicolaides vectors, or the spectral vector of the decomposition the
    refresh installs, installed now (:meth:`~.fine.FineLevel.refresh_layer`: where this
    step decomposes at the fold, the layer's fold did; also where it was dropped as
    non-finite, so the factors folded since the last refresh count)."""
    param = block_parameters(level.host.layers[names[0]])[0]  # space_basis' dtype
    vector: LayerBasis
    if level.options.coarse_space == "spectral":
        level.host.fine.refresh_layer(name)
        vector = _normalized(_layer_spectral_vector(level, name), param.dtype)
    else:
        vector = _ones(param, layer_shape(level.host.layers[name]))
    return with_fixed_rows(level, [name], [vector])[0]


def _normalized(vector: Tensor | OuterVectors, dtype: torch.dtype) -> LayerBasis:
    """One spectral vector as a normalised ``k = 1`` layer basis in ``dtype`` (the
    eigenvectors are in the factors' dtype)."""
    if isinstance(vector, OuterVectors):
        return normalized_outer(vector.left.to(dtype), vector.right.to(dtype))
    return normalize_inf_(vector.to(dtype).unsqueeze(0).clone())


def nicolaides_basis(level: CoarseLevel, names: Sequence[str]) -> CoarseBasis:
    """The Nicolaides vectors ``1·1ᵀ`` of the layers ``names`` (already normalised), in the
    dtype and on the device of the first one's parameters: the layer shapes alone."""
    layers = level.host.layers
    param = block_parameters(layers[names[0]])[0]
    return [_ones(param, layer_shape(layers[n])) for n in names]


def _ones(param: Tensor, shape: tuple[int, int]) -> OuterVectors:
    """The Nicolaides vector ``1·1ᵀ`` of a ``(d_out, d_in)`` block, like ``param``."""
    d_out, d_in = shape
    return OuterVectors(param.new_ones(1, d_out), param.new_ones(1, d_in))


def with_fixed_rows(
    level: CoarseLevel, names: Sequence[str], basis: Sequence[LayerBasis]
) -> CoarseBasis:
    """``basis`` of the layers ``names`` with the rows no step may move set to zero (an
    untied embedding's ``padding_idx`` row: :func:`~twolevel_kfac.curvature.layer_types.
    fixed_rows`), so that ``Q = R₀ᵀF_c⁻¹R₀`` never touches them."""
    rows = [level.host.fixed_rows.get(name) for name in names]
    return [zero_rows(b, r) if r else b for b, r in zip(basis, rows, strict=True)]


def space_basis(level: CoarseLevel, minv_res: LayerVector | None) -> CoarseBasis:
    """``R₀`` of ``level.options.coarse_space`` on ``level.names`` (``minv_res``: ``M⁻¹res``
    for the residual spaces)."""
    space, host = level.options.coarse_space, level.host
    param = block_parameters(host.layers[level.names[0]])[0]  # its dtype and device
    if space == "spectral":
        return [_normalized(v, param.dtype) for v in spectral_vectors(level)]
    if space in RESIDUAL_SPACES and minv_res is not None:
        return _residual_basis(level, minv_res)
    shapes = [layer_shape(host.layers[n]) for n in level.names]
    if space in ("nicolaides", "tselepidis"):
        return nicolaides_basis(level, level.names)
    if space == "krylov_nicolaides":
        return [
            _krylov_nicolaides_layer(level, n, shape, param)
            for n, shape in zip(level.names, shapes, strict=True)
        ]
    return build_basis(  # type: ignore[return-value]  # list[Tensor] is a CoarseBasis
        space, shapes, minv=level.minv, minv_res=minv_res, dtype=param.dtype, device=param.device
    )


def residual_terms(level: CoarseLevel, g: LayerVector, refreshed: bool) -> Terms:
    """What a step on the ``W̄`` matrices forms before its coarse operator: ``M⁻¹g`` (where
    its combination reads it, or to form the residual), ``res = g − F̂M⁻¹g`` (where a residual
    basis is rebuilt: every step in the faithful schedule, on refresh steps in the
    consistent one; or A-DEF2 or the diagnostics read it) and ``M⁻¹res`` for a rebuilt
    residual basis. Each is held only while something reads it: A-DEF1 and balanced drop
    ``M⁻¹g`` once ``res`` is formed (they apply ``M⁻¹`` to other vectors), and where nothing
    else reads ``res``, ``M⁻¹res`` is written over it (the new basis then takes it over)."""
    options = level.options
    rebuilds_basis = options.coarse_space in RESIDUAL_SPACES and (
        refreshed or options.coarse_refresh == "faithful" or level.coarse_operator is None
    )
    reads_residual = options.combination == "adef2" or options.diagnostics
    needs_residual = rebuilds_basis or reads_residual
    minv_g = level.minv(g) if needs_residual or options.combination == "additive" else None
    residual = None
    if minv_g is not None and needs_residual:
        residual = sub_into(g, level.fhat(minv_g))
    if options.combination in ("adef1", "balanced"):
        minv_g = None
    minv_res = None
    if rebuilds_basis and residual is not None:
        minv_res = level.minv(residual) if reads_residual else level.minv_into(residual)
        residual = residual if reads_residual else None
    return minv_g, residual, minv_res


def _residual_basis(level: CoarseLevel, minv_res: LayerVector) -> CoarseBasis:
    """``{M⁻¹res}`` (residual) or ``{M⁻¹res, M⁻¹M⁻¹res}`` (Krylov-residual) per layer,
    normalised (:func:`~twolevel_kfac.twolevel.coarse_spaces.residual`,
    :func:`~twolevel_kfac.twolevel.coarse_spaces.krylov_residual`), taking over the
    level's temporary ``minv_res`` (the list is emptied): a residual vector is normalised
    in place, and a Krylov pair is written layer by layer, each ``M⁻¹res`` freed once its
    pair holds it, so the refresh holds no second copy of the basis. A layer with a bias
    keeps its vectors as :class:`~twolevel_kfac.twolevel.layer_basis.SplitVectors`: the
    steps on parts read them without a copy of their weight columns (a step on the ``W̄``
    path copies a layer's weight columns to restrict)."""
    krylov = level.options.coarse_space == "krylov_residual"
    layers = list(minv_res)
    minv_res.clear()
    basis: CoarseBasis = []
    for name in level.names:
        vector = layers.pop(0)
        if krylov:
            pair = vector.new_empty((2, *vector.shape))
            level.minv_layer_into(name, pair[0].copy_(vector), pair[1])
        else:
            pair = vector.unsqueeze(0)
        del vector
        normalize_inf_(pair)
        basis.append(split_vectors(pair) if has_bias(level.host.layers[name]) else pair)
    return basis


def _krylov_nicolaides_layer(
    level: CoarseLevel, name: str, shape: tuple[int, int], param: Tensor
) -> LayerBasis:
    """Layer ``name``'s ``{1, M⁻¹1}`` (:func:`~twolevel_kfac.twolevel.coarse_spaces.
    krylov_nicolaides`) from ``M⁻¹(1 1ᵀ)`` as a rank-one product: where the block's inverse
    is a Kronecker product, ``M⁻¹1 = (G⁻¹1)(A⁻¹1)ᵀ`` and the pair is kept as outer products
    ``{1·1ᵀ, (G⁻¹1)(A⁻¹1)ᵀ}`` (:class:`~twolevel_kfac.twolevel.layer_basis.OuterVectors`)."""
    d_out, d_in = shape
    ones_out, ones_in = param.new_ones(d_out), param.new_ones(d_in)
    applied = level.host.apply_fine_outer(name, ones_out, ones_in)
    if isinstance(applied, tuple):
        left, right = applied
        return normalized_outer(torch.stack([ones_out, left]), torch.stack([ones_in, right]))
    return krylov_nicolaides(
        [shape], level.minv, minv_ones=[applied], dtype=param.dtype, device=param.device
    )[0]
