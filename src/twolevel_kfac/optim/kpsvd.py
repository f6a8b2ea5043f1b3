"""KPSVD and KFAC-corrected fine levels (Koroko et al., ESAIM: Proceedings and Surveys 73,
2023): better Kronecker approximations of each layer's exact Fisher block ``F``.

* :class:`KPSVDFine`: the factors of each Fisher mini-batch are the Kronecker-SVD
  factors ``(A_k, G_k)``, ``T·(A_k ⊗ G_k)`` the Frobenius-nearest Kronecker product to the
  block (:func:`~twolevel_kfac.curvature.kpsvd.nearest_kronecker`, by power iteration on
  per-sample contractions, warm-started from the running ``G_k``; KFAC's ``G`` the first
  time). Everything after that is KFAC's code
  path: running averages, every ``damping_mode`` and ``inverse_method`` applied to
  ``(A_k, G_k)`` exactly as to KFAC's ``(A, G)``, the result divided by ``T``.
* :class:`KFACCorrectedFine`: KFAC's factors plus the leading Kronecker term of
  the residual, ``T·(A₂ ⊗ G₂) ≈ F − T·(A ⊗ G)``
  (:func:`~twolevel_kfac.curvature.kpsvd.kronecker_correction`), running-averaged like the
  factors and frozen at each decomposition refresh. The damped matrix inverted is

      K = T·[(A + s_A I) ⊗ (G + s_G I) + A₂ ⊗ G₂]

  with ``(s_A, s_G)`` the factor shifts of ``damping_mode`` (``per_factor``: ``(λ, λ)``;
  ``pi``: ``(π√λ, √λ/π)``); ``eigen_sum`` has no such form and is refused. With
  ``C v = μ (A + s_A I) v`` solved as ``V_Aᵀ(A + s_A I)V_A = I``, ``V_AᵀA₂V_A = diag(μ_A)``
  (and likewise for ``G``; :func:`~twolevel_kfac.curvature.kpsvd.pencil_eigh`)

      K⁻¹ vec(V) = vec(V_G [(V_Gᵀ V V_A) ⊘ (1 + μ_G μ_Aᵀ)] V_Aᵀ) / T.

  ``A₂ ⊗ G₂`` may be indefinite, and then so may ``K``: entries of ``1 + μ_G μ_Aᵀ`` below
  ``PENCIL_FLOOR`` are raised to it (counted in ``last_stats["corrected_floored"]``), so the
  matrix actually inverted is ``K`` with those pencil eigenvalues raised.

The power iteration stops after ``power_iterations`` sweeps or when both unit singular
vectors move by less than ``power_tol`` (at least 32 float eps). Stopped early, the term is
still the Rayleigh-quotient-scaled ``σ X⊗Y`` of its current vectors, so the Frobenius
errors ``‖F − T·A_k⊗G_k‖`` (≤ the best multiple of KFAC's, from KFAC's start) and
``‖F − T(A⊗G + A₂⊗G₂)‖`` (≤ KFAC's) keep their inequalities; the correction of the residual
(σ₂ ≈ σ₁ is common there) converges much more slowly than KPSVD (sweep counts in
``docs/benchmarks/implementation_choices.md``). Under
``torch.distributed`` every product of the power iteration is all-reduced (all ranks
iterate in lockstep on the global block).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..curvature.blocks import BlockStats, LayerStats
from ..curvature.kpsvd import (
    KroneckerTerm,
    PowerIteration,
    kronecker_correction,
    nearest_kronecker,
    pencil_eigh,
)
from ..curvature.kronecker_apply import apply_in_eigenbasis
from ..curvature.running_average import ema_weight, running_average
from .fine import FineContext, FineLevel
from .kfac import KFAC
from .options import check_interval, check_real
from .preconditioner import KFACPreconditioner

PENCIL_FLOOR = 1e-3


class PowerIterationFine(FineLevel):
    """A fine level whose factors come from a power iteration on per-sample contractions,
    all-reduced under ``torch.distributed`` (every rank iterates on the global block).

    Args:
        host: the preconditioner (:class:`~.fine.FineContext`).
        power_iterations: the most sweeps of the power iteration.
        power_tol: stop when both unit singular vectors move by less than this.
    """

    extra_arguments: ClassVar[frozenset[str]] = frozenset({"power_iterations", "power_tol"})
    diagonal_tables: ClassVar[bool] = False  # its blocks read the one-hot rows themselves

    def __init__(
        self, host: FineContext, *, power_iterations: int = 50, power_tol: float = 1e-8
    ) -> None:
        super().__init__(host)
        check_interval("power_iterations", power_iterations)
        check_real("power_tol", power_tol, low=0.0)
        self.power = PowerIteration(power_iterations, float(power_tol))

    def _reduce(self, tensor: Tensor) -> Tensor:
        comm = self.host.comm
        return comm.all_reduce(tensor) if comm.distributed else tensor

    def _cast(self, name: str, stats: LayerStats) -> LayerStats:
        dtype = self.host.factor_dtype(name)
        return LayerStats(stats.a.to(dtype), stats.g.to(dtype))

    def _record(self, name: str, term: KroneckerTerm) -> None:
        self.host.last_stats[f"power_sweeps/{name}"] = float(term.sweeps)


class KPSVDFine(PowerIterationFine):
    """Kronecker-SVD fine level (see the module docstring)."""

    name = "kpsvd"

    def store(
        self, name: str, new_a: Tensor, new_g: Tensor, locations: float, stats: LayerStats
    ) -> bool:
        """KFAC's running average of the Kronecker-SVD factors ``(A_k, G_k)`` of this batch
        (a block type of its own keeps its own curvature)."""
        if isinstance(stats, BlockStats):
            return FineLevel.store(self, name, new_a, new_g, locations, stats)
        count = self.host.sample_count(name, stats)
        running = self.host.factors[name].G  # warm start (KFAC's G on the first update)
        # (and where the running G_k is 0, whose power iteration would stay at 0: a layer
        # behind a zero-initialised one, LoRA's lora_A behind lora_B = 0, at its first batch)
        start = new_g if running is None or not bool(running.any()) else running
        a_k, g_k, term = nearest_kronecker(
            self._cast(name, stats),
            (new_a, new_g),
            count,
            self.power,
            self._reduce,
            start,
            locations,
        )
        self._record(name, term)
        if not (torch.isfinite(a_k).all() and torch.isfinite(g_k).all()):
            return False
        return super().store(name, a_k, g_k, locations, stats)


class KFACCorrectedFine(PowerIterationFine):
    """KFAC plus its leading Kronecker correction (see the module docstring).

    Raises:
        ValueError: for ``damping_mode="eigen_sum"`` or ``inverse_method="cholesky"``.
    """

    name = "kfac_corrected"
    state_entry = "corrections"
    needs_eigenbasis = True

    def __init__(self, host: FineContext, **arguments: Any) -> None:
        super().__init__(host, **arguments)
        opts = host.options
        if opts.damping_mode == "eigen_sum" or opts.inverse_method != "eigen":
            raise ValueError(
                "KFAC-corrected needs a factored damping_mode ('per_factor' or 'pi') "
                "and inverse_method='eigen': A⊗G + A₂⊗G₂ + λI has no Kronecker-factored "
                f"inverse; got damping_mode={opts.damping_mode!r}, "
                f"inverse_method={opts.inverse_method!r}"
            )
        self.corrections: dict[str, tuple[Tensor, Tensor]] = {}
        self.correction_updates: dict[str, int] = {}
        self.frozen_corrections: dict[str, tuple[Tensor, Tensor]] = {}
        self._floored: dict[str, float] = {}  # per layer: its pencil's floored entries
        # per layer: ((λ, mode, T), the pencil's prepared inverse, its entries floored)
        self._pencil_cache: dict[
            str, tuple[tuple[float, str, float], tuple[Tensor, Tensor, Tensor], float]
        ] = {}

    def store(
        self, name: str, new_a: Tensor, new_g: Tensor, locations: float, stats: LayerStats
    ) -> bool:
        """KFAC's factors, then the running average of the correction ``(A₂, G₂)`` (none for
        a block type of its own)."""
        super().store(name, new_a, new_g, locations, stats)
        if isinstance(stats, BlockStats):
            return True
        count = self.host.sample_count(name, stats)
        running = self.corrections.get(name)  # warm start
        a_2, g_2, term = kronecker_correction(
            self._cast(name, stats),
            (new_a, new_g),
            count,
            self.power,
            self._reduce,
            None if running is None else running[1],
            locations,
        )
        self._record(name, term)
        if not (torch.isfinite(a_2).all() and torch.isfinite(g_2).all()):
            return True  # KFAC's part is stored; the correction keeps its running value
        k = self.correction_updates.get(name, 0) + 1
        self.correction_updates[name] = k
        rho = ema_weight(k, self.host.options.ema_decay)
        old = self.corrections.get(name)
        self.corrections[name] = (
            running_average(None if old is None else old[0], a_2, rho),
            running_average(None if old is None else old[1], g_2, rho),
        )
        return True

    def refresh(self, damping: float) -> None:
        """KFAC's refresh; the corrections are frozen with the decompositions."""
        super().refresh(damping)
        self.frozen_corrections = {
            n: (a.clone(), g.clone()) for n, (a, g) in self.corrections.items()
        }
        self._pencil_cache.clear()
        self._floored.clear()

    def apply(self, name: str, matrix: Tensor, damping: float) -> Tensor:
        """``K⁻¹`` of the module docstring; KFAC's inverse until a correction exists."""
        if name not in self.frozen_corrections:
            return super().apply(name, matrix, damping)
        return apply_in_eigenbasis(*self._prepare_pencil(name, damping), matrix)

    def _prepare_pencil(self, name: str, damping: float) -> tuple[Tensor, Tensor, Tensor]:
        factors = self.host.factors[name]
        key = (damping, self.host.options.damping_mode, factors.num_locations)
        cached = self._pencil_cache.get(name)
        if cached is not None and cached[0] == key:
            self._say_floored(name, cached[2])
            return cached[1]
        assert factors.decomp_a is not None and factors.decomp_g is not None
        shift_a, shift_g = factors.factor_shifts(damping, self.host.options.damping_mode)
        a_2, g_2 = self.frozen_corrections[name]
        mu_a, vectors_a = pencil_eigh(factors.decomp_a, shift_a, a_2)
        mu_g, vectors_g = pencil_eigh(factors.decomp_g, shift_g, g_2)
        grid = 1.0 + torch.outer(mu_g, mu_a)
        floored = float((grid < PENCIL_FLOOR).sum())
        self._say_floored(name, floored)
        inverse = grid.clamp_min(PENCIL_FLOOR).reciprocal() / factors.num_locations
        prepared = (vectors_g, inverse, vectors_a)
        self._pencil_cache[name] = (key, prepared, floored)
        return prepared

    def _say_floored(self, name: str, floored: float) -> None:
        """``last_stats["corrected_floored"]``: the floored entries of every layer's pencil
        in use, at every step that uses it (once per layer, however many applies)."""
        self._floored[name] = floored
        self.host.last_stats["corrected_floored"] = sum(self._floored.values())

    def state_dict(self) -> dict[str, Any]:
        """``{"corrections": {"running": …, "frozen": …, "updates": …}}``."""
        return {
            "corrections": {
                "running": dict(self.corrections),
                "frozen": dict(self.frozen_corrections),
                "updates": dict(self.correction_updates),
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entry.

        Raises:
            ValueError: if the state has no ``"corrections"`` entry.
        """
        if "corrections" not in state:
            raise ValueError("not a KFAC-corrected state: no 'corrections' entry")
        saved, placed = state["corrections"], self.host.placed
        self.corrections = {n: placed(n, (a, g)) for n, (a, g) in saved["running"].items()}
        self.frozen_corrections = {n: placed(n, (a, g)) for n, (a, g) in saved["frozen"].items()}
        self.correction_updates = {n: int(k) for n, k in saved["updates"].items()}
        self._pencil_cache.clear()
        self._floored.clear()


class KPSVDPreconditioner(KFACPreconditioner):
    """The KFAC preconditioner with the KPSVD fine level (:class:`KPSVDFine`)."""

    fine_level = KPSVDFine


class KFACCorrectedPreconditioner(KFACPreconditioner):
    """The KFAC preconditioner with the KFAC-corrected fine level (:class:`KFACCorrectedFine`)."""

    fine_level = KFACCorrectedFine


class KPSVD(KFAC):
    """KPSVD with momentum SGD: every :class:`KFAC` argument plus ``power_iterations``
    (default 50) and ``power_tol`` (1e-8) of the power iteration."""

    preconditioner_class = KPSVDPreconditioner


class KFACCorrected(KFAC):
    """KFAC-corrected (``A⊗G + A₂⊗G₂``) with momentum SGD: every :class:`KFAC` argument
    (``damping_mode`` ``per_factor`` or ``pi``) plus ``power_iterations``, ``power_tol``."""

    preconditioner_class = KFACCorrectedPreconditioner
