"""Metrics of every method at one network state and batch (:func:`evaluate_state`) and the
damping sweep (:func:`damping_sweep`), with the dense or the matrix-free backend
(:mod:`.backends`; the Fisher's block structure is :mod:`.structure`).

Per method (``d*`` = ``F̂⁻¹g``, ``E(d) = ‖d − d*‖²_F̂``, :mod:`.metrics`):

* ``cos_to_exact_ng``, ``relative_error`` = ``‖d − d*‖/‖d*‖``;
* ``energy_error`` = ``E(d)``, ``energy_error_relative`` = ``E(d)/E(0)`` with
  ``E(0) = gᵀF̂⁻¹g`` (the error of not moving: 0 for ``exact``, 1 for the zero step);
* ``predicted_decrease`` = ``α gᵀd − ½α² dᵀFd`` (the Fisher/Gauss–Newton quadratic model,
  undamped ``F``) and ``actual_decrease`` = ``L(θ) − L(θ − αd)`` on the same batch, same ``α``;
* spectrum of ``P F̂`` (``condition_number``, ``eig_*``) for the methods in ``spectra``:
  every eigenvalue (dense) or the Lanczos extremes (matrix-free, :mod:`.spectrum`);
* ``exact`` / ``block_diagonal`` matrix-free also: ``cg_iterations``,
  ``cg_relative_residual`` (the true ``‖g − F̂d‖/‖g‖``, the worst layer's for
  ``block_diagonal``), ``cg_converged``, ``cg_tol``;
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

from ..twolevel.layer_basis import dense_basis
from . import metrics
from .backends import MatrixFreeBackend, MatrixFreeOptions
from .coordinates import analysis_layers, loss_at
from .exact import Curvature
from .operators import MethodSet, parse_method
from .spectrum import dense_spectrum, lanczos_spectrum
from .structure import captured_off_diagonal, fisher_block_norms

Progress = Callable[[str], None]


@dataclass
class StateResult:
    """Metrics of one state: ``methods`` (name → metrics), ``spaces`` (coarse space →
    metrics), ``spectra`` (name → eigenvalues of ``P F̂``, dense backend only), ``solver``
    (the backend and its solves)."""

    methods: dict[str, dict[str, Any]]
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    spectra: dict[str, Tensor] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)


def direction_metrics(methods: MethodSet, name: str) -> dict[str, Any]:
    """``cos_to_exact_ng``, ``relative_error``, ``energy_error(_relative)`` of one method
    (plus the CG report of ``exact`` / ``block_diagonal`` when they were solved by CG)."""
    d_star = methods.exact_direction()
    d = methods.direction(name)
    zero_error = float(methods.curvature.flat_grad @ d_star)
    energy = metrics.energy_error(d, d_star, methods.fhat_op)
    return {
        "cos_to_exact_ng": metrics.cosine(d, d_star),
        "relative_error": metrics.relative_error(d, d_star),
        "energy_error": energy,
        "energy_error_relative": energy / zero_error if zero_error > 0 else float("nan"),
        "direction_norm": float(d.norm()),
        **methods.backend.report.get(name, {}),
    }


def _off_diagonal_captured(methods: MethodSet, space: str, basis: Tensor) -> float:
    """``‖ΠOΠ‖²_F/‖O‖²_F`` of the space: dense, or with ``K`` Fisher–vector products and the
    block norms' off-diagonal mass (:mod:`.structure`)."""
    curvature = methods.curvature
    backend = methods.backend
    if not isinstance(backend, MatrixFreeBackend):
        return metrics.captured_off_diagonal(curvature.dense(), curvature.sizes, basis)
    opts = backend.options
    norms = fisher_block_norms(
        curvature,
        probes=opts.block_norm_probes,
        max_numbers=opts.gram_max_numbers,
        seed=opts.seed,
    ).norms
    return captured_off_diagonal(
        backend.products,
        dense_basis(methods.operator(space).basis),
        metrics.off_diagonal_mass(norms),
    )


