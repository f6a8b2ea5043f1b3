"""The methods of the analysis as directions and operators, built with the optimizer's
own code so that the analysis measures what trains.

Methods (``d ≈ F̂⁻¹g`` with ``F̂ = F + λI``, ``F`` the exact Fisher of the batch):

* ``exact``: ``d = F̂⁻¹g`` (dense Cholesky solve, or conjugate gradients matrix-free);
* ``block_diagonal``: ``d = blockdiag(F̂)⁻¹g``, the exact per-layer blocks, inter-layer blocks
  dropped (dense per-layer solves, or one conjugate-gradient solve per layer);
* ``kfac`` (the configured damping mode), ``kfac_per_factor``, ``kfac_pi``,
  ``kfac_eigen_sum``: ``d = M⁻¹g`` from a :class:`KFACPreconditioner` whose factors are
  loaded from the batch's exact statistics (``ema_decay = 0``) through the optimizer's own
  ``fit``; ``M⁻¹`` is ``apply_fine``;
* ``ekfac``, ``kpsvd``, ``kfac_corrected``: ``d = M⁻¹g`` with the fine level of
  :class:`~twolevel_kfac.optim.ekfac.EKFACPreconditioner` /
  :class:`~twolevel_kfac.optim.kpsvd.KPSVDPreconditioner` /
  :class:`~twolevel_kfac.optim.kpsvd.KFACCorrectedPreconditioner` loaded the same way (the
  exact statistics make EKFAC's ``S`` the diagonal of the exact block in KFAC's eigenbasis
  and KPSVD the Frobenius-nearest Kronecker product of the exact block; the power
  iteration runs to ``ANALYSIS_POWER``). They use the configured damping mode, except
  ``kfac_corrected``, which has no ``eigen_sum`` form and uses ``per_factor`` then;
* ``<space>+<combination>`` (e.g. ``nicolaides+adef2``): the direction returned by
  :meth:`TwoLevelPreconditioner.direction` — the optimizer's step path, with
  ``fisher_stats`` set to the batch's statistics (consistent refresh, ``kl_clip=None``).
  The two-level methods use KFAC (``damping_mode``) as their fine level.

Each method is available as a direction (:meth:`MethodSet.direction`), as an operator
``v ↦ P v`` through the same code (:meth:`MethodSet.apply`, matrix-free) and, for the dense
backend, as a dense matrix (:meth:`MethodSet.dense`, :mod:`.dense`). Residual-based spaces
(``residual``, ``krylov_residual``) build ``R₀`` from ``res = g − F̂M⁻¹g`` of the current ``g``:
their ``P`` is the operator *for the basis built from this gradient* (the direction is not
linear in ``g``), and ``P g`` is the step taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..curvature.kronecker import DAMPING_MODES, DampingMode
from ..optim.levels import FINE_LEVELS
from ..optim.options import CurvatureOptions, SpectralWhich
from ..optim.preconditioner import KFACPreconditioner
from ..optim.twolevel import CoarseOptions, TwoLevelPreconditioner
from ..twolevel.coarse_matrix import CoarseOperator
from ..twolevel.coarse_spaces import COARSE_SPACES, CoarseSpace
from ..twolevel.combinations import COMBINATIONS, CombinationName, get_combination
from ..twolevel.layer_basis import dense_basis
from ..twolevel.vectors import LayerVector
from .backends import Backend, MatrixFreeOptions, make_backend
from .coordinates import flatten, unflatten
from .dense import coarse_matrix, dense_backend, preconditioner_matrix
from .exact import Curvature
from .metrics import Operator

KFAC_METHODS = ("kfac", *(f"kfac_{mode}" for mode in DAMPING_MODES))
FINE_METHODS = tuple(name for name in FINE_LEVELS if name != "kfac")
BASE_METHODS = ("exact", "block_diagonal", *KFAC_METHODS, *FINE_METHODS)
ANALYSIS_POWER = {"power_iterations": 500, "power_tol": 1e-12}


def twolevel_name(space: str, combination: str) -> str:
    """The method name of a coarse space × combination, ``"<space>+<combination>"``."""
    return f"{space}+{combination}"


TWOLEVEL_METHODS = tuple(twolevel_name(s, c) for s in COARSE_SPACES for c in COMBINATIONS)
ALL_METHODS = BASE_METHODS + TWOLEVEL_METHODS


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name; ``kind``: ``exact`` | ``block_diagonal`` | ``kfac`` | ``fine``
    (``fine``: ``ekfac`` | ``kpsvd`` | ``kfac_corrected``) | ``twolevel``."""

    kind: str
    damping_mode: str | None = None
    space: str | None = None
    combination: str | None = None
    fine: str | None = None


