"""Two-level KFAC: block-diagonal KFAC plus a coarse-space correction (Koroko et al. 2023).

With ``M⁻¹`` the damped block-diagonal KFAC inverse, ``F̂ = F + λI`` the *exact* Fisher of
the Fisher mini-batch (inter-layer blocks included, from the stored per-sample ``(ā, δ)``),
a coarse basis ``R₀`` (a few vectors per layer) and ``Q = R₀ᵀ(R₀F̂R₀ᵀ)⁻¹R₀``, the
direction is one of :mod:`twolevel_kfac.twolevel.combinations` (additive, A-DEF1,
A-DEF2, balanced).

``coarse_refresh`` decides when the basis ``R₀`` and the coarse matrix ``F_c`` change:

* ``"consistent"`` (default): both are rebuilt together, from the statistics of the same
  Fisher mini-batch, on every step that refreshes the factors (every ``cov_interval``
  steps); residual-based bases use the residual of that step. ``Q`` is then always the
  exact Galerkin correction of the stored ``F̂`` for the basis it uses.
* ``"faithful"`` (the authors' released code): residual-based bases are rebuilt every step
  from the current gradient, while ``F_c`` is computed for the basis of the refresh step,
  running-averaged like the factors (ρ = min(1 − 1/k, ema_decay)) and reused until the next
  refresh — so between refreshes ``F_c`` belongs to an older basis.

A damping that changes between refreshes (a schedule, adaptive damping) reaches every
part of the step: ``M⁻¹`` and ``F̂`` read the current ``λ``, and ``F_c`` is shifted to it,
``F_c + (λ − λ_c)R₀R₀ᵀ`` (its damping term), except in the faithful schedule of a residual
space. Between refreshes ``F̂`` products (residuals, A-DEF/balanced combinations) use the
Fisher mini-batch of the last refresh step: its rows, or only ``W₀ = FR₀ᵀ`` where every product a
step needs is one with ``W`` (``kept_fisher``,
:mod:`twolevel_kfac.twolevel.fisher_columns`; for convolutions, whose rows are per
location, ``W`` is the far smaller).

The coarse level spans the layers of that Fisher mini-batch (:attr:`names`). A layer
without a gradient in a step (unused in its forward) has ``g = 0`` there and its direction
is dropped (its ``.grad`` stays ``None``); a layer with a gradient outside the coarse level
(unused at the last refresh) gets its fine-level direction alone.

Under ``torch.distributed`` each rank keeps its own rows of the Fisher mini-batch, and the
coarse matrices and ``F̂`` products sum their per-sample terms over the ranks
(:mod:`twolevel_kfac.twolevel.global_fisher`), so the coarse level sees the global Fisher
mini-batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..curvature.blocks import LayerStats
from ..twolevel.coarse_matrix import CoarseOperator
from ..twolevel.layer_basis import dense_basis
from ..twolevel.vectors import LayerVector
from .coarse import CoarseLevel
from .kfac import KFAC
from .options import COARSE_ARGUMENTS, CoarseOptions, CurvatureOptions
from .preconditioner import KFACPreconditioner

__all__ = ["CoarseOptions", "TwoLevelKFAC", "TwoLevelPreconditioner"]


class TwoLevelPreconditioner(KFACPreconditioner):
    """The KFAC preconditioner with a coarse level (:class:`~.coarse.CoarseLevel`): every
    :class:`KFACPreconditioner` argument plus ``coarse`` (a :class:`CoarseOptions`) or its
    fields as keywords. Its coarse level's state is exposed here (``basis``, ``names``, …)."""

    coarse_arguments = COARSE_ARGUMENTS

    def __init__(
        self,
        model: nn.Module,
        options: CurvatureOptions | None = None,
        coarse: CoarseOptions | None = None,
        **kwargs: Any,
    ) -> None:
        coarse_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in COARSE_ARGUMENTS}
        if coarse is not None and coarse_kwargs:
            raise TypeError("pass either coarse=... or coarse keyword arguments, not both")
        coarse = coarse if coarse is not None else CoarseOptions(**coarse_kwargs)
        super().__init__(model, options, coarse=coarse, **kwargs)

    @property
    def level(self) -> CoarseLevel:
        """The coarse level."""
        assert self.coarse_level is not None
        return self.coarse_level

    @property
    def coarse(self) -> CoarseOptions:
        """The coarse level's options."""
        return self.level.options

    @property
    def names(self) -> list[str]:
        """The layers the coarse level spans (those of the last refresh's mini-batch)."""
        return self.level.names

    @property
    def basis(self) -> list[Tensor] | None:
        """``R₀``, one ``[K_i, d_out, d_in']`` block per layer (formed here from a layer held
        as outer products or split parts: :mod:`twolevel_kfac.twolevel.layer_basis`)."""
        basis = self.level.basis
        return None if basis is None else dense_basis(basis)

    @property
    def coarse_matrix(self) -> Tensor | None:
        """``F_c = R₀F̂R₀ᵀ`` (running-averaged in the faithful schedule)."""
        return self.level.coarse_matrix

    @property
    def coarse_updates(self) -> int:
        """How many estimates of ``F_c`` the faithful schedule has averaged."""
        return self.level.coarse_updates

    @property
    def fisher_stats(self) -> list[LayerStats] | None:
        """This rank's rows of the kept Fisher mini-batch."""
        return self.level.fisher_stats

    @property
    def fisher_columns(self) -> list[Tensor] | None:
        """``W₀ = FR₀ᵀ`` of the kept Fisher mini-batch (undamped: ``F̂R₀ᵀ = W₀ + λR₀ᵀ``),
        one ``[K, d_out, d_in']`` block per layer, where it is kept instead of the rows
        (``kept_fisher``)."""
        columns = self.level.fisher_columns
        return None if columns is None else columns.columns

    @property
    def fisher_samples(self) -> int | None:
        """``N`` of the kept Fisher mini-batch (all ranks)."""
        return self.level.fisher_samples

    @property
    def coarse_operator(self) -> CoarseOperator | None:
        """``Q = R₀ᵀ F_c⁻¹ R₀`` of the last step (``None`` before the first)."""
        return self.level.coarse_operator

    def minv(self, v: LayerVector) -> LayerVector:
        """``M⁻¹v`` on the coarse level's layers."""
        return self.level.minv(v)

    def fhat(self, v: LayerVector) -> LayerVector:
        """``F̂v = (F + λI)v`` with the exact Fisher of the kept Fisher mini-batch."""
        return self.level.fhat(v)

    def __repr__(self) -> str:
        coarse = ", ".join(f"{k}={v!r}" for k, v in vars(self.coarse).items())
        return super().__repr__()[:-1] + f"  coarse: {coarse}\n)"


class TwoLevelKFAC(KFAC):
    """Two-level KFAC: every :class:`KFAC` argument plus the :class:`CoarseOptions` fields
    (``coarse_space``, ``combination``, ``coarse_refresh``, ``coarse_scale``, ``fine_weight``,
    ``spectral_which``, ``diagnostics``, ``kept_fisher``) and ``fine``: the fine level
    ``M⁻¹``, ``kfac`` (default) | ``ekfac`` | ``kpsvd`` | ``kfac_corrected`` (:mod:`.fine`;
    the last two also take ``power_iterations``, ``power_tol``)."""

    preconditioner_class = TwoLevelPreconditioner
