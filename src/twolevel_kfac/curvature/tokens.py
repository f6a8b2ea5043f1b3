"""Embedding tables whose token-frequency factor is kept as a vector: the Kronecker block
of :mod:`.layer_types` for tables of more than :data:`~.layer_types.EMBEDDING_MAX_ROWS`
rows, and for smaller ones that nothing else computes with, wherever the optimizer's
options allow (:func:`~.token_form.choose_token_factors`).

A table ``E`` (``[V, D]``) is a ``Linear`` on one-hot tokens (:mod:`.layer_types`): sample
``n``'s gradient is ``∇E = Σ_t e_{x_t} δ_tᵀ`` and its block is ``G ⊗ A`` in the table's
orientation, ``G = E_{n,t}[e eᵀ] = diag(f)`` with ``f_v`` the frequency of token ``v``
among the ``N·T`` positions, ``A = E_{n,t}[δ δᵀ]`` (``D × D``). One-hot vectors are
orthogonal, so ``G`` is diagonal exactly: keeping ``f`` instead of the dense ``V × V``
matrix, and the token ids instead of one-hot rows, is the same block at ``O(V + D²)``
memory. The damped inverse on ``X`` (``[V, D]``) is, for a factored damping (``s_G``,
``s_A`` of :func:`~.kronecker.factor_dampings`, ``π`` with ``tr G = Σ_v f_v``),

    ((G + s_G I) ⊗ (A + s_A I))⁻¹ X = diag(1/(f + s_G)) X (A + s_A I)⁻¹ / T,

and for ``eigen_sum`` (``A = Q diag(a) Qᵀ``): ``[(X Q) ⊘ (f aᵀ + λ)] Qᵀ / T``: the dense
path's arithmetic with ``G``'s eigenbasis the identity (``T`` the positions per sample,
KFC's division).

The statistics (:class:`TokenStats`) keep the token ids as a float column (float64 as
captured, whatever the model's dtype; a float32 factor dtype holds them up to 2²⁴ rows) and
the output gradients ``δ``; the coarse level's products with per-sample gradients
gather and scatter rows by token instead of forming ``[N, V, D]``. Limits: a table tied to
a ``Linear`` head has a dense ``V × V`` factor from the head's logits (above
``EMBEDDING_MAX_ROWS`` rows it takes the fallback step, :mod:`.discovery`), and
``weight_sharing="reduce"`` keeps the expand view for the large tables (reduce's
per-sample token counts have a dense ``G``).

Small tables (up to ``EMBEDDING_MAX_ROWS`` rows) keep the dense one-hot block where the
diagonal one would change the step: tied to a module of another type, under
``weight_sharing="reduce"``, and for fine levels that read the dense block (Kronecker-SVD,
KFAC-corrected). Untied elsewhere (before 2026-12-09 every small table was dense), the two
are the same block: a ``V = 4096`` table's steady step took 2.13× an SGD step, its refresh
2.1 s and its state 74 MiB dense, 1.17×, 205 ms and 9.7 MiB as a vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .blocks import BlockStats, layer_weight
from .extreme_eigen import frozen_eigenpairs
from .factor_inverse import converted_decomposition, damped_inverse, decompose_factor, eigen_inverse
from .kronecker import factor_dampings, location_count, per_location, pi_ratio
from .kronecker_apply import InverseOnMatrices
from .layer_types import (
    embedding_reason,
    linear_features,
    one_hot_rows,
    register_layer_type,
)
from .live_positions import live_count
from .running_average import ema_weight, running_average, shares_memory
from .token_form import keeps_frequencies

__all__ = ["TokenFactors", "TokenStats", "frozen_diagonal", "table_spectral_vector"]


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


@dataclass
class TokenStats(BlockStats):
    """``a``: the token ids as a float column ``[N, T, 1]``; ``g``: the output gradients
    ``δ`` ``[N, T, D]``; ``table_rows``: ``V`` (module docstring)."""

    factors_type: ClassVar[Callable[[], Any]] = TokenFactors
    exact_inputs: ClassVar[bool] = True  # the ids stay float64 in a half-precision model
    dead_rows: ClassVar[bool] = True
    table_rows: int = 0
    padding: int = -1  # the table's padding_idx (-1: none): its positions give no gradient

    @classmethod
    def of(cls, module: nn.Module, a: Tensor, g: Tensor) -> TokenStats:
        """The statistics of a large table.

        Raises:
            ValueError: token ids in a floating type too narrow to hold them exactly
                (``factor_dtype`` float16 / bfloat16).
        """
        rows = int(layer_weight(module).shape[0])
        _check_ids(a.dtype, rows)
        padding = getattr(module, "padding_idx", None)
        return cls(a, g, rows, -1 if padding is None else int(padding))

    @classmethod
    def applies(cls, module: nn.Module) -> bool:
        """Tables that keep ``f`` (:func:`keeps_frequencies`; the others: dense ``G``)."""
        return keeps_frequencies(module)

    @classmethod
    def shapes(cls, module: nn.Module) -> tuple[tuple[int, ...], ...]:
        """Token column ``[1]``, ``δ`` ``[D]``, ``A`` ``[D, D]``, ``f`` ``[V]``."""
        rows, dim = layer_weight(module).shape
        return (1,), (dim,), (dim, dim), (rows,)

    @property
    def tokens(self) -> Tensor:
        """The token ids, ``[N, T]`` (int64)."""
        _check_ids(self.a.dtype, self.table_rows)
        return self.a[..., 0].long()

    def _gradients(self) -> Tensor:
        """``δ`` of the positions that give the table a gradient (``padding`` ones zero)."""
        if self.padding < 0:
            return self.g
        return self.g.masked_fill((self.tokens == self.padding).unsqueeze(-1), 0.0)

    def block_factors(self) -> tuple[Tensor, Tensor]:
        """``A = Σ_{n,t} δ δᵀ / (N T)`` and ``f_v``: the share of the ``N·T`` positions
        holding token ``v`` (the positions that are not ``dead``: :mod:`.live_positions`)."""
        rows, tokens = self.g.flatten(0, 1), self.tokens.reshape(-1)
        if self.dead is not None:
            keep = ~self.dead.reshape(-1)
            rows, tokens = rows[keep], tokens[keep]
        count = max(int(rows.shape[0]), 1)
        counts = torch.bincount(tokens, minlength=self.table_rows)
        if self.padding >= 0:  # as the dense path's zero one-hot row of the padding token
            counts[self.padding] = 0
        return rows.T @ rows / count, counts.to(self.g.dtype) / count

    def factor_count(self) -> int:
        """The positions :meth:`block_factors` averages over (ranks weight by it)."""
        return live_count(self)

    def sample_gradients(self) -> Tensor:
        """``∇E_n = Σ_t e_{x_t} δ_tᵀ``, ``[N, V, D]`` (materialised: tests and analysis)."""
        n, _, dim = self.g.shape
        out = self.g.new_zeros(n, self.table_rows, dim)
        return out.scatter_add_(1, self.tokens[..., None].expand_as(self.g), self._gradients())

    def rotated_second_moments(self, vectors_a: Tensor, vectors_g: Tensor | None = None) -> Tensor:
        """EKFAC's ``Σ_n (∇E_n Q_A)²`` (``[V, D]``; ``Q_G = I``): each sample's positions
        of one token summed before the square (``∇E_n``'s row ``v`` is
        ``Σ_{t: x_t = v} δ_tᵀ``), then added into the token's row."""
        del vectors_g  # G = diag(f): its eigenbasis is the identity
        rotated = self._gradients() @ vectors_a
        n, _, dim = rotated.shape
        sample = torch.arange(n, device=rotated.device)[:, None] * self.table_rows
        keys, inverse = torch.unique((sample + self.tokens).reshape(-1), return_inverse=True)
        per_row = rotated.new_zeros(len(keys), dim).index_add_(0, inverse, rotated.reshape(-1, dim))
        out = rotated.new_zeros(self.table_rows, dim)
        return out.index_add_(0, keys % self.table_rows, per_row.square())

    def sample_dots(self, vectors: Tensor) -> Tensor:
        """``⟨r_k, ∇E_n⟩ = Σ_t ⟨r_k[x_t], δ_t⟩``: the rows of the tokens, ``[N, K]``."""
        return torch.einsum("kntd,ntd->nk", vectors[:, self.tokens], self._gradients())

    def weighted_sum(self, weights: Tensor) -> Tensor:
        """``Σ_n w_n ∇E_n``: each position's ``w_n δ_t`` added to its token's row
        (``[V, D]``; ``[K, V, D]`` for ``weights`` ``[N, K]``)."""
        flat, grads = self.tokens.reshape(-1), self._gradients()
        if weights.dim() == 1:
            scaled = (grads * weights[:, None, None]).flatten(0, 1)
            return grads.new_zeros(self.table_rows, grads.shape[-1]).index_add_(0, flat, scaled)
        scaled = torch.einsum("nk,ntd->kntd", weights, grads).flatten(1, 2)
        out = self.g.new_zeros(weights.shape[1], self.table_rows, self.g.shape[-1])
        return out.index_add_(1, flat, scaled)

    def nicolaides_sums(self) -> tuple[Tensor, Tensor]:
        """``1ᵀδ`` (the ``A`` side) and ``1ᵀe = 1`` per position, ``[N, T, 1]`` each."""
        counted = torch.ones_like(self.a)
        if self.padding >= 0:
            counted[self.tokens == self.padding] = 0.0
        return self.g.sum(-1, keepdim=True), counted

    def numel(self) -> int:
        """``V·D``."""
        return self.table_rows * int(self.g.shape[-1])


def _check_ids(dtype: torch.dtype, rows: int) -> None:
    """Refuse a float dtype that cannot hold the ids of a ``rows``-row table exactly.

    Raises:
        ValueError: naming the factor dtype that would.
    """
    if rows > {torch.float32: 2**24, torch.float64: 2**53}.get(dtype, 0):
        raise ValueError(
            f"an embedding table of {rows} rows keeps its token ids in the factors' dtype, "
            f"and {dtype} cannot hold them exactly: pass factor_dtype="
            f"{'torch.float64' if rows > 2**24 else 'torch.float32'}"
        )


def _features(module: nn.Module, tokens: Tensor) -> Tensor:
    """Token ids as a float column ``[N, T, 1]`` for a large table, else one-hot rows."""
    assert isinstance(module, nn.Embedding)
    if not keeps_frequencies(module):
        return one_hot_rows(module, tokens)
    return tokens.reshape(tokens.shape[0], tokens.shape[1:].numel(), 1).to(torch.float64)


register_layer_type(
    nn.Embedding,
    _features,
    linear_features,
    embedding_reason,
    rows_from_inputs=True,
    statistics=TokenStats,
)
