"""Metrics of every method at one network state and batch (:func:`evaluate_state`), the
damping sweep (:func:`damping_sweep`) and the Fisher's block structure (:func:`fisher_structure`).

Per method (``d*`` = ``F̂⁻¹g``, ``E(d) = ‖d − d*‖²_F̂``, :mod:`.metrics`):

* ``cos_to_exact_ng``, ``relative_error`` = ``‖d − d*‖/‖d*‖``;
* ``energy_error`` = ``E(d)``, ``energy_error_relative`` = ``E(d)/E(0)`` with
  ``E(0) = gᵀF̂⁻¹g`` (the error of not moving: 0 for ``exact``, 1 for the zero step);
* ``predicted_decrease`` = ``α gᵀd − ½α² dᵀFd`` (the Fisher/Gauss–Newton quadratic model,
  undamped ``F``) and ``actual_decrease`` = ``L(θ) − L(θ − αd)`` on the same batch, same ``α``;
* spectrum of ``P F̂`` (``condition_number``, ``eig_*``) for the methods in ``spectra``;
* two-level methods also: ``coarse_dim``, ``coarse_gain`` = ``E(β*) − E(0)`` of the space
  (Galerkin, the authors' diagnostic), ``coarse_gain_relative`` (divided by ``E`` of the
  KFAC direction), ``optimizer_energy_gain`` (the optimizer's own diagnostic; differs from
  ``coarse_gain`` only for ``tselepidis``, whose ``F_c`` is not the Galerkin matrix),
  ``off_diagonal_captured``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from . import metrics
from .coordinates import analysis_layers, loss_at
from .exact import Curvature, fisher_from_statistics
from .operators import MethodSet, parse_method

Progress = Callable[[str], None]


@dataclass
class StateResult:
    """Metrics of one state: ``methods`` (name → metrics), ``spaces`` (coarse space →
    metrics), ``spectra`` (name → eigenvalues of ``P F̂``)."""

    methods: dict[str, dict[str, Any]]
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    spectra: dict[str, Tensor] = field(default_factory=dict)


def direction_metrics(methods: MethodSet, name: str) -> dict[str, float]:
    """``cos_to_exact_ng``, ``relative_error``, ``energy_error(_relative)`` of one method."""
    d_star = methods.exact_direction()
    d = methods.direction(name)
    fhat = methods.fhat()
    zero_error = float(methods.curvature.flat_grad @ d_star)
    energy = metrics.energy_error(d, d_star, fhat)
    return {
        "cos_to_exact_ng": metrics.cosine(d, d_star),
        "relative_error": metrics.relative_error(d, d_star),
        "energy_error": energy,
        "energy_error_relative": energy / zero_error if zero_error > 0 else float("nan"),
        "direction_norm": float(d.norm()),
    }


def _spectrum(
    ms: MethodSet, name: str, p: Tensor, cache: dict[str, tuple[Tensor, float]]
) -> tuple[Tensor, float]:
    """Eigenvalues of ``P F̂``; A-DEF1 reuses A-DEF2's (the same space's).

    With ``M⁻¹`` and ``Q`` symmetric, ``P_adef1 = P_adef2ᵀ``, so ``P_adef1 F̂`` is similar to
    ``F̂ P_adef2ᵀ = (P_adef2 F̂)ᵀ``: both have the same spectrum (Tang et al. 2009), and the
    non-symmetric eigenproblem is solved once per space.
    """
    key = name[: -len("adef1")] + "adef2" if name.endswith("+adef1") else name
    if key not in cache:
        cache[key] = metrics.preconditioned_spectrum(p if key == name else ms.dense(key), ms.fhat())
    return cache[key]


def space_metrics(methods: MethodSet, space: str, fine_energy: float) -> dict[str, Any]:
    """The coarse space's dimension, optimal energy gain and captured off-diagonal mass."""
    fhat = methods.fhat()
    basis = methods.dense_basis(space)
    g = methods.curvature.flat_grad
    residual = g - fhat @ methods.direction("kfac_" + methods.damping_mode)
    gain = metrics.coarse_gain(residual, basis, fhat)
    return {
        "coarse_dim": int(basis.shape[0]),
        "coarse_gain": gain,
        "coarse_gain_relative": gain / fine_energy if fine_energy > 0 else float("nan"),
        "optimizer_energy_gain": methods.energy_gain(space),
        "off_diagonal_captured": metrics.captured_off_diagonal(
            methods.curvature.dense(), methods.curvature.sizes, basis
        ),
    }