def space_metrics(methods: MethodSet, space: str, fine_energy: float) -> dict[str, Any]:
    """The coarse space's dimension, optimal energy gain and captured off-diagonal mass."""
    fhat = methods.fhat_op
    basis = methods.dense_basis(space)
    g = methods.curvature.flat_grad
    residual = g - metrics.apply(fhat, methods.direction("kfac_" + methods.damping_mode))
    gain = metrics.coarse_gain(residual, basis, fhat)
    return {
        "coarse_dim": int(basis.shape[0]),
        "coarse_gain": gain,
        "coarse_gain_relative": gain / fine_energy if fine_energy > 0 else float("nan"),
        "optimizer_energy_gain": methods.energy_gain(space),
        "off_diagonal_captured": _off_diagonal_captured(methods, space, basis),
    }


def checkpoint_metrics(
    methods: MethodSet, names: Sequence[str], spaces: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """The metrics of one state along training: :func:`direction_metrics` of ``names`` and
    :func:`space_metrics` of ``spaces`` (relative gains against the ``kfac`` direction).

    Returns:
        ``{"methods": {name: metrics}, "spaces": {space: metrics}}``.
    """
    rows = {name: direction_metrics(methods, name) for name in names}
    fine = rows.get("kfac", direction_metrics(methods, "kfac"))["energy_error"]
    return {"methods": rows, "spaces": {s: space_metrics(methods, s, fine) for s in spaces}}


def _spectrum_row(
    ms: MethodSet, name: str, d: Tensor, options: MatrixFreeOptions, cache: dict[str, Any]
) -> tuple[dict[str, Any], Tensor | None]:
    """The spectrum entries of a row and, for the dense backend, all eigenvalues."""
    g = ms.curvature.flat_grad
    if isinstance(ms.backend, MatrixFreeBackend):
        row = lanczos_spectrum(ms, name, options, cache)
        check = ms.apply(name, g)
        row["operator_matches_step"] = float((check - d).norm() / d.norm().clamp_min(1e-300))
        return row, None
    p = ms.dense(name)
    eigs, imag = dense_spectrum(ms, name, p, cache)
    row = {**metrics.spectrum_summary(eigs), "spectrum_max_imag": imag}
    row["dense_matches_step"] = float((p @ g - d).norm() / d.norm().clamp_min(1e-300))
    return row, eigs


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
    backend: str = "dense",
    options: MatrixFreeOptions | None = None,
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
        backend: ``dense`` | ``matrix_free`` (:mod:`.backends`).
        options: the matrix-free settings (CG, Lanczos, probes).
        progress: called with each method name (a progress bar's update).

    Returns:
        The :class:`StateResult`.
    """
    opts = options if options is not None else MatrixFreeOptions()
    ms = MethodSet(
        model, curvature, damping, damping_mode, coarse_scale, spectral_which, backend, opts
    )
    layers = analysis_layers(model)
    x, y = batch
    g, fisher, fhat = curvature.flat_grad, ms.fisher_op, ms.fhat_op
    fine = metrics.energy_error(ms.direction("kfac_" + damping_mode), ms.exact_direction(), fhat)
    result = StateResult(methods={})
    spectrum_cache: dict[str, Any] = {}
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
            entries, eigs = _spectrum_row(ms, name, d, opts, spectrum_cache)
            row.update(entries)
            if eigs is not None:
                result.spectra[name] = eigs
        result.methods[name] = row
        if progress is not None:
            progress(name)
    result.solver = {"backend": ms.backend.name, **ms.backend.report}
    if isinstance(ms.backend, MatrixFreeBackend):
        result.solver["fisher_vector_products"] = ms.backend.products.products
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
    backend: str = "dense",
    options: MatrixFreeOptions | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Direction metrics of every method and the coarse gain of every space per ``λ``.

    Returns:
        ``{str(λ): {method: {cos_to_exact_ng, energy_error, energy_error_relative, …},
        "space:<name>": {coarse_gain, coarse_gain_relative}}}``.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for lam in dampings:
        ms = MethodSet(
            model, curvature, lam, damping_mode, coarse_scale, spectral_which, backend, options
        )
        fine = metrics.energy_error(
            ms.direction("kfac_" + damping_mode), ms.exact_direction(), ms.fhat_op
        )
        rows: dict[str, dict[str, Any]] = {n: direction_metrics(ms, n) for n in names}
        spaces = {parse_method(n).space for n in names} - {None}
        for space in sorted(s for s in spaces if s is not None):
            info = space_metrics(ms, space, fine)
            rows[f"space:{space}"] = {
                "coarse_gain": info["coarse_gain"],
                "coarse_gain_relative": info["coarse_gain_relative"],
            }
        out[repr(float(lam))] = rows
    return out
