"""One Kronecker factor's decompositions and damped inverses, robust to rounding.

``eigen``: the eigenpairs (:func:`safe_eigh`); ``cholesky``: the factor itself, whose damped
inverse ``(M + shift·I)⁻¹`` is formed per damping (:func:`damped_inverse`). A factorisation
that fails (a float32 factor that is numerically singular) is retried in float64, then
with growing extra damping (:data:`RETRY_DAMPINGS`, warned about past the first rung).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from ..warning_level import caller_level

__all__ = [
    "HALF_DTYPES",
    "RETRY_DAMPINGS",
    "converted_decomposition",
    "damped_inverse",
    "decompose_factor",
    "eigen_inverse",
    "eigh_dtype",
    "eigh_or_none",
    "safe_eigh",
    "solver_dtype",
]

_T = TypeVar("_T")
HALF_DTYPES = (torch.float16, torch.bfloat16)
"""The dtypes no decomposition runs in (:func:`solver_dtype`)."""


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a factor is decomposed in: float32 for the half dtypes (``factor_dtype=
    torch.bfloat16``: LAPACK and cuSOLVER take neither), else its own."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def eigh_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a factor's cached eigenpairs are computed in (:func:`decompose_factor`):
    float64, for a float32 factor too (its eigenpairs are rounded to float32 afterwards),
    float32 for a half one (whose own rounding, ``2⁻⁸``, is coarser than float32's ``eigh``).

    A float32 ``eigh`` is off by about ``ε₃₂‖M‖`` in every eigenvalue, so the damped
    inverse ``Q diag(1/(d + s)) Qᵀ`` (EKFAC's ``S + λ(d_G + d_A) + λ²`` likewise) is off by
    about ``2.4·ε₃₂·d_max/s``: 5.7e-3 on MNIST's input factor at ``s = 1e-3``, 0.28 on raw
    pixels, where a float32 Cholesky is 4.8e-6 and 4.1e-4; from float64 pairs rounded to
    float32 1.6e-8 and 6.9e-9 (``docs/benchmarks/implementation_choices.md``, "eigh in
    float64"; 1.3–1.9× the time of a float32 ``eigh``)."""
    return torch.float32 if dtype in HALF_DTYPES else torch.float64


def eigh_or_none(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """``torch.linalg.eigh``, or ``None`` when it raises or returns non-finite values (MKL's
    float32 ``syevd`` was seen to return NaN silently for rank-deficient 785×785 factors)."""
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch's LinAlgError is a RuntimeError
        return None
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        return None
    return values, vectors


RETRY_DAMPINGS = (1e-10, 1e-7, 1e-4, 1e-2)
"""Extra damping tried, in order, when a decomposition fails in the factor's dtype and in
float64: multiples of ``mean(diag M) + 1`` (so the ladder is scale-aware and never zero)."""


def _retry_with_damping(
    matrix64: Tensor, attempt: Callable[[Tensor], _T | None], what: str
) -> tuple[_T, float, bool]:
    """Run ``attempt(M + εI)`` for ε on :data:`RETRY_DAMPINGS` until it succeeds.

    Returns the result, the ε used and whether it was the first (negligible) rung; warns
    when ε had to grow past it (the factor is then damped more than asked, which is what
    keeps a run alive).

    Raises:
        RuntimeError: if every rung fails.
    """
    scale = float(matrix64.diagonal().mean()) + 1.0
    eye = torch.eye(matrix64.shape[0], dtype=matrix64.dtype, device=matrix64.device)
    for rung, relative in enumerate(RETRY_DAMPINGS):
        shift = relative * scale
        result = attempt(matrix64 + shift * eye)
        if result is not None:
            if rung > 0:
                warnings.warn(
                    f"{what} of a {tuple(matrix64.shape)} Kronecker factor failed in float64; "
                    f"it succeeded with extra damping {shift:.3g}",
                    RuntimeWarning,
                    stacklevel=caller_level(),
                )
            return result, shift, rung == 0
    raise RuntimeError(
        f"{what} of a {tuple(matrix64.shape)} factor failed in its dtype, in float64 and "
        f"with extra damping up to {RETRY_DAMPINGS[-1] * scale:.3g}"
    )


def safe_eigh(matrix: Tensor, wide: bool = False) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD factor with eigenvalues clipped at 0.

    Tries the factor's dtype (float32 is the faster, ``docs/benchmarks/eigh_dtype.md``;
    float32 for a half dtype: :func:`solver_dtype`), or :func:`eigh_dtype` where ``wide``
    (the eigenpairs of the damped inverses), then float64, then float64 with growing extra
    damping ``M + εI`` (:data:`RETRY_DAMPINGS`). The first rung
    (ε = 1e-10·(tr M / n + 1)) is subtracted again, since the eigenvectors do not change
    under a shift; larger rungs are kept in the eigenvalues (the factor is damped more)
    and warned about. Returns ``(eigenvalues, eigenvectors)`` in the input's dtype.

    Raises:
        RuntimeError: if the factor has non-finite entries or every attempt fails.
    """
    if not torch.isfinite(matrix).all():
        raise RuntimeError("cannot decompose a Kronecker factor with NaN/Inf entries")
    work = matrix.to((eigh_dtype if wide else solver_dtype)(matrix.dtype))
    sym = 0.5 * (work + work.T)
    result = eigh_or_none(sym)
    if result is None:
        sym64 = sym.double()
        result = None if sym.dtype == torch.float64 else eigh_or_none(sym64)
        if result is None:
            (values, vectors), shift, negligible = _retry_with_damping(
                sym64, eigh_or_none, "eigendecomposition"
            )
            result = (values - shift if negligible else values, vectors)
    values, vectors = result
    return values.clamp_min(0.0).to(matrix.dtype), vectors.to(matrix.dtype)


def batched_eigh(matrices: Tensor) -> tuple[Tensor, Tensor] | None:
    """:func:`decompose_factor`'s eigenpairs of a stack of factors ``[B, n, n]`` in one call
    (in :func:`eigh_dtype`, eigenvalues clipped at 0), or ``None`` when any of them would
    need :func:`safe_eigh`'s retries (decompose those one by one)."""
    if not bool(torch.isfinite(matrices).all()):
        return None
    work = matrices.to(eigh_dtype(matrices.dtype))
    result = eigh_or_none(0.5 * (work + work.mT))
    if result is None:
        return None
    return result[0].clamp_min(0.0).to(matrices.dtype), result[1].to(matrices.dtype)


