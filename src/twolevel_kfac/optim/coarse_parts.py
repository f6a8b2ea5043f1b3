"""The two-level steps between refreshes on the gradients' weight and bias parts.

Between refreshes (kept ``Q = R₀ᵀF_c⁻¹R₀``, KFAC's own ``M⁻¹``) every combination of
:mod:`twolevel_kfac.twolevel.combinations` meets ``F̂ = F + λI`` only as ``F̂R₀ᵀu`` or
``R₀F̂v`` (:mod:`twolevel_kfac.twolevel.fisher_columns`), so it can work on ``∇W`` and ``∇b``
where autograd left them, as plain KFAC does: the ``W̄`` matrices are never formed, ``M⁻¹``
is applied once, to parts, and the coarse terms are added in place
(:class:`~twolevel_kfac.twolevel.coarse_matrix.CoarseOperator`). With ``ω_c`` the coarse
scale and ``u = ω_c F_c⁻¹R₀g``:

* additive: ``d = ω_f M⁻¹g + ω_c Qg``;
* A-DEF2: ``d = M⁻¹g + ω_c R₀ᵀF_c⁻¹R₀(g − F̂M⁻¹g)``;
* A-DEF1: ``d = M⁻¹(g − F̂R₀ᵀu) + R₀ᵀu``;
* balanced: ``z = M⁻¹(g − F̂R₀ᵀu)``, ``d = z + ω_c R₀ᵀF_c⁻¹(R₀g − R₀F̂z)``.

``F`` is read through the kept ``W₀ = FR₀ᵀ`` or the kept rows of the Fisher mini-batch
(with the projections ``P = JR₀ᵀ``), whichever the level keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

from ..curvature.sample_products import weighted_gradient_sum
from ..twolevel.coarse_matrix import CoarseOperator, coarse_projections
from ..twolevel.fisher_products import sample_coefficients_parts
from ..twolevel.parts import prolong_add_into_parts, restrict_parts
from ..twolevel.vectors import Parts

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = ["combine_on_parts", "fisher_restrict_parts"]

FineApply = Callable[[Parts], Parts]  # M⁻¹ on parts, into fresh tensors


def _operator(level: CoarseLevel) -> CoarseOperator:
    operator = level.coarse_operator
    assert operator is not None
    return operator


def _projections(level: CoarseLevel) -> Tensor:
    """``P = JR₀ᵀ`` (``[N, K]``) of the kept rows, formed once per operator."""
    operator, stats = _operator(level), level.fisher_stats
    assert stats is not None
    if level.projections is None or level.projections[0] is not operator:
        level.projections = (operator, coarse_projections(stats, operator.basis))
    return level.projections[1]


def fisher_restrict_parts(level: CoarseLevel, v: Parts) -> Tensor:
    """``R₀Fv`` (undamped, ``[K]``): ``W₀ᵀv`` with ``W₀`` kept, else ``Pᵀc/N`` with
    ``c_n = ⟨∇ℓ_n, v⟩`` from the kept rows."""
    if level.fisher_columns is not None:
        return level.fisher_columns.restrict_parts(v)
    stats, samples = level.fisher_stats, level.fisher_samples
    assert stats is not None and samples is not None
    return _projections(level).T @ sample_coefficients_parts(stats, v) / samples


def _fisher_prolong_into(level: CoarseLevel, u: Tensor, target: Parts, alpha: float) -> None:
    """``target ← target + α FR₀ᵀu`` (undamped): ``W₀u``, else ``Σ_n (Pu)_n ∇ℓ_n / N``
    from the kept rows, each layer's ``W̄`` matrix split into the parts."""
    if level.fisher_columns is not None:
        products = level.fisher_columns.apply(u)
    else:
        stats, samples = level.fisher_stats, level.fisher_samples
        assert stats is not None and samples is not None
        projections = _projections(level)
        weights = projections @ u.to(projections.dtype) / samples
        products = [weighted_gradient_sum(layer, weights) for layer in stats]
    for matrix, (weight, bias) in zip(products, target, strict=True):
        columns = matrix[:, :-1] if bias is not None else matrix
        weight.add_(columns.reshape(weight.shape).to(weight.dtype), alpha=alpha)
        if bias is not None:
            bias.add_(matrix[:, -1].to(bias.dtype), alpha=alpha)


def _minus_fisher_range(level: CoarseLevel, g: Parts, u: Tensor) -> Parts:
    """``g − F̂R₀ᵀu = g − FR₀ᵀu − λR₀ᵀu`` as fresh parts (``g`` is left as it is: the KL
    clip reads it)."""
    operator = _operator(level)
    out = [(w.clone(), None if b is None else b.clone()) for w, b in g]
    _fisher_prolong_into(level, u, out, -1.0)
    split = operator.parts_basis(tuple(b is not None for _, b in g))
    return prolong_add_into_parts(split, u, out, -level.host.damping)


def combine_on_parts(level: CoarseLevel, g: Parts, minv: FineApply) -> Parts:
    """The direction of this step's combination (module docstring) from the gradients'
    parts ``g``, as fresh parts; ``minv``: ``M⁻¹`` on parts."""
    options, operator = level.options, _operator(level)
    scale, combination = options.coarse_scale, options.combination
    split = operator.parts_basis(tuple(b is not None for _, b in g))
    if combination in ("additive", "adef2"):
        fine = minv(g)
        if combination == "adef2":
            restricted = restrict_parts(split, g) - fisher_restrict_parts(level, fine)
            restricted.sub_(restrict_parts(split, fine), alpha=level.host.damping)
            return operator.add_restricted_into_parts(scale, restricted, fine)
        if options.fine_weight != 1.0:
            for part in (t for pair in fine for t in pair if t is not None):
                part.mul_(options.fine_weight)
        return operator.add_into_parts(scale, g, fine)
    restricted_g = restrict_parts(split, g)
    u = operator.solve(restricted_g).mul_(scale)
    z = minv(_minus_fisher_range(level, g, u))
    if combination == "adef1":
        return prolong_add_into_parts(split, u, z, 1.0)
    # balanced: the second coarse solve on R₀g − R₀F̂z
    restricted = restricted_g - fisher_restrict_parts(level, z)
    restricted.sub_(restrict_parts(split, z), alpha=level.host.damping)
    return operator.add_restricted_into_parts(scale, restricted, z)
