"""The two-level steps on the gradients' weight and bias parts: every step between
refreshes and every refresh step, unless the step needs the ``W̄`` matrices
(:meth:`~.coarse.CoarseLevel.precondition`: another fine level, the diagnostics, a layer
without a gradient, or, under ``torch.distributed``, a combination that reads the Fisher
rows of every rank: :func:`_parts_allowed`). A residual space
builds its basis here too (at a refresh, or at every step in the faithful schedule):
``M⁻¹g`` on parts, the residual ``g − F̂M⁻¹g`` as the one joined vector, ``M⁻¹res``
written into its weight and bias columns and kept as the split basis.

With ``Q = R₀ᵀF_c⁻¹R₀`` built and KFAC's own ``M⁻¹``, every combination of
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

import torch
from torch import Tensor

from ..curvature.blocks import LayerStats, gradient_parts
from ..curvature.kronecker_apply import LayerParts
from ..curvature.sample_products import weighted_gradient_sum
from ..twolevel.coarse_matrix import CoarseOperator, coarse_projections
from ..twolevel.coarse_spaces import RESIDUAL_SPACES
from ..twolevel.fisher_products import sample_coefficients_parts
from ..twolevel.parts import ConstantPart, SplitBasis, prolong_add_into_parts, restrict_parts
from ..twolevel.vectors import LayerVector, Parts
from .coarse_fisher import fisher_product_parts

if TYPE_CHECKING:
    from .coarse import CoarseLevel

__all__ = [
    "combine_on_parts",
    "fisher_restrict_parts",
    "parts_step",
    "refreshes_on_parts",
    "steps_on_parts",
]

LayerApply = Callable[[int, LayerParts], LayerParts]  # M⁻¹ on the i-th layer's parts


def _every_layer(minv_layer: LayerApply, parts: Parts) -> Parts:
    """``M⁻¹`` on every layer's parts, into fresh tensors."""
    return [minv_layer(i, part) for i, part in enumerate(parts)]


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
    contiguous = torch.contiguous_format  # the prolongation views the weight part flat
    out = [(w.clone(memory_format=contiguous), None if b is None else b.clone()) for w, b in g]
    _fisher_prolong_into(level, u, out, -1.0)
    split = operator.parts_basis(tuple(b is not None for _, b in g))
    return prolong_add_into_parts(split, u, out, -level.host.damping)


def _additive_by_layer(
    level: CoarseLevel, g: Parts, split: SplitBasis, minv_layer: LayerApply
) -> Parts:
    """The additive direction ``ω_f M⁻¹g + ω_c Qg`` one layer at a time: ``F_c⁻¹R₀g``
    first, then each layer's ``M⁻¹g`` and at once its coarse term, while that direction
    is still in cache (bit for bit :meth:`~.CoarseOperator.add_into_parts` after the
    whole ``M⁻¹g``: the same operations on each tensor; CURVES' residual space between
    refreshes: 0.12 ms of a 19.2 ms step)."""
    options, operator = level.options, _operator(level)
    y = operator.solve(restrict_parts(split, g))
    sizes = [1 if isinstance(e, ConstantPart) else int(e[0].shape[0]) for e in split]
    out = []
    for i, (entry, yi) in enumerate(zip(split, torch.split(y, sizes), strict=True)):
        fine = minv_layer(i, g[i])
        if options.fine_weight != 1.0:
            for part in (t for t in fine if t is not None):
                part.mul_(options.fine_weight)
        out.append(prolong_add_into_parts([entry], yi, [fine], options.coarse_scale)[0])
    return out


def combine_on_parts(
    level: CoarseLevel, g: Parts, minv_layer: LayerApply, fine: Parts | None = None
) -> Parts:
    """The direction of this step's combination (module docstring) from the gradients'
    parts ``g``, as fresh parts; ``minv_layer``: ``M⁻¹`` on a layer's parts; ``fine``:
    ``M⁻¹g`` where the step formed it already (a residual refresh), which additive and
    A-DEF2 then write their direction into."""
    options, operator = level.options, _operator(level)
    scale, combination = options.coarse_scale, options.combination
    split = operator.parts_basis(tuple(b is not None for _, b in g))
    constant = all(isinstance(e, ConstantPart) for e in split)  # one batched Qg is faster
    if combination == "additive" and fine is None and not constant:
        return _additive_by_layer(level, g, split, minv_layer)
    if combination in ("additive", "adef2"):
        fine = _every_layer(minv_layer, g) if fine is None else fine
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
    z = _every_layer(minv_layer, _minus_fisher_range(level, g, u))
    if combination == "adef1":
        return prolong_add_into_parts(split, u, z, 1.0)
    # balanced: the second coarse solve on R₀g − R₀F̂z
    restricted = restricted_g - fisher_restrict_parts(level, z)
    restricted.sub_(restrict_parts(split, z), alpha=level.host.damping)
    return operator.add_restricted_into_parts(scale, restricted, z)


