"""The spectrum of ``P F̂`` per method: dense eigenvalues, or Lanczos extremes matrix-free.

Dense (:func:`dense_spectrum`): all eigenvalues (:func:`.metrics.preconditioned_spectrum`).
A-DEF1 reuses A-DEF2's: with ``M⁻¹`` and ``Q`` symmetric, ``P_adef1 = P_adef2ᵀ``, so
``P_adef1 F̂`` is similar to ``F̂ P_adef2ᵀ = (P_adef2 F̂)ᵀ`` (Tang et al. 2009), and the
non-symmetric eigenproblem is solved once per space.

Matrix-free (:func:`lanczos_spectrum`): for symmetric ``P``, ``P F̂`` is self-adjoint in the
``F̂``-inner product, and :func:`.krylov.lanczos` gives its extreme Ritz values with one
``P v`` (:meth:`.operators.MethodSet.apply`, the optimizer's code) and one exact ``F̂ v`` per
step. The extreme Ritz values lie *inside* the spectrum, so the reported condition number
``θ_max/θ_min`` is a lower bound of ``κ(P F̂)``; ``eig_min_bound`` / ``eig_max_bound`` are the
Lanczos residual bounds ``β_m|s_{m,i}|`` (a Ritz value is within that distance of an
eigenvalue), and ``eig_*_converged`` says whether that bound is below ``RITZ_TOL`` of the
value. The largest eigenvalues converge within a few dozen steps; the smallest of an
ill-conditioned ``P F̂`` usually do not (then the condition number is only a lower bound).
Special cases:

* ``exact``: ``P F̂ = I`` by construction (``P = F̂⁻¹``); reported as 1 without iterating;
* A-DEF1 / A-DEF2 with a Galerkin coarse matrix and ``ω_c = 1``: ``QF̂ = Π`` is the
  ``F̂``-orthogonal projector on the coarse space, ``P_adef2 F̂ = (I − Π)M⁻¹F̂ + Π`` is block
  triangular on ``range Π ⊕ range(I − Π)`` with diagonal blocks ``I`` and
  ``(I − Π)M⁻¹F̂(I − Π)``, exactly like the balanced (BNN) ``P_bnn F̂ =
  (I − Π)M⁻¹F̂(I − Π) + Π`` — the same spectrum (Tang et al. 2009), so the symmetric
  ``<space>+balanced`` operator is used (``spectrum_of``);
* A-DEF1 / A-DEF2 with the ``tselepidis`` coarse matrix or ``ω_c ≠ 1``, and any ``P`` that
  fails the symmetry probe ``|uᵀPv − vᵀPu|``: skipped, with a note.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import metrics
from .backends import MatrixFreeOptions
from .krylov import lanczos
from .operators import MethodSet, parse_method, twolevel_name

RITZ_TOL = 1e-3
"""An extreme Ritz value counts as converged when its residual bound is at most this
fraction of it (``eig_min_converged`` / ``eig_max_converged``)."""

SYMMETRY_TOL = 1e-8
"""Relative defect ``|uᵀPv − vᵀPu| / (‖u‖‖Pv‖ + ‖v‖‖Pu‖)`` above which ``P`` is non-symmetric."""


def dense_spectrum(
    ms: MethodSet, name: str, p: Tensor, cache: dict[str, tuple[Tensor, float]]
) -> tuple[Tensor, float]:
    """Eigenvalues of ``P F̂`` (dense) and the largest relative imaginary part; A-DEF1
    reuses A-DEF2's (module docstring)."""
    key = name[: -len("adef1")] + "adef2" if name.endswith("+adef1") else name
    if key not in cache:
        cache[key] = metrics.preconditioned_spectrum(p if key == name else ms.dense(key), ms.fhat())
    return cache[key]


