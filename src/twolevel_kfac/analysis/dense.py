"""Dense ``P × P`` matrices of the analysis methods (``d = P g``), for networks small enough
for the dense backend.

KFAC's (and every fine level's) ``M⁻¹`` is ``apply_fine`` on all unit vectors of a layer at
once (a batch of matrices). A two-level ``P`` runs the optimizer's combination function
(:mod:`twolevel_kfac.twolevel.combinations`) on the identity, one row per unit vector, with
the dense ``M⁻¹``, ``F̂`` and ``Q = R₀ᵀF_c⁻¹R₀`` — ``F_c⁻¹`` from the preconditioner's own
:class:`~twolevel_kfac.twolevel.coarse_matrix.CoarseOperator` (Jacobi scaling,
pseudo-inverse fallback included). Residual-based spaces build ``R₀`` from the current
``g``: their ``P`` is the matrix *for the basis built from this gradient*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..optim.preconditioner import KFACPreconditioner
from ..twolevel.combinations import get_combination
from ..twolevel.layer_basis import layer_count
from ..twolevel.vectors import LayerVector
from .backends import DenseBackend

if TYPE_CHECKING:
    from .operators import MethodSet, MethodSpec


def dense_backend(ms: MethodSet) -> DenseBackend:
    """The method set's backend, which must be dense.

    Raises:
        ValueError: for a matrix-free method set.
    """
    if not isinstance(ms.backend, DenseBackend):
        raise ValueError("dense matrices need the dense backend (backend='dense')")
    return ms.backend


def preconditioner_matrix(ms: MethodSet, spec: MethodSpec) -> Tensor:
    """The dense preconditioner ``P`` of a parsed method, ``[P, P]``."""
    backend = dense_backend(ms)
    if spec.kind == "exact":
        return torch.cholesky_inverse(torch.linalg.cholesky(backend.fhat_matrix()))
    if spec.kind == "block_diagonal":
        return torch.block_diag(*[torch.linalg.inv(b) for b in backend.fhat_blocks()])
    if spec.kind in ("kfac", "fine"):
        return torch.block_diag(*minv_blocks(ms, ms.preconditioner(spec)))
    assert spec.space is not None and spec.combination is not None
    return _twolevel_matrix(ms, spec.space, spec.combination)


def minv_blocks(ms: MethodSet, pre: KFACPreconditioner) -> list[Tensor]:
    """``M_i⁻¹`` per layer: ``apply_fine`` on every unit matrix of the layer at once."""
    curvature = ms.curvature
    blocks = []
    for name, (d_out, d_in), size in zip(
        curvature.names, curvature.shapes, curvature.sizes, strict=True
    ):
        eye = torch.eye(size, dtype=curvature.grad[0].dtype).reshape(size, d_out, d_in)
        rows = pre.apply_fine(name, eye).reshape(size, size)  # row k = (M⁻¹e_k)ᵀ
        blocks.append(rows.T)
    return blocks


def coarse_inverse(ms: MethodSet, space: str) -> Tensor:
    """``F_c⁻¹`` (``[K, K]``) from the optimizer's :class:`CoarseOperator`."""
    op = ms.operator(space)
    k = sum(layer_count(b) for b in op.basis)
    eye = torch.eye(k, dtype=ms.curvature.grad[0].dtype)
    return torch.stack([op.solve(e) for e in eye], dim=1)


def coarse_matrix(ms: MethodSet, space: str) -> Tensor:
    """``Q = R₀ᵀ F_c⁻¹ R₀`` with ``F_c⁻¹`` from the optimizer's :class:`CoarseOperator`."""
    r0 = ms.dense_basis(space)
    return r0.T @ coarse_inverse(ms, space) @ r0


def _twolevel_matrix(ms: MethodSet, space: str, combination: str) -> Tensor:
    """Run the optimizer's combination on the identity (rows = unit vectors).

    ``M⁻¹`` is applied block by block and ``Q = R₀ᵀF_c⁻¹R₀`` in factored form, so only
    the ``F̂`` products cost ``O(P³)``.
    """
    ms.twolevel(space, combination)  # builds the basis from this gradient
    blocks = minv_blocks(ms, ms.kfac(ms.damping_mode))
    r0, fc_inv = ms.dense_basis(space), coarse_inverse(ms, space)
    fhat = dense_backend(ms).fhat_matrix()
    eye = torch.eye(fhat.shape[0], dtype=fhat.dtype, device=fhat.device)
    sizes = ms.curvature.sizes

    def minv(v: LayerVector) -> LayerVector:
        parts = torch.split(v[0], sizes, dim=1)
        return [torch.cat([p @ b.T for p, b in zip(parts, blocks, strict=True)], dim=1)]

    def coarse(v: LayerVector) -> LayerVector:
        return [((v[0] @ r0.T) @ fc_inv.T) @ r0]

    def fhat_rows(v: LayerVector) -> LayerVector:
        return [v[0] @ fhat.T]

    result = get_combination(combination)(
        [eye], minv, coarse, fhat_rows, coarse_scale=ms.coarse_scale
    )
    return result.direction[0].T
