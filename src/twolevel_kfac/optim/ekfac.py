"""EKFAC: KFAC's eigenbasis with per-coordinate second moments (George et al. 2018).

With ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ`` the running KFAC factors
(eigendecompositions frozen at the last refresh, as for KFAC), the scalings are the second
moments of the per-sample gradients in that basis (George et al. eq. (9)),

    S = (1/N) Σ_n (Q_Gᵀ ∇_W̄ℓ_n Q_A)²,        ∇_W̄ℓ_n = Σ_t δ_{n,t} ā_{n,t}ᵀ,

over the Fisher mini-batch (same ``N`` and scale as the Fisher ``F = (1/N) Σ_n ∇ℓ_n∇ℓ_nᵀ``;
for a convolution the per-sample gradient sums the ``T`` locations), so without damping
``(Q_A ⊗ Q_G) diag(S) (Q_A ⊗ Q_G)ᵀ`` is the diagonal of the layer's exact Fisher block in
KFAC's eigenbasis. The update is (George et al. Algorithm 1)

    d = Q_G [(Q_Gᵀ ∇W̄ Q_A) ⊘ D] Q_Aᵀ,        D = S + T·(K − d_G d_Aᵀ),

where ``K`` is KFAC's damped eigenvalue grid of the same ``damping_mode``
(:func:`~twolevel_kfac.curvature.kronecker.eigen_denominator`): EKFAC's block is KFAC's
damped block ``T·K`` with its undamped Kronecker eigenvalues ``T·d_G d_Aᵀ`` replaced by ``S``.
For ``eigen_sum`` (and ``T = 1``) that is George et al.'s ``D = S + λ``; ``per_factor`` adds
``λ(d_G + d_A) + λ²``, ``pi`` the π-scaled analogue. For convolutions the damping is ``T``
times KFAC's, as KFAC's own convention (result divided by ``T``) has it.

Running average: ``S ← ρS + (1 − ρ)S_new`` with ``ρ = min(1 − 1/k, ema_decay)``. When the
eigenbasis is refreshed, the running ``S`` is first carried into the new basis as the
diagonal of the previous EKFAC matrix there,
``S ← (P_G∘P_G) S (P_A∘P_A)ᵀ``, ``P = Q_newᵀQ_old``
(:func:`~twolevel_kfac.curvature.persample.eigenbasis_diagonal_transport`); the new
mini-batch's ``S_new`` is computed in the new basis. Both are averaged over the
coordinates of each repeated eigenvalue of ``A`` or ``G``
(:func:`~twolevel_kfac.curvature.eigen_cluster.cluster_mean`): ``eigh``'s basis of such
an eigenspace is a pick of the rounding, which the mean does not see.

Under ``torch.distributed`` the sums ``Σ_n (…)²`` are all-reduced and divided by the global
``N``, like the factors.

A block that is a direct sum of Kronecker blocks (a grouped convolution: one ``A_g ⊗ G_g``
per group, :class:`StackedEigenbasis`) gets the same per group, its bases, ``S`` and grids
stacked ``[G, ·, ·]``. A large embedding table (``G = diag(f)``, :class:`TableEigenbasis`)
has ``Q_G = I``: ``S`` is ``[V, D]``, carried into a new basis by ``S (P_A∘P_A)ᵀ``. A norm's
unit-wise block is exact already and keeps its own inverse.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..curvature.blocks import BlockStats, LayerStats
from ..curvature.eigen_cluster import cluster_mean
from ..curvature.factor_inverse import solver_dtype
from ..curvature.kronecker import eigen_denominator
from ..curvature.kronecker_apply import apply_in_eigenbasis
from ..curvature.persample import eigenbasis_diagonal_transport, rotated_second_moments
from ..curvature.running_average import ema_weight, running_average
from ..curvature.token_factors import TokenFactors
from ..distributed import all_reduce_sum
from .fine import FineContext, FineLevel
from .kfac import KFAC
from .preconditioner import KFACPreconditioner


@runtime_checkable
class StackedEigenbasis(Protocol):
    """Factors of a direct sum of Kronecker blocks that give their eigenbases stacked
    (:class:`~twolevel_kfac.curvature.convolutions.GroupedFactors`)."""

    @property
    def num_locations(self) -> int:
        """``T`` of the last statistics."""
        ...

    def stacked_eigenbasis(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """``(d_A, Q_A, d_G, Q_G)`` of every block, stacked (``None``: not decomposed)."""
        ...

    def stacked_denominator(self, damping: float, mode: str) -> Tensor:
        """KFAC's damped eigenvalue grid of every block, stacked."""
        ...


