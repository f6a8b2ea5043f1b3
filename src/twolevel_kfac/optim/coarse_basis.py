"""The coarse basis ``R₀`` of a coarse level's ``coarse_space`` (:class:`~.coarse.CoarseLevel`
``build_basis``): the spaces of :mod:`twolevel_kfac.twolevel.coarse_spaces` on the level's
layers, with the spectral vectors read from the fine level's current decompositions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..curvature.blocks import block_parameters, layer_shape
from ..curvature.extreme_eigen import frozen_eigenpairs
from ..curvature.kronecker import KroneckerFactors
from ..curvature.tokens import table_spectral_vector
from ..twolevel.coarse_spaces import build_basis, kronecker_spectral_vector, spectral_basis
from ..twolevel.vectors import LayerVector

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = ["space_basis", "spectral_vectors"]


def spectral_vectors(level: CoarseLevel) -> list[Tensor]:
    """Per block the eigenvector of its smallest (largest) eigenvalue, from the factors
    frozen at the last refresh (``q_G q_Aᵀ`` of a Kronecker block; among the seen tokens
    for an embedding table; a block of its own gives its own ``spectral_vector``): the
    cached eigenpairs under ``inverse_method="eigen"``, else the one certified extreme pair
    of each factor (:func:`~twolevel_kfac.curvature.extreme_eigen.frozen_eigenpairs`)."""
    which, vectors, host = level.options.spectral_which, [], level.host
    for name in level.names:
        factors = host.factors[name]
        if type(factors) is not KroneckerFactors:
            vectors.append(factors.spectral_vector(which))  # type: ignore[attr-defined]
            continue
        assert factors.decomp_a is not None and factors.decomp_g is not None
        vals_a, vecs_a = frozen_eigenpairs(factors.decomp_a, which)
        if name in host.token_tables:  # G = diag(f): its eigenvectors are e_v
            values_g, vectors_g = factors.decomp_g
            cholesky = vectors_g.numel() == 0  # the frozen G itself
            frequencies = values_g.diagonal() if cholesky else (vectors_g**2) @ values_g
            vectors.append(table_spectral_vector(frequencies, vals_a, vecs_a, which))
            continue
        vals_g, vecs_g = frozen_eigenpairs(factors.decomp_g, which)
        vectors.append(kronecker_spectral_vector(vecs_a, vals_a, vecs_g, vals_g, which))
    return vectors


def space_basis(level: CoarseLevel, minv_res: LayerVector | None) -> list[Tensor]:
    """``R₀`` of ``level.options.coarse_space`` on ``level.names`` (``minv_res``: ``M⁻¹res``
    for the residual spaces)."""
    space, host = level.options.coarse_space, level.host
    param = block_parameters(host.layers[level.names[0]])[0]  # its dtype and device
    if space == "spectral":  # the eigenvectors are in the factors' dtype
        return spectral_basis([v.to(param.dtype) for v in spectral_vectors(level)])
    shapes = [layer_shape(host.layers[n]) for n in level.names]
    minv_ones = None
    if space == "krylov_nicolaides":  # M⁻¹(1 1ᵀ) as a rank-one product, layer by layer
        minv_ones = (
            host.apply_fine_outer(n, param.new_ones(d_out), param.new_ones(d_in))
            for n, (d_out, d_in) in zip(level.names, shapes, strict=True)
        )
    return build_basis(
        space,
        shapes,
        minv=level.minv,
        minv_res=minv_res,
        minv_ones=minv_ones,
        dtype=param.dtype,
        device=param.device,
    )