def parse_method(name: str, damping_mode: str = "per_factor") -> MethodSpec:
    """Parse a method name (see the module docstring).

    Args:
        name: the method name.
        damping_mode: the mode of ``kfac`` and of the two-level fine level.

    Returns:
        The :class:`MethodSpec`.

    Raises:
        ValueError: for an unknown name.
    """
    if name in ("exact", "block_diagonal"):
        return MethodSpec(name)
    if name == "kfac":
        return MethodSpec("kfac", damping_mode)
    if name.startswith("kfac_") and name[5:] in DAMPING_MODES:
        return MethodSpec("kfac", name[5:])
    if name in FINE_METHODS:
        factored = name != "kfac_corrected" or damping_mode != "eigen_sum"
        return MethodSpec("fine", damping_mode if factored else "per_factor", fine=name)
    space, _, combination = name.partition("+")
    if space in COARSE_SPACES and combination in COMBINATIONS:
        return MethodSpec("twolevel", damping_mode, space, combination)
    raise ValueError(
        f"unknown method {name!r}; allowed: {', '.join(BASE_METHODS)} or "
        f"'<space>+<combination>' with space in {COARSE_SPACES} and combination in "
        f"{tuple(COMBINATIONS)}"
    )


def _options(damping: float, damping_mode: str) -> CurvatureOptions:
    return CurvatureOptions(
        damping=damping,
        damping_mode=cast(DampingMode, damping_mode),  # checked by CurvatureOptions
        fisher="empirical",  # unused: the statistics are loaded, never captured
        ema_decay=0.0,
        kl_clip=None,
        inverse_method="eigen",  # one decomposition shared by every method (spectral too)
        unsupported="ignore",
    )


