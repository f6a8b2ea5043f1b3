"""Two-level combinations of the fine KFAC step with the coarse correction.

Notation of Tang, Nabben, Vuik & Erlangga (2009), "Comparison of two-level
preconditioners derived from deflation, domain decomposition and multigrid methods":
``F̂ = F + λI`` (the exact damped Fisher of the Fisher mini-batch), ``M⁻¹`` the
block-diagonal damped KFAC inverse, ``Q = R₀ᵀ F_c⁻¹ R₀`` with ``F_c = R₀ F̂ R₀ᵀ``
(Koroko et al. 2023, §2). Every function takes

* ``g``: the gradient (a layer vector),
* ``minv``: ``v ↦ M⁻¹v``; ``coarse``: ``v ↦ Qv``; ``fhat``: ``v ↦ F̂v``,
* ``coarse_scale`` ``ω_c`` (default 1): the weight of the coarse term, applied as
  ``Q → ω_c Q`` everywhere ``Q`` appears (i.e. ``F_c → F_c/ω_c``). With
  ``coarse_scale=0`` every combination returns exactly ``M⁻¹g`` (with the default
  ``fine_weight``) and calls neither ``coarse`` nor ``fhat``;
* ``fine_weight`` ``ω_f`` (default 1): the weight of ``M⁻¹g`` in the additive form only
  (Tselepidis' ``ω₁``); the other forms require ``1``;
* ``minv_g`` / ``residual``: ``M⁻¹g`` and ``res = g − F̂M⁻¹g`` when the caller already
  has them (e.g. from building a residual coarse space), so they are not recomputed.

and returns a :class:`CombinationResult`. Products per call with ``ω_c ≠ 0`` (``F̂v`` =
one exact Fisher–vector product): additive 0, A-DEF2 1 (0 given ``residual``),
A-DEF1 1, balanced 2; each applies ``M⁻¹`` once (A-DEF2 and additive: none given
``minv_g``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol, runtime_checkable

from twolevel_kfac.twolevel.vectors import (
    LayerVector,
    LinearMap,
    axpy_into,
    scale,
    scale_into,
    sub_into,
)


class CombinationResult(NamedTuple):
    """A two-level direction.

    Attributes:
        direction: ``d ≈ F̂⁻¹g`` (the step is ``−lr·d``).
        residual: ``res = g − F̂M⁻¹g`` when this call computed it or was given it, else
            ``None``.
    """

    direction: LayerVector
    residual: LayerVector | None


class Combination(Protocol):
    """The common signature of the combinations of :data:`COMBINATIONS`."""

    def __call__(
        self,
        g: LayerVector,
        minv: LinearMap,
        coarse: LinearMap,
        fhat: LinearMap,
        *,
        coarse_scale: float = 1.0,
        fine_weight: float = 1.0,
        minv_g: LayerVector | None = None,
        residual: LayerVector | None = None,
    ) -> CombinationResult:
        """The direction (and residual) for gradient ``g`` (:data:`COMBINATIONS`)."""
        ...


@runtime_checkable
class FusedCoarse(Protocol):
    """A coarse map that can also add ``α Qv`` into a vector in place
    (:class:`~twolevel_kfac.twolevel.coarse_matrix.CoarseOperator`)."""

    def __call__(self, v: LayerVector) -> LayerVector:
        """``Qv``."""
        ...

    def add_into(self, alpha: float, v: LayerVector, target: LayerVector) -> LayerVector:
        """``target ← target + α Qv``, returned."""
        ...


def add_coarse_into(
    alpha: float, coarse: LinearMap, v: LayerVector, target: LayerVector
) -> LayerVector:
    """``target ← target + α Qv`` (``target`` is overwritten and returned), fused into one
    pass per layer when ``coarse`` offers it (:class:`FusedCoarse`)."""
    if isinstance(coarse, FusedCoarse):
        return coarse.add_into(alpha, v, target)
    return axpy_into(alpha, coarse(v), target)


def _fine_step(
    g: LayerVector, minv: LinearMap, minv_g: LayerVector | None, residual: LayerVector | None
) -> CombinationResult:
    """``M⁻¹g``, reusing ``minv_g`` when given (the ``coarse_scale = 0`` limit)."""
    return CombinationResult(minv(g) if minv_g is None else list(minv_g), residual)


def _require_unit_fine_weight(name: str, fine_weight: float) -> None:
    if fine_weight != 1.0:
        raise ValueError(f"fine_weight applies to combination='additive' only, not {name!r}")


def additive(
    g: LayerVector,
    minv: LinearMap,
    coarse: LinearMap,
    fhat: LinearMap,
    *,
    coarse_scale: float = 1.0,
    fine_weight: float = 1.0,
    minv_g: LayerVector | None = None,
    residual: LayerVector | None = None,
) -> CombinationResult:
    """Additive two-level step ``d = ω_f M⁻¹g + ω_c Q g`` (Tang et al. 2009 "AD").

    The authors' released code and Tselepidis et al. (2020) (``ω₁, ω₂``); the authors'
    older runs tuned ``ω_c`` in ``{1e-4, …, 1}``. Uses no Fisher–vector product (``fhat``
    is accepted for the common signature and not called).

    Returns:
        The direction; ``residual`` is passed through.
    """
    del fhat
    fine = _fine_step(g, minv, minv_g, residual).direction
    if fine_weight != 1.0:
        fine = scale(fine_weight, fine)
    if coarse_scale == 0.0:
        return CombinationResult(fine, residual)
    return CombinationResult(add_coarse_into(coarse_scale, coarse, g, fine), residual)


def adef2(
    g: LayerVector,
    minv: LinearMap,
    coarse: LinearMap,
    fhat: LinearMap,
    *,
    coarse_scale: float = 1.0,
    fine_weight: float = 1.0,
    minv_g: LayerVector | None = None,
    residual: LayerVector | None = None,
) -> CombinationResult:
    """A-DEF2 step ``d = M⁻¹g + ω_c Q (g − F̂M⁻¹g)`` (Tang et al. 2009).

    With ``ω_c = 1`` the error ``F̂⁻¹g − d = (I − QF̂)(F̂⁻¹g − M⁻¹g)`` is the F̂-orthogonal
    projection of the KFAC error, so ``‖d − F̂⁻¹g‖_F̂ ≤ ‖M⁻¹g − F̂⁻¹g‖_F̂``: the
    energy-optimal coarse correction of the KFAC step (the authors' ``E(β*) − E(0)``).

    Returns:
        The direction and ``res = g − F̂M⁻¹g``.

    Raises:
        ValueError: if ``fine_weight != 1``.
    """
    _require_unit_fine_weight("adef2", fine_weight)
    fine = _fine_step(g, minv, minv_g, residual).direction
    if coarse_scale == 0.0:
        return CombinationResult(fine, residual)
    res = sub_into(g, fhat(fine)) if residual is None else residual
    return CombinationResult(add_coarse_into(coarse_scale, coarse, res, fine), res)


def adef1(
    g: LayerVector,
    minv: LinearMap,
    coarse: LinearMap,
    fhat: LinearMap,
    *,
    coarse_scale: float = 1.0,
    fine_weight: float = 1.0,
    minv_g: LayerVector | None = None,
    residual: LayerVector | None = None,
) -> CombinationResult:
    """A-DEF1 step ``d = y + M⁻¹(g − F̂y)`` with ``y = ω_c Q g`` (Tang et al. 2009).

    I.e. ``d = [M⁻¹(I − ω_c F̂Q) + ω_c Q] g``; ``ω_c = 0`` gives ``M⁻¹g``. ``minv_g``
    is used only when ``coarse_scale = 0`` (A-DEF1 never applies ``M⁻¹`` to ``g``).

    Returns:
        The direction; ``residual`` is passed through.

    Raises:
        ValueError: if ``fine_weight != 1``.
    """
    _require_unit_fine_weight("adef1", fine_weight)
    if coarse_scale == 0.0:
        return _fine_step(g, minv, minv_g, residual)
    y = scale_into(coarse_scale, coarse(g))
    return CombinationResult(axpy_into(1.0, minv(sub_into(g, fhat(y))), y), residual)


def balanced(
    g: LayerVector,
    minv: LinearMap,
    coarse: LinearMap,
    fhat: LinearMap,
    *,
    coarse_scale: float = 1.0,
    fine_weight: float = 1.0,
    minv_g: LayerVector | None = None,
    residual: LayerVector | None = None,
) -> CombinationResult:
    """Balanced (BNN) step ``d = (I − ω_c QF̂) M⁻¹ (I − ω_c F̂Q) g + ω_c Q g``.

    Tang et al. (2009). Computed as ``z = M⁻¹(g − F̂ ω_c Qg)``,
    ``d = z + ω_c Q (g − F̂z)`` (two Fisher–vector products, one ``M⁻¹``); ``ω_c = 0``
    gives ``M⁻¹g``. ``minv_g`` is used only when ``coarse_scale = 0``.

    Returns:
        The direction; ``residual`` is passed through.

    Raises:
        ValueError: if ``fine_weight != 1``.
    """
    _require_unit_fine_weight("balanced", fine_weight)
    if coarse_scale == 0.0:
        return _fine_step(g, minv, minv_g, residual)
    y = scale_into(coarse_scale, coarse(g))
    z = minv(sub_into(g, fhat(y)))
    return CombinationResult(
        add_coarse_into(coarse_scale, coarse, sub_into(g, fhat(z)), z), residual
    )


COMBINATIONS: dict[str, Combination] = {
    "additive": additive,
    "adef1": adef1,
    "adef2": adef2,
    "balanced": balanced,
}
"""The combinations by name (``TwoLevelKFAC(combination=...)``)."""
CombinationName = Literal["additive", "adef1", "adef2", "balanced"]


def get_combination(name: str) -> Combination:
    """The combination called ``name``.

    Args:
        name: one of :data:`COMBINATIONS`.

    Returns:
        The function.

    Raises:
        ValueError: if ``name`` is unknown.
    """
    if name not in COMBINATIONS:
        raise ValueError(f"combination must be one of {tuple(COMBINATIONS)}, got {name!r}")
    return COMBINATIONS[name]
