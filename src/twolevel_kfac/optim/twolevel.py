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

Between refreshes ``F̂`` products (residuals, A-DEF/balanced combinations) use the Fisher
mini-batch of the last refresh step.

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

from ..curvature.blocks import (
    LayerStats,
    gradient_parts,
    layer_shape,
    layer_weight,
)
from ..curvature.running_average import ema_weight
from ..twolevel.coarse_matrix import (
    CoarseOperator,
    coarse_projections,
    ema_coarse_matrix,
    exact_coarse_matrix,
    tselepidis_coarse_matrix,
)
from ..twolevel.coarse_spaces import RESIDUAL_SPACES, build_basis
from ..twolevel.combinations import get_combination
from ..twolevel.fisher_products import (
    DISAGREE_HINT,
    check_stats,
    damped_fvp,
    sample_coefficients_parts,
)
from ..twolevel.global_fisher import (
    global_coarse_matrix,
    global_damped_fvp,
    global_tselepidis_matrix,
    own_statistics,
)
from ..twolevel.parts import restrict_parts
from ..twolevel.vectors import LayerVector, Parts, dot, sub_into
from .kfac import CURVATURE_ARGUMENTS, KFAC
from .options import COARSE_ARGUMENTS, CoarseOptions, CurvatureOptions
from .preconditioner import KFACPreconditioner, fine_level_type