def _parts_allowed(level: CoarseLevel, reads_columns: bool) -> bool:
    """KFAC's own ``M⁻¹``, a coarse term, no diagnostics (they need the residual), and
    ``F̂`` read through ``W₀`` (``reads_columns``) or on one process (additive reads the
    rows only for a residual basis, whose ``F̂`` product is all-reduced)."""
    coarse, host = level.options, level.host
    return (
        (coarse.combination == "additive" or reads_columns or not host.comm.distributed)
        and coarse.coarse_scale != 0.0
        and not coarse.diagnostics
        and host.fine.plain
    )


def steps_on_parts(level: CoarseLevel) -> bool:
    """Whether a step between refreshes runs on parts: :func:`_parts_allowed` with the kept
    ``Q``, or, in the faithful residual schedule (a basis rebuilt at every step from the
    kept rows, its ``F̂`` product summed over the ranks), with the rows."""
    if level._per_step_basis:
        return level.fisher_stats is not None and _parts_allowed(level, False)
    allowed = _parts_allowed(level, level.fisher_columns is not None)
    return allowed and level.host._stateless_directions()


def refreshes_on_parts(level: CoarseLevel, stats: dict[str, LayerStats]) -> bool:
    """Whether a refresh step runs on parts: every layer with statistics and a gradient,
    and :func:`_parts_allowed` (the rows just kept, no ``W₀`` yet)."""
    return level.host.active == level.refresh_names(stats) and _parts_allowed(level, False)


def _residual_matrices(level: CoarseLevel, g: Parts, fine: Parts) -> LayerVector:
    """``res = g − F̂M⁻¹g = g − F·fine − λ·fine`` (``fine = M⁻¹g``) as ``W̄`` matrices, in the
    fresh tensors of the Fisher products (:func:`~.coarse_fisher.fisher_product_parts`);
    ``g`` and ``fine`` are left as they are."""
    products = fisher_product_parts(level, fine)
    damping = level.host.damping
    for matrix, (weight, bias), (fine_weight, fine_bias) in zip(products, g, fine, strict=True):
        columns = matrix[:, :-1] if bias is not None else matrix
        pairs = [(columns, weight, fine_weight)]
        if bias is not None and fine_bias is not None:
            pairs.append((matrix[:, -1], bias, fine_bias))
        for out, grad, direction in pairs:  # out ← grad − (out + λ·direction)
            out.add_(direction.reshape(out.shape), alpha=damping)
            torch.sub(grad.reshape(out.shape), out, out=out)
    return products


def _residual_refresh(
    level: CoarseLevel, g: Parts, minv_layer: LayerApply, refreshed: bool
) -> Parts:
    """A residual space's basis built on parts (:func:`~.coarse_basis.residual_terms` on the
    ``W̄`` path; at a refresh, or at every step in the faithful schedule): the old basis
    dropped, ``fine = M⁻¹g``, then ``res = g − F̂·fine`` as ``W̄`` matrices, ``M⁻¹res``
    written over it and taken over by the new basis, and ``Q`` (with a new ``F_c`` at a
    refresh). Returns ``fine`` for the combination. Only the residual is ever joined: the
    gradient is read where autograd left it and the direction is written as parts."""
    level._drop_basis()
    fine = _every_layer(minv_layer, g)
    level._build_operator(refreshed, level.minv_into(_residual_matrices(level, g, fine)))
    return fine


def parts_step(
    level: CoarseLevel, stats: dict[str, LayerStats]
) -> tuple[dict[str, LayerParts], dict[str, LayerParts]] | None:
    """This step's directions and gradients as weight and bias parts (a refresh step first
    keeps the mini-batch and rebuilds ``Q``), or ``None`` when it needs the ``W̄`` path.
    The ``Q`` a refresh replaces, with its split basis, is gone by then
    (:meth:`~.coarse.CoarseLevel.release_replaced`)."""
    refreshed = level.refreshing(stats)
    if refreshed:
        if not level._refreshes_on_parts(stats):
            return None
        level._start_refresh(stats)
    else:
        level._between_refreshes()
        if not level._steps_on_parts() or level.host.active != level.names:
            return None
    host, names = level.host, level.names
    grads = {name: gradient_parts(host.layers[name]) for name in names}
    g = [grads[n] for n in names]

    def minv_layer(i: int, part: LayerParts) -> LayerParts:
        return host._apply_fine_split(names[i], *part)

    fine = None
    if level.options.coarse_space in RESIDUAL_SPACES and (refreshed or level._per_step_basis):
        fine = _residual_refresh(level, g, minv_layer, refreshed)
        if level.options.combination not in ("additive", "adef2"):
            fine = None  # A-DEF1 and balanced apply M⁻¹ to other vectors
    elif refreshed:
        level._build_operator(True, None)
    directions = combine_on_parts(level, g, minv_layer, fine)
    if refreshed:
        level._keep_fisher()
    return dict(zip(names, directions, strict=True)), grads
