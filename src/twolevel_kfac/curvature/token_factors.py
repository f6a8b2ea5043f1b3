"""The running curvature of an embedding table whose token factor is a vector.

:class:`TokenFactors` (for :mod:`.tokens`) holds ``A`` (``[D, D]``) and the token
frequencies ``f`` (``[V]``, ``G = diag(f)``), ``A``'s decomposition frozen at each refresh,
and applies the damped inverse of :mod:`.tokens` to a ``[V, D]`` matrix (the dense path's
arithmetic with ``G``'s eigenbasis the identity); the spectral coarse space's vector among
the tokens seen (:func:`table_spectral_vector`); checkpoints, a dense block's of an untied
table included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .extreme_eigen import frozen_eigenpairs
from .factor_inverse import converted_decomposition, damped_inverse, decompose_factor, eigen_inverse
from .kronecker import factor_dampings, location_count, per_location, pi_ratio
from .kronecker_apply import InverseOnMatrices
from .running_average import ema_weight, running_average, shares_memory

__all__ = ["TokenFactors", "frozen_diagonal", "table_spectral_vector"]


def table_spectral_vector(
    frequencies: Tensor, values_a: Tensor, vectors_a: Tensor, which: str
) -> Tensor:
    """The spectral coarse vector of a table's block ``diag(f) ⊗ A`` (``[V, D]``): ``e_v
    q_jᵀ`` of its smallest (largest) eigenvalue ``f_v a_j`` *among the tokens seen*
    (``f_v > 0``). An unseen (or padding) token's row gets no gradient, so its eigenvector,
    which the plain rule would pick for ``"smallest"``, would add nothing to the coarse
    space. Zeros when no token was seen."""
    out = vectors_a.new_zeros(frequencies.shape[0], vectors_a.shape[0])
    seen = torch.nonzero(frequencies > 0).flatten()
    if len(seen) == 0:
        return out
    pick = torch.argmin if which == "smallest" else torch.argmax
    row = int(seen[pick(frequencies[seen])])
    out[row] = vectors_a[:, int(pick(values_a))]
    return out


class TokenFactors(InverseOnMatrices):
    """Running ``A`` (``[D, D]``) and token frequencies ``f`` (``[V]``) of a large table,
    with ``A``'s decomposition frozen at the last refresh (the interface of
    :class:`~.kronecker.KroneckerFactors` that the fine and coarse levels use)."""

    def __init__(self) -> None:
        self.a_factor: Tensor | None = None
        self.frequencies: Tensor | None = None
        self.num_updates = 0
        self.num_locations: float = 1
        self.a_decomposition: tuple[Tensor, Tensor] | None = None
        self.frozen_frequencies: Tensor | None = None
        self.decomp_pi = 1.0
        self._key: tuple[float, str, str, float] | None = None  # (λ, mode, method, T)
        self._prepared: tuple[Tensor, ...] = ()

    def update(
        self,
        new_a: Tensor,
        new_f: Tensor,
        ema_decay: float,
        num_locations: float,
        replacing: bool = False,
    ) -> None:
        """``X ← ρ X + (1 − ρ) X_new`` for ``A`` and ``f`` (:mod:`.running_average`; in
        place over the frozen ones where ``replacing``, as
        :meth:`~.kronecker.KroneckerFactors.update`)."""
        self.num_updates += 1
        self.num_locations = num_locations
        rho = ema_weight(self.num_updates, ema_decay)
        frozen = () if replacing else (self.frozen_frequencies, *(self.a_decomposition or ()))
        a, f = self.a_factor, self.frequencies
        self.a_factor = running_average(a, new_a, rho, not shares_memory(a, *frozen))
        self.frequencies = running_average(f, new_f, rho, not shares_memory(f, *frozen))

    @property
    def ready(self) -> bool:
        """Whether ``A`` and ``f`` hold an estimate."""
        return self.a_factor is not None and self.frequencies is not None

    def factor_shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """The shapes of ``A`` and ``f`` (``None`` before an estimate)."""
        if self.a_factor is None or self.frequencies is None:
            return None
        return tuple(self.a_factor.shape), tuple(self.frequencies.shape)

    @property
    def decomposed(self) -> bool:
        """Whether a refresh has frozen the factors for the inverses."""
        return self.a_decomposition is not None

    def decompose(self, method: str) -> None:
        """Freeze ``f`` and ``A``'s decomposition (and π) until the next refresh."""
        assert self.a_factor is not None and self.frequencies is not None
        a, f = self.a_factor, self.frequencies
        self.a_decomposition = decompose_factor(a, method)
        self.frozen_frequencies = f  # the next update is out of place (.running_average)
        self.decomp_pi = pi_ratio(float(a.trace()), a.shape[0], float(f.sum()), f.shape[0])
        self._key = None

    def convert_decomposition(self, method: str) -> bool:
        """Put ``A``'s cached decomposition in ``method``'s form (a checkpoint of the other
        ``inverse_method``); whether it changed."""
        converted = converted_decomposition(self.a_decomposition, method)
        if converted is None:
            return False
        self.a_decomposition, self._key = converted, None
        return True

    def _inverse(self, damping: float, mode: str, method: str) -> tuple[Tensor, ...]:
        """``(1/(f + s_G)/T, (A + s_A I)⁻¹)`` for a factored damping, ``(Q, 1/(f aᵀ + λ)/T)``
        for ``eigen_sum``; cached per damping."""
        if self._key == (damping, mode, method, self.num_locations):
            return self._prepared
        if self.a_decomposition is None or self.frozen_frequencies is None:
            raise RuntimeError("TokenFactors.decompose() must run before apply_inverse()")
        f, t = self.frozen_frequencies, self.num_locations
        if mode == "eigen_sum":
            values, vectors = self.a_decomposition
            grid = torch.outer(f, values) + damping
            self._prepared = (vectors, per_location(grid.reciprocal_(), t))
        else:
            shift_a, shift_g = factor_dampings(damping, mode, self.decomp_pi)
            if method == "eigen":
                inv_a = eigen_inverse(*self.a_decomposition, shift_a)
            else:
                inv_a = damped_inverse(self.a_decomposition[0], shift_a)
            self._prepared = (per_location((f + shift_g).reciprocal(), t), inv_a)
        self._key = (damping, mode, method, self.num_locations)
        return self._prepared

    def apply_inverse(self, grad: Tensor, damping: float, mode: str, method: str) -> Tensor:
        """The damped ``(G ⊗ A)⁻¹`` (divided by ``T``) on a ``[V, D]`` matrix."""
        prepared = self._inverse(damping, mode, method)
        x = grad.to(prepared[0].dtype)
        if mode == "eigen_sum":
            vectors, grid = prepared
            out = ((x @ vectors) * grid) @ vectors.T
        else:
            inv_f, inv_a = prepared
            out = (x * inv_f[:, None]) @ inv_a
        return out.to(grad.dtype)

    def table_eigenbasis(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(f, d_A, Q_A)`` of the frozen factors (``G = diag(f)``: its eigenbasis is the
        identity), or ``None`` without an eigendecomposition of ``A`` (EKFAC's basis,
        :mod:`twolevel_kfac.optim.ekfac`)."""
        if self.a_decomposition is None or self.frozen_frequencies is None:
            return None
        values, vectors = self.a_decomposition
        if vectors.numel() == 0:  # a Cholesky factor
            return None
        return self.frozen_frequencies, values, vectors

    def spectral_vector(self, which: str) -> Tensor:
        """:func:`table_spectral_vector` of the frozen factors (``A``'s eigenpairs, or its
        one extreme pair under Cholesky: :func:`~.extreme_eigen.frozen_eigenpairs`)."""
        assert self.a_decomposition is not None and self.frozen_frequencies is not None
        pairs = frozen_eigenpairs(self.a_decomposition, which)
        return table_spectral_vector(self.frozen_frequencies, *pairs, which)

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint."""
        return {
            "a_factor": self.a_factor,
            "frequencies": self.frequencies,
            "num_updates": self.num_updates,
            "num_locations": self.num_locations,
            "a_decomposition": self.a_decomposition,
            "frozen_frequencies": self.frozen_frequencies,
            "decomp_pi": self.decomp_pi,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, or the dense block's of an untied table (a small
        table's, saved before 2026-12-09): ``f`` the diagonal of its ``G``."""
        if "G" in state and "frequencies" not in state:
            state = _from_dense(state)
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise KeyError(f"embedding table block state is missing {missing}")
        self.a_factor, self.frequencies = state["a_factor"], state["frequencies"]
        self.num_updates = int(state["num_updates"])
        self.num_locations = location_count(state["num_locations"])
        decomp = state["a_decomposition"]
        self.a_decomposition = None if decomp is None else (decomp[0], decomp[1])
        self.frozen_frequencies = state["frozen_frequencies"]
        self.decomp_pi = float(state["decomp_pi"])
        self._key = None


def frozen_diagonal(decomposition: tuple[Tensor, Tensor]) -> Tensor:
    """The diagonal of a frozen ``G`` from its decomposition (``f`` of a table's ``G =
    diag(f)``): the matrix itself under Cholesky (an empty second entry), else ``Σ_k
    λ_k q_k²`` of its eigenpairs."""
    values, vectors = decomposition
    return values.diagonal() if vectors.numel() == 0 else (vectors**2) @ values


def _from_dense(state: dict[str, Any]) -> dict[str, Any]:
    """A :class:`TokenFactors` state from a dense ``(A, G)`` block's
    (:class:`~.kronecker.KroneckerFactors`) of a table whose ``G`` is diagonal.

    Raises:
        KeyError: its ``G`` is not diagonal.
    """
    dense_g, decomp_g = state["G"], state["decomp_g"]
    if dense_g is not None and bool((dense_g - torch.diag(dense_g.diagonal())).any()):
        raise KeyError("the saved token factor G is not diagonal (a table tied to a head)")
    return {
        "a_factor": state["A"],
        "frequencies": None if dense_g is None else dense_g.diagonal().clone(),
        "num_updates": state["num_updates"],
        "num_locations": state["num_locations"],
        "a_decomposition": state["decomp_a"],
        "frozen_frequencies": None if decomp_g is None else frozen_diagonal(decomp_g),
        "decomp_pi": state["decomp_pi"],
    }