class TwoLevelPreconditioner(KFACPreconditioner):
    """KFAC preconditioner with a coarse-space correction (rewrites ``.grad``)."""

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
        self.coarse = coarse if coarse is not None else CoarseOptions(**coarse_kwargs)
        super().__init__(model, options, **kwargs)
        if self.coarse.coarse_space == "spectral" and self.options.inverse_method != "eigen":
            raise ValueError("coarse_space='spectral' needs inverse_method='eigen'")
        self.names = list(self.layers)
        self.fisher_stats: list[LayerStats] | None = None  # this rank's rows
        self.fisher_samples: int | None = None  # N of the global Fisher mini-batch
        self.basis: list[Tensor] | None = None
        self.coarse_matrix: Tensor | None = None
        self.coarse_updates = 0
        self._operator: CoarseOperator | None = None
        # P = J R₀ᵀ of the kept basis on the kept Fisher mini-batch, for A-DEF2 on parts
        self._projections: tuple[CoarseOperator, Tensor] | None = None

    # ------------------------------------------------------------ operators
    def minv(self, v: LayerVector) -> LayerVector:
        """``M⁻¹v``: block-diagonal damped KFAC."""
        return [self.apply_fine(n, x) for n, x in zip(self.names, v, strict=True)]

    def fhat(self, v: LayerVector) -> LayerVector:
        """``F̂v = (F + λI)v`` with the exact Fisher of the stored Fisher mini-batch."""
        assert self.fisher_stats is not None and self.fisher_samples is not None
        if self.comm.distributed:
            return global_damped_fvp(
                self.comm, self.fisher_stats, v, self.damping, self.fisher_samples
            )
        return damped_fvp(self.fisher_stats, v, self.damping)

    def _eigen(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(Q_A, d_A, Q_G, d_G)`` per layer from the factors' current decompositions."""
        vecs_a, vals_a, vecs_g, vals_g = [], [], [], []
        for name in self.names:
            factors = self.factors[name]
            assert factors.decomp_a is not None and factors.decomp_g is not None
            vals_a.append(factors.decomp_a[0])
            vecs_a.append(factors.decomp_a[1])
            vals_g.append(factors.decomp_g[0])
            vecs_g.append(factors.decomp_g[1])
        return vecs_a, vals_a, vecs_g, vals_g

    def _build_basis(self, minv_res: LayerVector | None) -> list[Tensor]:
        space = self.coarse.coarse_space
        param = layer_weight(self.layers[self.names[0]])
        shapes = [layer_shape(self.layers[n]) for n in self.names]
        minv_ones = None
        if space == "krylov_nicolaides":  # M⁻¹(1 1ᵀ) as a rank-one product
            minv_ones = [
                self.apply_fine_outer(n, param.new_ones(d_out), param.new_ones(d_in))
                for n, (d_out, d_in) in zip(self.names, shapes, strict=True)
            ]
        return build_basis(
            space,
            shapes,
            minv=self.minv,
            minv_res=minv_res,
            minv_ones=minv_ones,
            eigen=self._eigen() if space == "spectral" else None,
            which=self.coarse.spectral_which,
            dtype=param.dtype,
            device=param.device,
        )

    def _new_coarse_matrix(self, basis: list[Tensor]) -> Tensor:
        stats, n = self.fisher_stats, self.fisher_samples
        assert stats is not None and n is not None
        tselepidis = self.coarse.coarse_space == "tselepidis"
        if self.comm.distributed and tselepidis:
            return global_tselepidis_matrix(self.comm, stats, self.damping, n)
        if self.comm.distributed:
            return global_coarse_matrix(self.comm, stats, basis, self.damping, n)
        if tselepidis:
            return tselepidis_coarse_matrix(stats, self.damping)
        return exact_coarse_matrix(stats, basis, self.damping)

    def _global_samples(self) -> int:
        """``N`` of the Fisher mini-batch just stored (summed over the ranks)."""
        assert self.fisher_stats is not None
        if not self.comm.distributed:
            return check_stats(self.fisher_stats)
        sizes = {self.sample_counts[n] for n in self.names}
        if len(sizes) != 1:
            raise RuntimeError(
                f"layers disagree on the Fisher mini-batch size: {sorted(sizes)}" + DISAGREE_HINT
            )
        return sizes.pop()

    # ------------------------------------------------------------------ step
    def _precondition_grads(self, stats: dict[str, LayerStats], lrs: dict[str, float]) -> None:
        """Between refreshes (kept ``Q``, KFAC's own ``M⁻¹``) the additive and A-DEF2 steps
        work on the gradients' weight and bias parts as plain KFAC does
        (:meth:`KFACPreconditioner._precondition_grads`), the ``W̄`` matrices never formed:
        additive ``d = ω_f M⁻¹g + ω_c Qg``, A-DEF2 ``d = M⁻¹g + ω_c Q(g − F̂M⁻¹g)``, the
        coarse term added in place (:meth:`CoarseOperator.add_into_parts`). Everything
        else uses ``W̄`` matrices (:meth:`_precondition`)."""
        if not self._steps_on_parts(stats) or self.active != self.names:
            super()._precondition_grads(stats, lrs)
            return
        assert self._operator is not None
        grads = {name: gradient_parts(self.layers[name]) for name in self.names}
        fine = {name: self._apply_fine_split(name, *grads[name]) for name in self.names}
        grad_parts, fine_parts = [grads[n] for n in self.names], [fine[n] for n in self.names]
        scale = self.coarse.coarse_scale
        if self.coarse.combination == "adef2":
            self._operator.add_restricted_into_parts(
                scale, self._restricted_residual(grad_parts, fine_parts), fine_parts
            )
        else:
            if self.coarse.fine_weight != 1.0:
                for part in (t for pair in fine_parts for t in pair if t is not None):
                    part.mul_(self.coarse.fine_weight)
            self._operator.add_into_parts(scale, grad_parts, fine_parts)
        self._write_parts(fine, grads, lrs)

    def _restricted_residual(self, g: Parts, minv_g: Parts) -> Tensor:
        """``R₀(g − F̂M⁻¹g) = R₀g − Pᵀc/N − λR₀M⁻¹g`` with ``P[n, k] = ⟨r_k, ∇ℓ_n⟩`` (kept
        from the refresh, :func:`coarse_projections`) and ``c_n = ⟨∇ℓ_n, M⁻¹g⟩``: A-DEF2
        needs the residual only through ``R₀``, so the Fisher product's second half (the
        weighted sum of per-sample gradients, a full pass over the layers) is never done."""
        operator, stats, samples = self._operator, self.fisher_stats, self.fisher_samples
        assert operator is not None and stats is not None and samples is not None
        if self._projections is None or self._projections[0] is not operator:
            self._projections = (operator, coarse_projections(stats, operator.basis))
        projections = self._projections[1]
        split = operator.parts_basis(tuple(b is not None for _, b in g))
        coefficients = sample_coefficients_parts(stats, minv_g)
        restricted = restrict_parts(split, g) - projections.T @ coefficients / samples
        return restricted.sub_(restrict_parts(split, minv_g), alpha=self.damping)

    def _steps_on_parts(self, stats: dict[str, LayerStats]) -> bool:
        """Whether this step is additive or A-DEF2 with KFAC's own ``M⁻¹`` and the kept
        ``Q`` (no statistics, no rebuilt basis, no residual kept for the diagnostics;
        A-DEF2's ``F̂`` product on one process)."""
        coarse = self.coarse
        combination_ok = coarse.combination == "additive" or (
            coarse.combination == "adef2" and not self.comm.distributed
        )
        return (
            not stats
            and combination_ok
            and coarse.coarse_scale != 0.0
            and not coarse.diagnostics
            and self._plain_kfac_fine()
            and self._stateless_directions()
        )

    def _precondition(
        self, grads: dict[str, Tensor], stats: dict[str, LayerStats]
    ) -> dict[str, Tensor]:
        refreshed = bool(stats)
        if refreshed:
            self._set_names([n for n in self.layers if n in stats])
            self.fisher_stats = [stats[n] for n in self.names]
            self.fisher_samples = self._global_samples()
        zero = layer_weight(self.layers[self.names[0]]).new_zeros  # g of a layer unused now
        g = [grads[n] if n in grads else zero(layer_shape(self.layers[n])) for n in self.names]
        outside = {n: self.apply_fine(n, grads[n]) for n in grads if n not in self.names}
        minv_g = self.minv(g)
        if self.coarse.coarse_scale == 0.0:
            return self._keep_active(minv_g, grads, outside)
        space = self.coarse.coarse_space
        # A residual basis needs res = g − F̂M⁻¹g only when it is rebuilt (every step in the
        # faithful schedule, on refresh steps in the consistent one).
        rebuilds_basis = space in RESIDUAL_SPACES and (
            refreshed or self.coarse.coarse_refresh == "faithful" or self._operator is None
        )
        needs_residual = (
            rebuilds_basis or self.coarse.combination == "adef2" or self.coarse.diagnostics
        )
        residual = sub_into(g, self.fhat(minv_g)) if needs_residual else None
        operator = self._coarse_operator(refreshed, residual)
        result = get_combination(self.coarse.combination)(
            g,
            self.minv,
            operator,
            self.fhat,
            coarse_scale=self.coarse.coarse_scale,
            fine_weight=self.coarse.fine_weight,
            minv_g=minv_g,
            residual=residual,
        )
        if residual is not None and self.coarse.diagnostics:
            self.last_stats["residual_norm"] = float(dot(residual, residual).sqrt())
            self.last_stats["energy_gain"] = float(operator.energy_gain(residual))
        return self._keep_active(result.direction, grads, outside)

    def _keep_active(
        self, directions: LayerVector, grads: dict[str, Tensor], outside: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The directions of the layers with a gradient this step (``grads``)."""
        kept = {n: d for n, d in zip(self.names, directions, strict=True) if n in grads}
        return {n: kept[n] if n in kept else outside[n] for n in grads}

    def _set_names(self, names: list[str]) -> None:
        """The coarse level's layers; a new set drops the coarse state built for the old."""
        if names != self.names:
            self.names = names
            self.basis, self.coarse_matrix, self._operator = None, None, None
            self.coarse_updates, self._projections = 0, None

    @property
    def coarse_operator(self) -> CoarseOperator | None:
        """``Q = R₀ᵀ F_c⁻¹ R₀`` of the last step (``None`` before the first)."""
        return self._operator

    @property
    def _per_step_basis(self) -> bool:
        """The faithful schedule of a residual space rebuilds the basis at every step."""
        return (
            self.coarse.coarse_space in RESIDUAL_SPACES and self.coarse.coarse_refresh == "faithful"
        )

    def _stateless_directions(self) -> bool:
        """No basis or ``F_c`` is rebuilt on a step without statistics, except in the
        faithful schedule of the residual spaces (every step) and before the first one."""
        fine = super()._stateless_directions()  # e.g. EKFAC under TwoLevelKFAC(fine="ekfac")
        return fine and self._operator is not None and not self._per_step_basis

    def _coarse_operator(self, refreshed: bool, residual: LayerVector | None) -> CoarseOperator:
        """The coarse operator ``Q`` of this step, rebuilding basis / ``F_c`` as scheduled."""
        space = self.coarse.coarse_space
        per_step_basis = self._per_step_basis
        if not (refreshed or per_step_basis or self._operator is None):
            return self._operator
        minv_res = (
            self.minv(residual) if residual is not None and space in RESIDUAL_SPACES else None
        )
        if refreshed or per_step_basis or self.basis is None:
            self.basis = self._build_basis(minv_res)
        if refreshed or self.coarse_matrix is None:
            new = self._new_coarse_matrix(self.basis)
            if self.coarse.coarse_refresh == "faithful":
                self.coarse_updates += 1
                decay = ema_weight(self.coarse_updates, self.options.ema_decay)
                self.coarse_matrix = ema_coarse_matrix(self.coarse_matrix, new, decay)
            else:
                self.coarse_matrix = new
        self._operator = CoarseOperator.from_matrix(self.basis, self.coarse_matrix)
        return self._operator

    # ------------------------------------------------------------ bookkeeping
    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint (restored by :meth:`load_state_dict`)."""
        state = super().state_dict()
        distributed = "ranks" in state  # then every rank's rows are in state["ranks"]
        state["coarse"] = {
            "fisher_stats": None if distributed else _stats_pairs(self.fisher_stats),
            "basis": self.basis,
            "fisher_samples": self.fisher_samples,
            "coarse_matrix": self.coarse_matrix,
            "coarse_updates": self.coarse_updates,
            "names": self.names,
        }
        return state

    def _rank_state(self) -> dict[str, Any]:
        return {**super()._rank_state(), "fisher_stats": _stats_pairs(self.fisher_stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        if "coarse" not in state:
            raise ValueError("not a two-level preconditioner state: no 'coarse' entry")
        super().load_state_dict(state)
        coarse = state["coarse"]
        self.names = list(coarse.get("names", self.layers))
        saved = [p["fisher_stats"] for p in state.get("ranks") or [coarse]]
        per_rank = None
        if None not in saved:
            per_rank = [[LayerStats(a, g) for a, g in self._on_names(p)] for p in saved]
        self.fisher_stats = own_statistics(per_rank, self.comm.rank, self.comm.world_size)
        self.fisher_samples = coarse.get("fisher_samples")
        if self.fisher_samples is None and per_rank is not None:  # a state from before it
            self.fisher_samples = sum(check_stats(stats) for stats in per_rank)
        self.basis = None if coarse["basis"] is None else self._on_names(coarse["basis"])
        self.coarse_matrix = self.placed(self.names[0], coarse["coarse_matrix"])
        self.coarse_updates = int(coarse["coarse_updates"])
        self._operator = None
        if self.basis is not None and self.coarse_matrix is not None:
            self._operator = CoarseOperator.from_matrix(self.basis, self.coarse_matrix)

    def _on_names(self, trees: list[Any]) -> list[Any]:
        """Saved per-layer state of the coarse level's layers, each on its layer's device."""
        return [self.placed(n, t) for n, t in zip(self.names, trees, strict=True)]

    def __repr__(self) -> str:
        coarse = ", ".join(f"{k}={v!r}" for k, v in vars(self.coarse).items())
        return super().__repr__()[:-1] + f"  coarse: {coarse}\n)"


class TwoLevelKFAC(KFAC):
    """Two-level KFAC: every :class:`KFAC` argument plus the :class:`CoarseOptions` fields
    (``coarse_space``, ``combination``, ``coarse_refresh``, ``coarse_scale``, ``fine_weight``,
    ``spectral_which``, ``diagnostics``) and ``fine``: the fine level ``M⁻¹``, ``kfac``
    (default) | ``ekfac`` | ``kpsvd`` | ``kfac_corrected`` (:mod:`.fine`; the last two also
    take ``power_iterations``, ``power_tol``)."""

    preconditioner_class = TwoLevelPreconditioner

    def _make_preconditioner(
        self, model: nn.Module, kwargs: dict[str, Any], params: list[Any]
    ) -> KFACPreconditioner:
        fine = kwargs.get("fine", "kfac")
        extra = fine_level_type(fine).extra_arguments
        allowed = CURVATURE_ARGUMENTS | COARSE_ARGUMENTS | extra | {"options", "coarse", "fine"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"TwoLevelKFAC got unknown argument(s) {unknown}; allowed: {sorted(allowed)}"
            )
        return TwoLevelPreconditioner(model, params=params, **kwargs)


def _stats_pairs(stats: list[LayerStats] | None) -> list[tuple[Tensor, Tensor]] | None:
    return None if stats is None else [(s.a, s.g) for s in stats]