class MethodSet:
    """The analysis methods on one batch's :class:`Curvature` at one damping ``λ``.

    Args:
        model: the network (its analysis layers must match ``curvature.names``).
        curvature: the batch's exact curvature.
        damping: ``λ``.
        damping_mode: the mode of ``kfac`` and of the two-level fine level.
        coarse_scale: ``ω_c`` of the two-level combinations.
        spectral_which: ``smallest`` | ``largest`` eigenpair of the spectral space.
        backend: ``dense`` | ``matrix_free``: how ``F̂`` is multiplied and inverted
            (:mod:`.backends`).
        options: the matrix-free settings (CG tolerance, …).
    """

    def __init__(
        self,
        model: nn.Module,
        curvature: Curvature,
        damping: float,
        damping_mode: str = "per_factor",
        coarse_scale: float = 1.0,
        spectral_which: str = "smallest",
        backend: str = "dense",
        options: MatrixFreeOptions | None = None,
    ) -> None:
        self.model = model
        self.curvature = curvature
        self.damping = damping
        self.damping_mode = damping_mode
        self.coarse_scale = coarse_scale
        self.spectral_which = spectral_which
        self.backend: Backend = make_backend(backend, curvature, damping, options)
        self._kfac: dict[str, KFACPreconditioner] = {}
        self._fine: dict[str, KFACPreconditioner] = {}
        self._twolevel: dict[tuple[str, str], TwoLevelPreconditioner] = {}
        self._directions: dict[str, Tensor] = {}

    # ------------------------------------------------------------ preconditioners
    def kfac(self, mode: str) -> KFACPreconditioner:
        """A KFAC preconditioner with the batch's exact factors (cached per damping mode)."""
        if mode not in self._kfac:
            self._kfac[mode] = self._fitted(
                KFACPreconditioner(self.model, _options(self.damping, mode))
            )
        return self._kfac[mode]

    def fine(self, spec: MethodSpec) -> KFACPreconditioner:
        """The fine level ``spec.fine`` with the batch's exact statistics (cached)."""
        assert spec.fine is not None and spec.damping_mode is not None
        if spec.fine not in self._fine:
            options = _options(self.damping, spec.damping_mode)
            extra = FINE_LEVELS[spec.fine].extra_arguments
            power: dict[str, Any] = {k: v for k, v in ANALYSIS_POWER.items() if k in extra}
            pre = KFACPreconditioner(self.model, options, fine=spec.fine, **power)
            self._fine[spec.fine] = self._fitted(pre)
        return self._fine[spec.fine]

    def _fitted(self, pre: KFACPreconditioner) -> KFACPreconditioner:
        """``pre`` (hooks removed) loaded with the batch's statistics."""
        pre.remove_hooks()
        if list(pre.layers) != self.curvature.names:
            raise ValueError("the model's layers differ from the curvature's")
        pre.fit(dict(zip(self.curvature.names, self.curvature.stats, strict=True)))
        return pre

    def preconditioner(self, spec: MethodSpec) -> KFACPreconditioner:
        """The preconditioner of a ``kfac`` or ``fine`` method."""
        if spec.kind == "fine":
            return self.fine(spec)
        assert spec.damping_mode is not None
        return self.kfac(spec.damping_mode)

    def twolevel(self, space: str, combination: str) -> TwoLevelPreconditioner:
        """A two-level preconditioner that has run its step path on this batch's gradient."""
        key = (space, combination)
        if key not in self._twolevel:
            coarse = CoarseOptions(
                coarse_space=cast(CoarseSpace, space),  # checked by CoarseOptions
                combination=cast(CombinationName, combination),
                coarse_scale=self.coarse_scale,
                spectral_which=cast(SpectralWhich, self.spectral_which),
                diagnostics=True,
            )
            pre = TwoLevelPreconditioner(
                self.model, _options(self.damping, self.damping_mode), coarse
            )
            pre.remove_hooks()
            pre.factors = self.kfac(self.damping_mode).factors  # same factors, same caches
            names = self.curvature.names
            grads = dict(zip(names, self.curvature.grad, strict=True))
            stats = dict(zip(names, self.curvature.stats, strict=True))
            direction = pre.direction(grads, stats)
            self._directions[twolevel_name(space, combination)] = flatten(
                [direction[n] for n in names]
            )
            self._twolevel[key] = pre
        return self._twolevel[key]

    def operator(self, space: str) -> CoarseOperator:
        """The coarse operator ``Q`` the optimizer built for ``space`` on this gradient."""
        operator = self.twolevel(space, "adef2").coarse_operator
        assert operator is not None
        return operator

    def energy_gain(self, space: str) -> float:
        """The optimizer's own ``E(β*) − E(0)`` diagnostic for ``space`` (``last_stats``)."""
        return float(self.twolevel(space, "adef2").last_stats["energy_gain"])

    # ------------------------------------------------------------------ exact F̂
    def fhat(self) -> Tensor:
        """``F̂ = F + λI`` (dense; the dense backend only)."""
        return dense_backend(self).fhat_matrix()

    @property
    def fhat_op(self) -> Operator:
        """``F̂``: the dense matrix or ``v ↦ F̂v`` (matrix-free)."""
        return self.backend.fhat_op

    @property
    def fisher_op(self) -> Operator:
        """The undamped ``F``: the dense matrix or ``v ↦ Fv`` (matrix-free)."""
        return self.backend.fisher_op

    def exact_direction(self) -> Tensor:
        """``d* = F̂⁻¹g``."""
        return self.direction("exact")

    # --------------------------------------------------------------- directions
    def direction(self, method: str) -> Tensor:
        """The flat direction ``d`` of ``method`` (the step is ``−α d``)."""
        if method not in self._directions:
            self._directions[method] = self._compute_direction(
                parse_method(method, self.damping_mode)
            )
        return self._directions[method]

    def _compute_direction(self, spec: MethodSpec) -> Tensor:
        g = self.curvature.flat_grad
        if spec.kind == "exact":
            return self.backend.solve(g, record="exact")
        if spec.kind == "block_diagonal":
            return self.backend.block_solve(g, record="block_diagonal")
        if spec.kind in ("kfac", "fine"):
            return self._apply_fine(self.preconditioner(spec), g)
        assert spec.space is not None and spec.combination is not None
        self.twolevel(spec.space, spec.combination)
        return self._directions[twolevel_name(spec.space, spec.combination)]

    def _apply_fine(self, pre: KFACPreconditioner, v: Tensor) -> Tensor:
        """``M⁻¹v``: the optimizer's ``apply_fine`` layer by layer."""
        parts = zip(self.curvature.names, self.layer_vector(v), strict=True)
        return flatten([pre.apply_fine(n, x) for n, x in parts])

    def apply(self, method: str, v: Tensor) -> Tensor:
        """``P v`` for any flat ``v``, without a dense matrix, through the method's own code.

        ``exact`` / ``block_diagonal``: the backend's solves; ``kfac`` and the fine levels:
        ``apply_fine``; two-level methods: the optimizer's combination with its ``M⁻¹``,
        coarse operator ``Q`` (built for this batch's gradient) and ``F̂`` products on the
        statistics — so ``apply(m, g)`` is ``direction(m)``.
        """
        spec = parse_method(method, self.damping_mode)
        if spec.kind == "exact":
            return self.backend.solve(v)
        if spec.kind == "block_diagonal":
            return self.backend.block_solve(v)
        if spec.kind in ("kfac", "fine"):
            return self._apply_fine(self.preconditioner(spec), v)
        assert spec.space is not None and spec.combination is not None
        pre = self.twolevel(spec.space, spec.combination)
        assert pre.coarse_operator is not None
        result = get_combination(spec.combination)(
            self.layer_vector(v),
            pre.minv,
            pre.coarse_operator,
            pre.fhat,
            coarse_scale=self.coarse_scale,
        )
        return flatten(result.direction)

    # ---------------------------------------------------------- dense matrices
    def dense(self, method: str) -> Tensor:
        """The dense preconditioner ``P`` of ``method`` (``d = P g``), ``[P, P]``
        (:mod:`.dense`; the dense backend only)."""
        return preconditioner_matrix(self, parse_method(method, self.damping_mode))

    def dense_coarse(self, space: str) -> Tensor:
        """``Q = R₀ᵀ F_c⁻¹ R₀`` (dense, :func:`.dense.coarse_matrix`)."""
        return coarse_matrix(self, space)

    def dense_basis(self, space: str) -> Tensor:
        """``R₀`` of the optimizer's basis for ``space`` as a ``[K, P]`` matrix (``K`` is
        small: one or two vectors per layer, so this is cheap for either backend)."""
        basis = dense_basis(self.operator(space).basis)
        rows = []
        for i, vectors in enumerate(basis):
            for v in vectors:
                parts = [
                    v if j == i else torch.zeros(s, dtype=v.dtype, device=v.device)
                    for j, s in enumerate(self.curvature.shapes)
                ]
                rows.append(flatten(parts))
        return torch.stack(rows)

    def layer_vector(self, flat: Tensor) -> LayerVector:
        """A flat vector as the optimizer's layer vector."""
        return unflatten(flat, self.curvature.shapes)

    def close(self) -> None:
        """Drop the preconditioners (their hooks are already removed)."""
        self._kfac.clear()
        self._fine.clear()
        self._twolevel.clear()