@runtime_checkable
class TableEigenbasis(Protocol):
    """Factors ``diag(f) ⊗ A`` of a large embedding table that give ``(f, d_A, Q_A)``
    (:class:`~twolevel_kfac.curvature.token_factors.TokenFactors`)."""

    num_locations: int
    decomp_pi: float

    def table_eigenbasis(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(f, d_A, Q_A)`` (``None``: ``A`` not eigendecomposed)."""
        ...


Bases = tuple[Tensor, Tensor, Tensor | None, Tensor | None]
"""``(d_A, Q_A, d_G, Q_G)`` of a layer (``d_G, Q_G = None``: the identity basis of a
table's diagonal ``G``)."""


Prepared = tuple[Tensor | None, Tensor, Tensor]
"""``(Q_G, 1/D, Q_A)`` of a layer (``Q_G = None``: the identity)."""


class EKFACFine(FineLevel):
    """EKFAC's fine level (see the module docstring).

    Raises:
        ValueError: for ``inverse_method="cholesky"`` (it works in the factors' eigenbasis).
    """

    name = "ekfac"
    state_entry = "scalings"
    needs_eigenbasis = True

    def __init__(self, host: FineContext, **arguments: Any) -> None:
        super().__init__(host, **arguments)
        if host.options.inverse_method != "eigen":
            raise ValueError(
                "EKFAC needs inverse_method='eigen' (it works in the factors' eigenbasis); "
                f"got {host.options.inverse_method!r}"
            )
        self.scalings: dict[str, Tensor] = {}
        self.scaling_updates: dict[str, int] = {}
        self._scaling_cache: dict[str, tuple[tuple[float, str], Prepared]] = {}

    def _bases(self) -> dict[str, Bases]:
        """``(d_A, Q_A, d_G, Q_G)`` of every layer whose factors have been decomposed."""
        out: dict[str, Bases] = {}
        for name, factors in self.host.factors.items():
            if isinstance(factors, StackedEigenbasis):  # [G, ·, ·] each
                stacked = factors.stacked_eigenbasis()
                if stacked is not None:
                    out[name] = stacked
            elif isinstance(factors, TableEigenbasis):
                table = factors.table_eigenbasis()
                if table is not None:
                    out[name] = (table[1], table[2], None, None)
            elif factors.decomp_a is not None and factors.decomp_g is not None:
                out[name] = (*factors.decomp_a, *factors.decomp_g)
        return out

    @staticmethod
    def _invariant(scalings: Tensor, bases: Bases) -> Tensor:
        """``S`` with its entries of each repeated eigenvalue of ``A`` or ``G`` replaced by
        their mean (:func:`~twolevel_kfac.curvature.eigen_cluster.cluster_mean`): ``eigh``
        picks the basis of such an eigenspace (a rank-deficient factor's null space) by
        the rounding, and ``S`` re-estimated in it between refreshes, or carried into it,
        would depend on that pick (the same batches in another sample order: steps 0.9
        apart on a move of 2.4); the mean is the same for every pick."""
        values_a, vectors_a, values_g, vectors_g = bases
        dtype = solver_dtype(values_a.dtype)  # the factor's rounding sets a cluster's spread
        scalings = cluster_mean(scalings, values_a, vectors_a, -1, dtype)
        if values_g is None or vectors_g is None:  # a table's G = diag(f): Q_G = I, no pick
            return scalings
        return cluster_mean(scalings, values_g, vectors_g, -2, dtype)

    def refresh(self, damping: float) -> None:
        """KFAC's refresh, the running ``S`` carried into the new eigenbasis."""
        old = self._bases()
        super().refresh(damping)
        new = self._bases()
        for name, scalings in self.scalings.items():
            if name in old and name in new:
                (_, old_a, _, old_g), (_, new_a, _, new_g) = old[name], new[name]
                if old_g is None or new_g is None:  # Q_G = I: the A side alone
                    carried = scalings @ (new_a.mT @ old_a).square().mT
                else:
                    carried = eigenbasis_diagonal_transport(
                        scalings, (old_a, old_g), (new_a, new_g)
                    )
                self.scalings[name] = self._invariant(carried, new[name])
        self._scaling_cache.clear()

    def stateless(self, steps: int) -> bool:
        """A decomposition refresh carries the scalings into the new eigenbasis (state)."""
        return steps % self.host.options.inv_interval != 0

    def after_refresh(self, stats: dict[str, LayerStats]) -> None:
        """``S ← ρS + (1 − ρ)S_new`` with ``S_new`` of this mini-batch in the current basis."""
        host = self.host
        bases = self._bases()
        names = [n for n in stats if n in bases]
        sums = []
        for name in names:
            dtype, layer = host.factor_dtype(name), stats[name]
            _, vectors_a, _, vectors_g = bases[name]
            if isinstance(layer, BlockStats):  # a block of its own: its own moments
                exact = type(layer).exact_inputs  # a table's token ids stay as captured
                a = layer.a if exact else layer.a.to(dtype)
                own = replace(layer, a=a, g=layer.g.to(dtype))
                sums.append(own.rotated_second_moments(vectors_a, vectors_g))
                continue
            assert vectors_g is not None
            cast = LayerStats(layer.a.to(dtype), layer.g.to(dtype))
            sums.append(rotated_second_moments(cast, vectors_a, vectors_g))
        if host.comm.distributed:
            sums = all_reduce_sum(host.comm, sums)
        skipped = 0
        for name, total in zip(names, sums, strict=True):
            new = self._invariant(total / host.sample_count(name, stats[name]), bases[name])
            if not torch.isfinite(new).all():
                skipped += 1
                continue
            count = self.scaling_updates.get(name, 0) + 1
            self.scaling_updates[name] = count
            rho = ema_weight(count, host.options.ema_decay)
            self.scalings[name] = running_average(self.scalings.get(name), new, rho)
            self._scaling_cache.pop(name, None)
        host.last_stats["nonfinite_scaling_updates"] = float(skipped)

    def apply(self, name: str, matrix: Tensor, damping: float) -> Tensor:
        """``Q_G [(Q_Gᵀ V Q_A) ⊘ D] Q_Aᵀ`` (module docstring); KFAC's until ``S`` exists."""
        if name not in self.scalings:
            return super().apply(name, matrix, damping)
        vectors_g, inverse, vectors_a = self._prepare_scalings(name, damping)
        if vectors_g is None:  # a table: Q_G = I
            x = matrix.to(inverse.dtype)
            return (((x @ vectors_a) * inverse) @ vectors_a.mT).to(matrix.dtype)
        if vectors_g.dim() == 2:
            return apply_in_eigenbasis(vectors_g, inverse, vectors_a, matrix)
        # one block per group: its rows of W̄, the same product batched over the groups
        v = matrix.to(inverse.dtype).reshape(vectors_g.shape[0], -1, matrix.shape[1])
        rotated = (vectors_g.mT @ v @ vectors_a).mul_(inverse)
        return (vectors_g @ rotated @ vectors_a.mT).reshape(matrix.shape).to(matrix.dtype)

    def _prepare_scalings(self, name: str, damping: float) -> Prepared:
        key = (damping, self.host.options.damping_mode)
        cached = self._scaling_cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        factors = self.host.factors[name]
        vectors_g: Tensor | None
        if isinstance(factors, TableEigenbasis):
            table = factors.table_eigenbasis()
            assert table is not None
            values_g, values_a, vectors_a = table  # values_g: the frequencies f
            vectors_g = None
            grid = eigen_denominator(values_g, values_a, *key, factors.decomp_pi)
            increment = grid - torch.outer(values_g, values_a)
        elif isinstance(factors, StackedEigenbasis):
            stacked = factors.stacked_eigenbasis()
            assert stacked is not None
            values_a, vectors_a, values_g, vectors_g = stacked
            grid = factors.stacked_denominator(*key)
            increment = grid - values_g.unsqueeze(-1) * values_a.unsqueeze(-2)
        else:
            assert factors.decomp_a is not None and factors.decomp_g is not None
            (values_a, vectors_a), (values_g, vectors_g) = factors.decomp_a, factors.decomp_g
            grid = eigen_denominator(values_g, values_a, *key, factors.decomp_pi)
            increment = grid - torch.outer(values_g, values_a)
        denominator = self.scalings[name] + factors.num_locations * increment
        prepared = (vectors_g, denominator.reciprocal(), vectors_a)
        self._scaling_cache[name] = (key, prepared)
        return prepared

    def state_dict(self) -> dict[str, Any]:
        """``{"scalings": {"S": …, "updates": …}}``."""
        return {"scalings": {"S": dict(self.scalings), "updates": dict(self.scaling_updates)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entry.

        Raises:
            ValueError: if the state has no ``"scalings"`` entry.
        """
        if "scalings" not in state:
            raise ValueError("not an EKFAC state: no 'scalings' entry")
        saved = state.get("factors", {})
        self.scalings = {
            n: self.host.placed(n, _token_rows(n, s, saved.get(n), self.host.factors.get(n)))
            for n, s in state["scalings"]["S"].items()
        }
        self.scaling_updates = {k: int(v) for k, v in state["scalings"]["updates"].items()}
        self._scaling_cache.clear()


def _token_rows(name: str, scalings: Tensor, saved: Any, factors: Any) -> Tensor:
    """A table's scalings ``[V, D]`` in token order where they were saved in the dense
    form's eigenbasis of ``G = diag(f)`` (a permutation of the tokens, ``eigh``'s order)
    and load into the vector form (:mod:`~twolevel_kfac.curvature.token_form`): read row
    by row, they took other tokens' scalings (1 % off a step, before 2026-12-09).

    Raises:
        ValueError: the saved eigenbasis is not a permutation of the tokens.
    """
    if not isinstance(factors, TokenFactors) or not isinstance(saved, dict) or "G" not in saved:
        return scalings
    vectors = saved["decomp_g"][1] if saved.get("decomp_g") is not None else None
    if vectors is None or vectors.numel() == 0 or not bool((vectors.abs().amax(0) == 1).all()):
        raise ValueError(
            f"layer {name!r}: its EKFAC scalings were saved in an eigenbasis of its token "
            "factor that is not the tokens' own (a table tied to a head, or a Cholesky "
            "state): load the checkpoint into an optimizer of the options that saved it"
        )
    rows = torch.empty_like(scalings)
    rows[vectors.abs().argmax(dim=0)] = scalings
    return rows


class EKFACPreconditioner(KFACPreconditioner):
    """The KFAC preconditioner with EKFAC's fine level (:class:`EKFACFine`)."""

    fine_level = EKFACFine


class EKFAC(KFAC):
    """EKFAC with momentum SGD: every :class:`KFAC` argument (``inverse_method`` ``auto`` or
    ``eigen``); the fine step is :class:`EKFACPreconditioner`'s."""

    preconditioner_class = EKFACPreconditioner