def evaluate_state(
    model: nn.Module,
    curvature: Curvature,
    batch: tuple[Tensor, Tensor],
    likelihood: str,
    names: Sequence[str],
    *,
    damping: float,
    damping_mode: str = "per_factor",
    spectra: Sequence[str] = (),
    step_size: float = 1.0,
    coarse_scale: float = 1.0,
    spectral_which: str = "smallest",
    progress: Progress | None = None,
) -> StateResult:
    """Every metric of the module docstring for the methods ``names``.

    Args:
        model: the network at the analysed state.
        curvature: its exact curvature on ``batch`` (with the dense Fisher).
        batch: ``(x, y)`` for the actual loss decrease.
        likelihood: the likelihood of the loss.
        names: the methods.
        damping: ``λ``.
        damping_mode: KFAC's mode (``kfac`` and the two-level fine level).
        spectra: the methods whose spectrum of ``P F̂`` is computed.
        step_size: ``α`` of the predicted / actual decrease.
        coarse_scale: ``ω_c`` of the combinations.
        spectral_which: eigenpair of the spectral coarse space.
        progress: called with each method name (a progress bar's update).

    Returns:
        The :class:`StateResult`.
    """
    ms = MethodSet(model, curvature, damping, damping_mode, coarse_scale, spectral_which)
    layers = analysis_layers(model)
    x, y = batch
    g, fisher, fhat = curvature.flat_grad, curvature.dense(), ms.fhat()
    fine = metrics.energy_error(ms.direction("kfac_" + damping_mode), ms.exact_direction(), fhat)
    result = StateResult(methods={})
    spectrum_cache: dict[str, tuple[Tensor, float]] = {}
    for name in names:
        row: dict[str, Any] = direction_metrics(ms, name)
        d = ms.direction(name)
        row["predicted_decrease"] = metrics.quadratic_decrease(g, d, fisher, step_size)
        moved = ms.layer_vector(-step_size * d)
        row["actual_decrease"] = curvature.loss - loss_at(model, layers, x, y, likelihood, moved)
        spec = parse_method(name, damping_mode)
        if spec.kind == "twolevel":
            assert spec.space is not None
            if spec.space not in result.spaces:
                result.spaces[spec.space] = space_metrics(ms, spec.space, fine)
            row.update(space=spec.space, combination=spec.combination, **result.spaces[spec.space])
        if name in spectra:
            p = ms.dense(name)
            eigs, imag = _spectrum(ms, name, p, spectrum_cache)
            result.spectra[name] = eigs
            row.update(metrics.spectrum_summary(eigs))
            row["spectrum_max_imag"] = imag
            row["dense_matches_step"] = float((p @ g - d).norm() / d.norm().clamp_min(1e-300))
        result.methods[name] = row
        if progress is not None:
            progress(name)
    return result


def damping_sweep(
    model: nn.Module,
    curvature: Curvature,
    names: Sequence[str],
    dampings: Sequence[float],
    *,
    damping_mode: str = "per_factor",
    coarse_scale: float = 1.0,
    spectral_which: str = "smallest",
) -> dict[str, dict[str, dict[str, float]]]:
    """Direction metrics of every method and the coarse gain of every space per ``λ``.

    Returns:
        ``{str(λ): {method: {cos_to_exact_ng, energy_error, energy_error_relative, …},
        "space:<name>": {coarse_gain, coarse_gain_relative}}}``.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for lam in dampings:
        ms = MethodSet(model, curvature, lam, damping_mode, coarse_scale, spectral_which)
        fine = metrics.energy_error(
            ms.direction("kfac_" + damping_mode), ms.exact_direction(), ms.fhat()
        )
        rows: dict[str, dict[str, float]] = {n: direction_metrics(ms, n) for n in names}
        spaces = {parse_method(n).space for n in names} - {None}
        for space in sorted(s for s in spaces if s is not None):
            info = space_metrics(ms, space, fine)
            rows[f"space:{space}"] = {
                "coarse_gain": info["coarse_gain"],
                "coarse_gain_relative": info["coarse_gain_relative"],
            }
        out[repr(float(lam))] = rows
    return out


def fisher_structure(curvature: Curvature) -> dict[str, Any]:
    """Block norms ``‖F_ij‖_F``, the off-diagonal mass share, and a consistency check.

    ``statistics_vs_dense`` is ``max|F_stats − F_dense| / max|F_dense|`` between the
    Gram matrix of the optimizer-format statistics and the torch.func Fisher (≈ 1e-16).
    """
    fisher = curvature.dense()
    norms = metrics.block_norms(fisher, curvature.sizes)
    from_stats = fisher_from_statistics(curvature.stats)
    scale = float(fisher.abs().max())
    return {
        "layers": list(curvature.names),
        "block_sizes": list(curvature.sizes),
        "block_norms": norms.tolist(),
        "off_diagonal_fraction": metrics.off_diagonal_fraction(fisher, curvature.sizes),
        "statistics_vs_dense": float((from_stats - fisher).abs().max()) / scale if scale else 0.0,
        "trace": float(fisher.trace()),
    }
