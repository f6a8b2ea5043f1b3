"""The coarse level of a two-level preconditioner (Koroko et al. 2023), held by it.

With ``M⁻¹`` the preconditioner's fine level, ``F̂ = F + λI`` the *exact* Fisher of the
Fisher mini-batch (inter-layer blocks included, from the stored per-sample ``(ā, δ)``), a
coarse basis ``R₀`` (a few vectors per layer) and ``Q = R₀ᵀ(R₀F̂R₀ᵀ)⁻¹R₀``, the direction
is one of :mod:`twolevel_kfac.twolevel.combinations` (additive, A-DEF1, A-DEF2,
balanced). The schedules (``coarse_refresh``), the layers it spans and the distributed
sums are described in :mod:`.twolevel`; the math is in :mod:`twolevel_kfac.twolevel`.
A :class:`CoarseLevel` reads the fine level, λ and the layers through the preconditioner
that holds it (``KFACPreconditioner(model, coarse=CoarseOptions(...))``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from ..curvature.blocks import LayerStats, block_parameters, has_bias, layer_shape
from ..curvature.kronecker_apply import LayerParts
from ..curvature.running_average import ema_weight
from ..twolevel.coarse_matrix import CoarseOperator, ema_coarse_matrix
from ..twolevel.coarse_spaces import RESIDUAL_SPACES
from ..twolevel.column_combinations import COLUMN_COMBINATIONS
from ..twolevel.combinations import get_combination
from ..twolevel.fisher_columns import FisherColumns
from ..twolevel.layer_basis import CoarseBasis, LayerBasis
from ..twolevel.vectors import LayerVector, dot
from .coarse_absorb import AbsorbedBatch
from .coarse_basis import residual_terms, space_basis, with_fixed_rows
from .coarse_fisher import (
    columns_from_rows,
    damped_product,
    global_samples,
    new_coarse_matrix,
    shifted_coarse_matrix,
)
from .coarse_parts import parts_step, refreshes_on_parts, steps_on_parts
from .coarse_state import check_coarse_state, coarse_rank_state, coarse_state, load_coarse_state
from .frozen import fine_alone
from .options import CoarseOptions

if TYPE_CHECKING:
    from .preconditioner import KFACPreconditioner

__all__ = ["CoarseLevel"]


class CoarseLevel:
    """The coarse correction of one preconditioner (see the module docstring).

    Args:
        host: the preconditioner holding it (its fine level, damping and layers).
        options: the :class:`~.options.CoarseOptions`.
    """

    @staticmethod
    def needs_eigenbasis(options: CoarseOptions) -> bool:
        """Whether the coarse space needs the factors' full eigendecompositions (``auto``
        then picks ``eigen``): none does; the spectral space's extreme eigenpair of a factor
        comes from :mod:`twolevel_kfac.curvature.extreme_eigen`, for less than ``eigh``."""
        return False

    def __init__(self, host: KFACPreconditioner, options: CoarseOptions) -> None:
        self.host: KFACPreconditioner = cast("KFACPreconditioner", weakref.proxy(host))  # weakly
        self.options = options
        self.names = list(host.layers)
        self.fisher_stats: list[LayerStats] | None = None  # this rank's rows
        self.fisher_samples: int | None = None  # N of the global Fisher mini-batch
        self.fisher_columns: FisherColumns | None = None  # W₀ = FR₀ᵀ instead of the rows
        self._rows_chosen = False  # kept_fisher="auto" chose the rows at this refresh
        self.basis: CoarseBasis | None = None
        # (fine version, λ) the basis was built at (None: loaded as saved)
        self.basis_source: tuple[int, float] | None = None
        self.coarse_matrix: Tensor | None = None
        self.coarse_damping: float | None = None  # the λ F_c was formed at
        self.coarse_updates = 0
        self._operator: CoarseOperator | None = None
        # P = J R₀ᵀ of the kept basis on the kept rows (A-DEF2 on parts), with its operator
        self.projections: tuple[CoarseOperator, Tensor] | None = None
        self.absorbed: AbsorbedBatch | None = None  # P's columns, taken at this refresh's fold

    # ------------------------------------------------------------ operators
    def minv(self, v: LayerVector) -> LayerVector:
        """``M⁻¹v``: block-diagonal damped KFAC."""
        return [self.host.apply_fine(n, x) for n, x in zip(self.names, v, strict=True)]

    def minv_into(self, v: LayerVector) -> LayerVector:
        """``M⁻¹v`` written over ``v`` (a temporary the caller gives up)."""
        return [self.minv_layer_into(n, x, x) for n, x in zip(self.names, v, strict=True)]

    def minv_layer_into(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        """``M_i⁻¹x`` of layer ``name``'s ``W̄`` matrix ``x`` written into ``out`` (which may
        be ``x``), a layer with a bias as its weight and bias columns (the bordered
        ``A⁻¹``'s products write into them: no joined temporaries; other fine levels apply
        to the joined matrix)."""
        host = self.host
        if host.fine.plain and has_bias(host.layers[name]):
            parts = (out[:, :-1], out[:, -1])
            host._apply_fine_split(name, x[:, :-1], x[:, -1], out=parts)
        else:
            host._apply_fine_split(name, x, None, out=(out, None))
        return out

    def fhat(self, v: LayerVector) -> LayerVector:
        """``F̂v = (F + λI)v`` with the exact Fisher of the stored Fisher mini-batch.

        Raises:
            RuntimeError: when no Fisher mini-batch is kept (before the first step, or
                :attr:`reads_statistics` is false: ``diagnostics=True`` keeps it; or only
                ``W₀ = FR₀ᵀ`` is kept: ``kept_fisher="rows"`` keeps it).
        """
        return damped_product(self, v)

    def basis_of(self, minv_res: LayerVector | None) -> CoarseBasis:
        """:meth:`build_basis` with the rows no step may move set to zero
        (:func:`.coarse_basis.with_fixed_rows`)."""
        return with_fixed_rows(self, self.names, self.build_basis(minv_res))

    def build_basis(self, minv_res: LayerVector | None) -> Sequence[LayerBasis]:
        """The coarse basis ``R₀`` of ``coarse_space``: per layer of :attr:`names` its ``k_i``
        vectors in one of the forms of :mod:`twolevel_kfac.twolevel.layer_basis` (``minv_res``:
        ``M⁻¹res`` for the residual spaces; :func:`.coarse_basis.space_basis`). A subclass
        may define another space here (``coarse_level_type`` of a preconditioner)."""
        return space_basis(self, minv_res)

    # ------------------------------------------------------------------ step
    def precondition_parts(
        self, stats: dict[str, LayerStats]
    ) -> tuple[dict[str, LayerParts], dict[str, LayerParts]] | None:
        """The directions and gradients of this step as weight and bias parts, or ``None``
        when the step needs the ``W̄`` matrices (:meth:`precondition`;
        :func:`.coarse_parts.parts_step` says when)."""
        return parts_step(self, stats)

    def _steps_on_parts(self) -> bool:
        """Whether a step between refreshes runs on parts (:func:`.coarse_parts.steps_on_parts`)."""
        return steps_on_parts(self)

    def _refreshes_on_parts(self, stats: dict[str, LayerStats]) -> bool:
        """Whether a refresh step runs on parts (:func:`.coarse_parts.refreshes_on_parts`)."""
        return refreshes_on_parts(self, stats)

    def refreshing(self, stats: dict[str, LayerStats]) -> bool:
        """Whether this step refreshes the level: its statistics are given, or their
        products were taken as they were folded (:mod:`.coarse_absorb`; none: all dead)."""
        return bool(stats) or (self.absorbed is not None and bool(self.absorbed.columns))

    def refresh_names(self, stats: dict[str, LayerStats]) -> list[str]:
        """The layers this refresh covers, in the preconditioner's order."""
        absorbed = self.absorbed
        return absorbed.folded() if absorbed else [n for n in self.host.layers if n in stats]

    def _start_refresh(self, stats: dict[str, LayerStats]) -> None:
        """Keep this step's Fisher mini-batch (rows) for the layers it covers (or its
        ``N`` alone, where its products were taken as it was folded)."""
        absorbed = self.absorbed
        self._set_names(self.refresh_names(stats))
        if absorbed is not None:
            self.fisher_stats, self.fisher_samples = None, absorbed.samples()
        else:
            self.fisher_stats = [stats[n] for n in self.names]
            self.fisher_samples = global_samples(self)
        self.fisher_columns, self._rows_chosen = None, False

    def precondition(
        self, grads: dict[str, Tensor], stats: dict[str, LayerStats]
    ) -> dict[str, Tensor]:
        """The two-level direction of each layer's ``∇W̄`` (``stats``: this step's Fisher
        mini-batch, which refreshes the coarse level when not empty)."""
        refreshed = self.refreshing(stats)
        if refreshed:
            self._start_refresh(stats)
        else:
            self._between_refreshes()
        zero = block_parameters(self.host.layers[self.names[0]])[0].new_zeros  # g of unused
        g = [grads[n] if n in grads else zero(layer_shape(self.host.layers[n])) for n in self.names]
        outside = fine_alone(self.host, {n: grads[n] for n in grads if n not in self.names})
        options, columns = self.options, self.fisher_columns
        if not refreshed and columns is not None and self.columns_suffice:
            assert self._operator is not None  # W is kept with the operator it belongs to
            combine = COLUMN_COMBINATIONS[options.combination]
            direction = combine(
                g, self.minv, self._operator, columns, self.host.damping, options.coarse_scale
            )
            return self._keep_active(direction, grads, outside)
        if options.coarse_scale == 0.0:
            self.fisher_stats = self.fisher_stats if options.diagnostics else None
            fine = fine_alone(self.host, dict(zip(self.names, g, strict=True)))  # ω_f M⁻¹g
            return self._keep_active(list(fine.values()), grads, outside)
        if refreshed or self._per_step_basis:  # rebuilt below: not held beside the new one
            self._drop_basis()
        minv_g, residual, minv_res = residual_terms(self, g, refreshed)
        operator = self._build_operator(refreshed, minv_res)
        result = get_combination(options.combination)(
            g,
            self.minv,
            operator,
            self.fhat,
            coarse_scale=options.coarse_scale,
            fine_weight=options.fine_weight,
            minv_g=minv_g,
            residual=residual,
        )
        if residual is not None and options.diagnostics:
            self.host.last_stats["residual_norm"] = float(dot(residual, residual).sqrt())
            self.host.last_stats["energy_gain"] = float(operator.energy_gain(residual))
        self._keep_fisher()
        return self._keep_active(result.direction, grads, outside)

    def _keep_fisher(self) -> None:
        """Keep of the Fisher mini-batch what the steps until the next refresh read: nothing
        (additive; every step refreshes with ``cov_interval=1``, unless the diagnostics
        keep it for ``fhat``) or its rows (traded for ``W₀``:
        :func:`.coarse_fisher.columns_from_rows`)."""
        every_step = self.host.options.cov_interval == 1 and not self.options.diagnostics
        if not self.reads_statistics or every_step:
            self.fisher_stats = None
        self.absorbed = None  # F_c is formed

    def _between_refreshes(self) -> None:
        """Before a step between refreshes: ``F_c`` follows the current ``λ`` (not in the
        faithful residual schedule, which keeps its refresh's), and the rows may become
        ``W₀``."""
        operator = self._operator
        if operator is not None and self.stateless() and self._follow_damping(operator.basis):
            assert self.coarse_matrix is not None
            self._operator = operator.with_matrix(self.coarse_matrix)
            if self.projections is not None and self.projections[0] is operator:
                self.projections = (self._operator, self.projections[1])  # the same basis
        columns_from_rows(self)

    def _follow_damping(self, basis: CoarseBasis) -> bool:
        """Shift ``F_c`` to the current ``λ`` (:func:`.coarse_fisher.shifted_coarse_matrix`
        with ``basis``); whether it moved."""
        shifted = shifted_coarse_matrix(self, basis)
        if shifted is None:
            return False
        self.coarse_matrix, self.coarse_damping = shifted, self.host.damping
        return True

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
            self.basis_source = None
            self.coarse_updates, self.projections, self.fisher_columns = 0, None, None
            self._rows_chosen = False

    def install_operator(self, operator: CoarseOperator | None) -> None:
        """Use ``operator`` as ``Q`` (a restored checkpoint's), dropping derived caches."""
        self._operator, self.projections, self._rows_chosen = operator, None, False

    @property
    def coarse_operator(self) -> CoarseOperator | None:
        """``Q = R₀ᵀ F_c⁻¹ R₀`` of the last step (``None`` before the first)."""
        return self._operator

    @property
    def reads_statistics(self) -> bool:
        """Whether a step between refreshes reads the Fisher mini-batch (an ``F̂`` product):
        every combination but ``additive``, the faithful residual schedule and the
        diagnostics. Otherwise the mini-batch is dropped once the refresh has built ``Q``
        (memory) and not saved (``state_dict`` the size of KFAC's). Where ``W₀ = FR₀ᵀ``
        suffices (:attr:`columns_suffice`) the level may keep ``W`` in its place
        (``kept_fisher``)."""
        coarse = self.options
        if coarse.coarse_scale == 0.0:  # M⁻¹ alone: no coarse term reads it
            return coarse.diagnostics
        return coarse.combination != "additive" or coarse.diagnostics or self._per_step_basis

    @property
    def columns_suffice(self) -> bool:
        """Whether the steps between refreshes read ``F̂`` only through ``F̂R₀ᵀ = W₀ + λR₀ᵀ``
        (:mod:`twolevel_kfac.twolevel.column_combinations`): A-DEF1, A-DEF2 or balanced
        with a basis fixed until the next refresh and no diagnostics (which need the
        residual itself)."""
        coarse = self.options
        return (
            coarse.combination in COLUMN_COMBINATIONS
            and coarse.coarse_scale != 0.0
            and not coarse.diagnostics
            and not self._per_step_basis
        )

    @property
    def structural_basis(self) -> bool:
        """Whether the basis depends on the layer shapes alone (the Nicolaides vectors of
        ``nicolaides`` and ``tselepidis``: all ones), so a checkpoint need not hold it."""
        return self.options.coarse_space in ("nicolaides", "tselepidis")

    @property
    def basis_reads_decompositions(self) -> bool:
        """Whether a basis rebuilt on load reads the fine level's cached decompositions as
        saved (the spectral space's extreme eigenpairs, from either form): it is then
        rebuilt before they are converted to another ``inverse_method``, since where an
        extreme eigenvalue is repeated (a rank-deficient factor) the eigenvector of the
        converted factor need not be the saved one."""
        return self.options.coarse_space == "spectral"

    @property
    def basis_rebuilds(self) -> bool:
        """Whether :meth:`basis_of` on the current state gives the kept basis again, bit for
        bit, so a checkpoint need not hold it: the Nicolaides vectors (the layer shapes
        alone), or a spectral or Krylov-Nicolaides basis built from the fine level as it
        is now (no refresh, folded statistics or conversion of a loaded state's
        decompositions since: the host's ``fine_version`` counts them; Krylov: at the
        current ``λ``)."""
        if self.structural_basis:
            return True
        space, source = self.options.coarse_space, self.basis_source
        if source is None or space not in ("spectral", "krylov_nicolaides"):
            return False
        version, damping = source
        return version == self.host.fine_version and (
            space == "spectral" or damping == self.host.damping
        )

    @property
    def _per_step_basis(self) -> bool:
        """The faithful schedule of a residual space rebuilds the basis at every step."""
        return (
            self.options.coarse_space in RESIDUAL_SPACES
            and self.options.coarse_refresh == "faithful"
        )

    def stateless(self) -> bool:
        """No basis or ``F_c`` is rebuilt on a step without statistics, except in the
        faithful schedule of the residual spaces (every step) and before the first one
        (a step may still shift ``F_c`` to a new ``λ`` and trade the rows for ``W₀``: both
        are redone alike when the step is undone and retried)."""
        return self._operator is not None and not self._per_step_basis

    def _drop_basis(self) -> None:
        """Before a rebuild: the old basis, and ``Q``, ``P`` and (but for the faithful
        schedule's running average) ``F_c`` built on it, are not held beside the new ones,
        nor paired with them by a step after an interrupted one. Rebound, not cleared: a
        saved state dict may share them."""
        self.basis, self._operator, self.projections = None, None, None
        if self.options.coarse_refresh != "faithful":
            self.coarse_matrix, self.coarse_damping = None, None

    def release_replaced(self) -> None:
        """At a refresh step, before it folds its statistics (KFAC's peak), drop what the
        refresh replaces (:meth:`_drop_basis`, the kept rows or ``W₀``): nothing reads it
        before the rebuild. A step that raises in between leaves no basis: its retry rebuilds."""
        self._drop_basis()
        self.fisher_stats, self.fisher_columns, self._rows_chosen = None, None, False

    def _build_operator(self, refreshed: bool, minv_res: LayerVector | None) -> CoarseOperator:
        """The coarse operator ``Q`` of this step, rebuilding basis / ``F_c`` as scheduled
        (``minv_res``: ``M⁻¹res`` where a residual space rebuilds its basis: a temporary
        the basis may take over)."""
        per_step_basis = self._per_step_basis
        if not (refreshed or per_step_basis or self._operator is None):
            return self._operator
        if refreshed or per_step_basis or self.basis is None:
            self._drop_basis()
            self.basis = self.basis_of(minv_res)
            self.basis_source = (self.host.fine_version, self.host.damping)
        if refreshed or self.coarse_matrix is None:
            new = new_coarse_matrix(self, self.basis)
            if self.options.coarse_refresh == "faithful":
                self._follow_damping(self.basis)  # the average at this λ, then the new one
                self.coarse_updates += 1
                decay = ema_weight(self.coarse_updates, self.host.options.ema_decay)
                self.coarse_matrix = ema_coarse_matrix(self.coarse_matrix, new, decay)
            else:
                self.coarse_matrix = new
            self.coarse_damping = self.host.damping
        self._operator = CoarseOperator.from_matrix(self.basis, self.coarse_matrix)
        return self._operator

    # ------------------------------------------------------------ bookkeeping
    def state_dict(self, distributed: bool) -> dict[str, Any]:
        """The ``"coarse"`` entry of the preconditioner's state (:mod:`.coarse_state`)."""
        return coarse_state(self, distributed)

    def rank_state(self) -> dict[str, Any]:
        """This rank's part: its rows of the Fisher mini-batch."""
        return coarse_rank_state(self)

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise if :meth:`load_state_dict` cannot restore ``state`` (before the preconditioner
        changes anything: :func:`.coarse_state.check_coarse_state`)."""
        check_coarse_state(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` from the preconditioner's ``state``."""
        load_coarse_state(self, state)
