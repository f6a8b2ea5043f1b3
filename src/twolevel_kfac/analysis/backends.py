"""How the analysis multiplies and solves with the exact damped Fisher ``F̂ = F + λI``.

* :class:`DenseBackend` (networks up to ``dense_max_params``): the dense ``F`` (torch.func
  Jacobians, or the Gram matrix of the statistics), ``F̂⁻¹g`` by Cholesky, the exact
  block-diagonal inverse by dense per-layer solves;
* :class:`MatrixFreeBackend` (larger networks): ``F v`` by ``torch.func`` jvp/vjp
  (:class:`.products.FisherProducts`, no ``P × P`` matrix), ``F̂⁻¹g`` by conjugate gradients
  to the relative residual ``cg_tol`` (:func:`.krylov.conjugate_gradient`), and
  ``blockdiag(F̂)⁻¹g`` by one conjugate-gradient solve per layer with the block products
  ``F_ii v_i + λv_i``.

Both expose ``fisher_op`` / ``fhat_op`` as :data:`.metrics.Operator` (a matrix or a product),
``solve`` and ``block_solve``; the matrix-free one records the iterations and true residuals
of the solves it is asked to record (``report``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import Tensor

from ..curvature.sample_products import per_sample_gradients
from . import metrics
from .exact import Curvature
from .krylov import CGResult, MatVec, conjugate_gradient

BACKENDS = ("dense", "matrix_free")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class MatrixFreeOptions:
    """Settings of the matrix-free analysis (the ``matrix_free`` section of the config).

    Attributes:
        cg_tol: relative residual ``‖g − F̂d‖/‖g‖`` at which conjugate gradients stop.
        cg_max_iter: the most conjugate-gradient iterations per solve.
        lanczos_steps: Lanczos steps per spectrum of ``P F̂``.
        block_norm_probes: Rademacher probes per layer when the block norms are estimated.
        gram_max_numbers: the most numbers the exact (Gram) block norms may hold; above it
            they are estimated (:mod:`.structure`).
        seed: seed of the Lanczos start vectors and of the probes.
    """

    cg_tol: float = Field(default=1e-10, gt=0, lt=1)
    cg_max_iter: int = Field(default=20_000, ge=1)
    lanczos_steps: int = Field(default=100, ge=2)
    block_norm_probes: int = Field(default=32, ge=2)
    gram_max_numbers: int = Field(default=50_000_000, ge=1)
    seed: int = 0


def _blocks(matrix: Tensor, sizes: list[int]) -> list[Tensor]:
    """The diagonal blocks of a ``[P, P]`` matrix."""
    bounds = [0, *itertools.accumulate(sizes)]
    return [matrix[lo:hi, lo:hi] for lo, hi in itertools.pairwise(bounds)]


class DenseBackend:
    """``F̂`` as a dense matrix (module docstring)."""

    name = "dense"

    def __init__(self, curvature: Curvature, damping: float) -> None:
        self.curvature = curvature
        self.damping = damping
        self.report: dict[str, Any] = {}
        self._fhat: Tensor | None = None
        self._chol: Tensor | None = None

    def fhat_matrix(self) -> Tensor:
        """``F̂ = F + λI`` (dense)."""
        if self._fhat is None:
            fisher = self.curvature.dense()
            eye = torch.eye(fisher.shape[0], dtype=fisher.dtype, device=fisher.device)
            self._fhat = fisher + self.damping * eye
        return self._fhat

    @property
    def fisher_op(self) -> metrics.Operator:
        """The undamped Fisher ``F`` as an operator."""
        return self.curvature.dense()

    @property
    def fhat_op(self) -> metrics.Operator:
        """The damped Fisher ``F̂ = F + λI`` as an operator."""
        return self.fhat_matrix()

    def solve(self, v: Tensor, record: str | None = None) -> Tensor:
        """``F̂⁻¹v`` (Cholesky)."""
        del record
        if self._chol is None:
            self._chol = torch.linalg.cholesky(self.fhat_matrix())
        return torch.cholesky_solve(v[:, None], self._chol)[:, 0]

    def fhat_blocks(self) -> list[Tensor]:
        """The diagonal blocks of ``F̂``, from the dense Fisher or from the statistics."""
        if self.curvature.fisher is not None:
            return _blocks(self.fhat_matrix(), self.curvature.sizes)
        out = []
        for s, size in zip(self.curvature.stats, self.curvature.sizes, strict=True):
            psi = per_sample_gradients(s).flatten(1)
            eye = torch.eye(size, dtype=psi.dtype, device=psi.device)
            out.append(psi.T @ psi / psi.shape[0] + self.damping * eye)
        return out

    def block_solve(self, v: Tensor, record: str | None = None) -> Tensor:
        """``blockdiag(F̂)⁻¹v`` (dense per-layer solves)."""
        del record
        parts = torch.split(v, self.curvature.sizes)
        return torch.cat(
            [torch.linalg.solve(b, p) for b, p in zip(self.fhat_blocks(), parts, strict=True)]
        )


def _cg_report(results: list[CGResult], tol: float) -> dict[str, Any]:
    return {
        "cg_iterations": sum(r.iterations for r in results),
        "cg_relative_residual": max(r.relative_residual for r in results),
        "cg_converged": all(r.converged for r in results),
        "cg_tol": tol,
    }


class MatrixFreeBackend:
    """``F̂`` through exact Fisher–vector products and conjugate gradients (module
    docstring)."""

    name = "matrix_free"

    def __init__(
        self, curvature: Curvature, damping: float, options: MatrixFreeOptions | None = None
    ) -> None:
        if curvature.products is None:
            raise ValueError("the matrix-free backend needs curvature.products")
        self.curvature = curvature
        self.products = curvature.products
        self.damping = damping
        self.options = options if options is not None else MatrixFreeOptions()
        self.report: dict[str, Any] = {}

    @property
    def fisher_op(self) -> metrics.Operator:
        """The undamped Fisher ``F`` as an operator."""
        return self.products

    @property
    def fhat_op(self) -> metrics.Operator:
        """The damped Fisher ``F̂ = F + λI`` as an operator."""
        return self.fhat

    def fhat(self, v: Tensor) -> Tensor:
        """``F̂ v = F v + λ v``."""
        return self.products(v) + self.damping * v

    def _cg(self, apply: MatVec, v: Tensor) -> CGResult:
        return conjugate_gradient(apply, v, self.options.cg_tol, self.options.cg_max_iter)

    def solve(self, v: Tensor, record: str | None = None) -> Tensor:
        """``F̂⁻¹v`` by conjugate gradients; ``record`` names the entry of ``report``."""
        result = self._cg(self.fhat, v)
        if record is not None:
            self.report[record] = _cg_report([result], self.options.cg_tol)
        return result.solution

    def block_solve(self, v: Tensor, record: str | None = None) -> Tensor:
        """``blockdiag(F̂)⁻¹v``: one conjugate-gradient solve per layer."""
        results = []
        for i, part in enumerate(torch.split(v, self.curvature.sizes)):

            def block(u: Tensor, i: int = i) -> Tensor:
                return self.products.block(i, u) + self.damping * u

            results.append(self._cg(block, part))
        if record is not None:
            self.report[record] = _cg_report(results, self.options.cg_tol)
        return torch.cat([r.solution for r in results])


Backend = DenseBackend | MatrixFreeBackend


def make_backend(
    name: str, curvature: Curvature, damping: float, options: MatrixFreeOptions | None = None
) -> Backend:
    """The backend called ``name`` (``dense`` | ``matrix_free``).

    Raises:
        ValueError: for an unknown name.
    """
    if name == "dense":
        return DenseBackend(curvature, damping)
    if name == "matrix_free":
        return MatrixFreeBackend(curvature, damping, options)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