def spectrum_source(ms: MethodSet, name: str) -> tuple[str | None, str]:
    """The method whose symmetric operator has the spectrum of ``name``'s ``P F̂``, or
    ``None`` with the reason (module docstring)."""
    spec = parse_method(name, ms.damping_mode)
    if spec.kind != "twolevel" or spec.combination not in ("adef1", "adef2"):
        return name, ""
    assert spec.space is not None
    if spec.space == "tselepidis" or ms.coarse_scale != 1.0:
        return None, "A-DEF with a non-Galerkin coarse matrix or ω_c ≠ 1: P F̂ is non-symmetric"
    return twolevel_name(spec.space, "balanced"), ""


def symmetry_defect(ms: MethodSet, name: str, generator: torch.Generator) -> float:
    """``|uᵀPv − vᵀPu| / (‖u‖‖Pv‖ + ‖v‖‖Pu‖)`` for two Gaussian probes (two ``P`` products)."""
    g = ms.curvature.flat_grad
    u = torch.randn(g.shape, generator=generator, dtype=g.dtype)
    v = torch.randn(g.shape, generator=generator, dtype=g.dtype)
    pu, pv = ms.apply(name, u), ms.apply(name, v)
    scale = float(u.norm() * pv.norm() + v.norm() * pu.norm())
    return abs(float(u @ pv - v @ pu)) / scale if scale else 0.0


def _lanczos_row(ms: MethodSet, name: str, options: MatrixFreeOptions) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(options.seed)
    kind = parse_method(name, ms.damping_mode).kind
    defect = 0.0 if kind == "block_diagonal" else symmetry_defect(ms, name, generator)
    if defect > SYMMETRY_TOL:
        return {"spectrum_method": "skipped", "spectrum_note": f"P is not symmetric ({defect:.1e})"}
    g = ms.curvature.flat_grad
    start = torch.randn(g.shape, generator=generator, dtype=g.dtype)
    fhat = ms.fhat_op
    result = lanczos(
        lambda v: ms.apply(name, v),
        start,
        options.lanczos_steps,
        apply_b=lambda v: metrics.apply(fhat, v),
    )
    theta, bounds = result.ritz_values, result.residual_bounds
    return {
        "spectrum_method": "lanczos",
        "lanczos_steps": result.steps,
        "eig_min": float(theta[0]),
        "eig_max": float(theta[-1]),
        "condition_number": metrics.condition_number(theta),
        "eig_min_bound": float(bounds[0]),
        "eig_max_bound": float(bounds[-1]),
        "eig_min_converged": bool(bounds[0] <= RITZ_TOL * theta[0].abs()),
        "eig_max_converged": bool(bounds[-1] <= RITZ_TOL * theta[-1].abs()),
        "symmetry_defect": defect,
    }


def lanczos_spectrum(
    ms: MethodSet, name: str, options: MatrixFreeOptions, cache: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The extreme eigenvalues of ``P F̂`` by Lanczos (module docstring), for the row of
    ``name`` (``spectrum_method``: ``identity`` | ``lanczos`` | ``skipped``).

    Args:
        ms: the method set (matrix-free or dense backend).
        name: the method.
        options: ``lanczos_steps`` and the seed of the start vector and probes.
        cache: rows already computed, by method (shared by A-DEF1 / A-DEF2 / balanced).

    Returns:
        ``eig_min``, ``eig_max``, ``condition_number`` (a lower bound), their residual bounds
        and the provenance of the numbers.
    """
    if parse_method(name, ms.damping_mode).kind == "exact":
        return {"spectrum_method": "identity", "eig_min": 1.0, "eig_max": 1.0,
                "condition_number": 1.0}  # fmt: skip
    source, reason = spectrum_source(ms, name)
    if source is None:
        return {"spectrum_method": "skipped", "spectrum_note": reason}
    if source not in cache:
        cache[source] = _lanczos_row(ms, source, options)
    row = dict(cache[source])
    if source != name:
        row["spectrum_of"] = source
    return row