def decompose_factor(matrix: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """The cached decomposition of one factor: ``eigen`` → :func:`safe_eigh` in
    :func:`eigh_dtype` (float64 for a float32 factor, since 2026-12-07); ``cholesky`` →
    ``(the factor itself, empty)`` (its damped inverse is formed per damping; the factor's
    next update is then out of place: :mod:`.running_average`)."""
    if method == "eigen":
        return safe_eigh(matrix, wide=True)
    return matrix, matrix.new_empty(0)


def converted_decomposition(
    decomp: tuple[Tensor, Tensor] | None, method: str
) -> tuple[Tensor, Tensor] | None:
    """One factor's cached decomposition in ``method``'s form (``None``: already in it):
    eigenpairs → the factor ``Q diag(d) Qᵀ``; a factor → :func:`safe_eigh`."""
    if decomp is None or (decomp[0].dim() == 1) == (method == "eigen"):
        return None
    values, vectors = decomp
    if method == "eigen":
        return safe_eigh(values, wide=True)
    return (vectors * values) @ vectors.T, values.new_empty(0)


def _cholesky_inverse_or_none(matrix: Tensor) -> Tensor | None:
    """``M⁻¹`` by Cholesky, or ``None`` when ``M`` is not numerically positive definite."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    # a finite factor with a positive diagonal has a finite inverse (cheaper to check)
    if int(info) != 0 or not bool(torch.isfinite(chol.diagonal()).all()):
        return None
    return torch.cholesky_inverse(chol)


def damped_inverse(matrix: Tensor, shift: float) -> Tensor:
    """``(M + shift·I)⁻¹`` by Cholesky; retried in float64, then with growing extra
    damping (:data:`RETRY_DAMPINGS`, warned about past the first rung).

    The result is exactly symmetric, so an inverse shared as a packed triangle
    (:mod:`twolevel_kfac.distributed`) equals the one computed locally, and a resumed run
    (which recomputes it) steps as the uninterrupted one: torch's CPU ``cholesky_inverse``
    already mirrors the triangle LAPACK's ``potri`` writes (pinned by a test), and its
    column-major result is returned as the row-major view of its transpose; on other
    devices the upper triangle is mirrored here (three passes over the matrix: 7 ms of a
    54 ms CURVES refresh when done on the CPU as well)."""
    # a copy (Cholesky reads the lower triangle only: no symmetrisation needed)
    sym = matrix.to(solver_dtype(matrix.dtype), copy=True)
    sym.diagonal().add_(shift)
    inverse = _cholesky_inverse_or_none(sym)
    if inverse is None:
        inverse = _cholesky_inverse_or_none(sym.double())
    if inverse is None:
        try:
            retried, _, _ = _retry_with_damping(sym.double(), _cholesky_inverse_or_none, "Cholesky")
        except RuntimeError as error:
            if matrix.dtype not in HALF_DTYPES or not bool(torch.isfinite(matrix).all()):
                raise
            raise RuntimeError(
                f"{error}: a {matrix.dtype} factor is rounded into an indefinite matrix that "
                "no Cholesky factorisation takes; use inverse_method='auto' or 'eigen' with "
                "half factors (the eigendecomposition clips the rounding's negative "
                "eigenvalues at 0), or factor_dtype=torch.float32"
            ) from error
        inverse = retried
    if inverse.device.type == "cpu":
        # LAPACK's result is column-major: its transpose, equal bit for bit, is row-major
        # (the layout every later GEMM and a packed triangle's unpacking assume)
        inverse = inverse.mT
    else:
        upper = inverse.triu()
        inverse = upper.add_(upper.triu(1).mT)
    return inverse.contiguous().to(matrix.dtype)


def eigen_inverse(values: Tensor, vectors: Tensor, shift: float) -> Tensor:
    """``(M + shift·I)⁻¹ = Q diag(1/(d + shift)) Qᵀ`` from the eigenpairs of ``M``."""
    return (vectors / (values + shift)) @ vectors.T
