"""The fine level ``M⁻¹`` of a preconditioner: a block-diagonal inverse, one block per layer.

A :class:`FineLevel` is held by a preconditioner (composition: ``KFACPreconditioner(model,
fine="ekfac")``, and so ``TwoLevelKFAC(model, fine="ekfac")``); the coarse level only ever
calls :meth:`FineLevel.apply`, so every coarse space and combination works with every fine
level. Its life cycle, driven by the preconditioner's ``step()``:

1. :meth:`FineLevel.store` folds one layer's Kronecker factors of the Fisher mini-batch
   into the running ones (every ``cov_interval`` steps; KPSVD fits other factors there);
2. :meth:`FineLevel.refresh` decomposes the factors (every ``inv_interval`` steps);
3. :meth:`FineLevel.after_refresh` folds statistics that live in the new eigenbasis
   (EKFAC's scalings);
4. :meth:`FineLevel.apply` applies the damped inverse to a layer's ``W̄`` matrix, with λ
   given at the call (it may follow a schedule); :meth:`FineLevel.dense_inverse` is its
   dense form, for oracles and the analysis.

This class is KFAC's fine level, ``(damped A ⊗ G)⁻¹`` divided by ``T``
(:mod:`twolevel_kfac.curvature.kronecker`); :mod:`.ekfac` and :mod:`.kpsvd` extend it.
The factors themselves belong to the preconditioner (they are its curvature statistics);
a fine level reads them, and what else it needs, through :class:`FineContext`.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import torch
from torch import Tensor

from ..curvature.blocks import LayerStats
from ..curvature.kronecker import KroneckerFactors
from ..curvature.kronecker_apply import LayerParts, apply_on_parts
from ..curvature.token_factors import TokenFactors
from ..distributed import share_decompositions

if TYPE_CHECKING:
    from ..distributed import Communicator
    from .options import CurvatureOptions

__all__ = ["FOLD_DECOMPOSED", "FineContext", "FineLevel", "OuterApplied"]

FOLD_DECOMPOSED = (KroneckerFactors, TokenFactors)
"""The factor types :meth:`FineLevel.refresh_layer` decomposes at their fold."""

OuterApplied = Tensor | tuple[Tensor, Tensor]
"""``M_i⁻¹(u vᵀ)``: the matrix, or for a Kronecker inverse ``(G⁻¹u, A⁻¹v)``, the pair of
vectors whose outer product it is."""


class FineContext(Protocol):
    """What a fine level reads from the preconditioner that holds it."""

    options: CurvatureOptions
    comm: Communicator
    factors: dict[str, KroneckerFactors]
    last_stats: dict[str, float]
    steps: int

    def factor_dtype(self, name: str) -> torch.dtype:
        """The dtype of layer ``name``'s factors."""
        ...

    def sample_count(self, name: str, stats: LayerStats) -> int:
        """``N`` of this step's Fisher mini-batch for layer ``name`` (all ranks)."""
        ...

    def placed(self, name: str, tree: Any, dtype: torch.dtype | None = None) -> Any:
        """Saved state of layer ``name`` on that layer's device (floating tensors in
        ``dtype``)."""
        ...


class FineLevel:
    """KFAC's fine level: the damped Kronecker-factored inverse of each layer's block.

    Args:
        host: the preconditioner holding it (:class:`FineContext`).
        **arguments: the fine level's own arguments (:attr:`extra_arguments`; none here).
    """

    name: ClassVar[str] = "kfac"
    extra_arguments: ClassVar[frozenset[str]] = frozenset()
    """Constructor arguments beyond the curvature options (KPSVD's power iteration)."""
    needs_eigenbasis: ClassVar[bool] = False
    """Whether it works in the factors' eigenbasis (``inverse_method="auto"`` then picks
    ``eigen``)."""
    diagonal_tables: ClassVar[bool] = True
    """Whether an untied embedding table's block may keep its token factor as the vector of
    frequencies (:mod:`~twolevel_kfac.curvature.token_form`): where it only inverts ``G``."""
    state_entry: ClassVar[str | None] = None
    """The top-level entry of the preconditioner's state that :meth:`state_dict` adds and
    :meth:`load_state_dict` needs (KFAC adds none)."""

    def __init__(self, host: FineContext, **arguments: Any) -> None:
        if arguments:
            raise TypeError(f"fine level {self.name!r} takes no arguments; got {sorted(arguments)}")
        # weakly: the preconditioner holds its levels, so a dropped optimizer is freed at
        # once (with its hooks) instead of waiting for the cycle collector
        self.host: FineContext = cast("FineContext", weakref.proxy(host))
        # the factors (A, its version, G, its version) each layer was decomposed of at
        # this step's fold (refresh_layer), which the refresh then leaves alone
        self._at_fold: dict[str, tuple[Tensor, int, Tensor, int]] = {}

    @property
    def plain(self) -> bool:
        """Whether this is KFAC itself (the preconditioner's fast paths apply)."""
        return type(self) is FineLevel

    # ------------------------------------------------------------------ statistics
    def store(
        self, name: str, new_a: Tensor, new_g: Tensor, locations: float, stats: LayerStats
    ) -> bool:
        """Fold one layer's (finite) factors of this Fisher mini-batch into the running ones
        (and decompose them at once where :meth:`decomposes_at_fold`).

        Returns:
            Whether the update was stored (``False``: it was not finite and was dropped).
        """
        factors, decay = self.host.factors[name], self.host.options.ema_decay
        if type(factors) in FOLD_DECOMPOSED and self.decomposes_at_fold():
            factors.update(new_a, new_g, decay, locations, replacing=True)
            self.refresh_layer(name)  # replaces the frozen factors the update wrote over
        else:
            factors.update(new_a, new_g, decay, locations)
        return True

    def decomposes_at_fold(self) -> bool:
        """Whether this step decomposes each layer's factors (:data:`FOLD_DECOMPOSED`) as
        soon as its fold has updated them (:meth:`refresh_layer`), not all at the refresh:
        KFAC's own fine level in one process, at a step that refreshes (``steps %
        inv_interval == 0``). The same decompositions; a layer's old frozen factors and their damped
        inverses are then dropped at once, not held beside every other layer's new
        factors until the fold ends (the peak of a refresh step)."""
        host = self.host
        return (
            self.plain and not host.comm.distributed and host.steps % host.options.inv_interval == 0
        )

    def refresh_layer(self, name: str) -> None:
        """Decompose layer ``name``'s (ready, :data:`FOLD_DECOMPOSED`) factors now, as this
        step's :meth:`refresh` would; it leaves them alone then (nothing is done twice while
        the factors stay the tensors decomposed, unwritten)."""
        factors = self.host.factors[name]
        if self._decomposed_at_fold(name, factors):
            return
        factors.decompose(self.host.options.inverse_method)
        a, g = _fold_tensors(factors)
        self._at_fold[name] = (a, a._version, g, g._version)

    def _decomposed_at_fold(self, name: str, factors: KroneckerFactors) -> bool:
        """Whether :meth:`refresh_layer` decomposed these very factors (same tensors and
        versions: a later fold, or a loaded state, replaces or writes them)."""
        held = self._at_fold.get(name)
        if held is None:
            return False
        a, g = _fold_tensors(factors)
        return held[0] is a and held[1] == a._version and held[2] is g and held[3] == g._version

    def refresh(self, damping: float) -> None:
        """Decompose every layer's running factors (shared across the ranks as configured),
        but those :meth:`refresh_layer` decomposed at this step's fold."""
        host, opts = self.host, self.host.options
        ready = {
            name: f
            for name, f in host.factors.items()
            if f.ready and not self._decomposed_at_fold(name, f)
        }
        self._at_fold.clear()
        if host.comm.distributed and opts.distributed_inverses == "split":
            # blocks of their own (norms, grouped convolutions) are decomposed by every rank
            kronecker = {n: f for n, f in ready.items() if type(f) is KroneckerFactors}
            share_decompositions(
                host.comm, kronecker, opts.inverse_method, damping, opts.damping_mode
            )
            ready = {n: f for n, f in ready.items() if n not in kronecker}
        for factors in ready.values():
            factors.decompose(opts.inverse_method)

    def after_refresh(self, stats: dict[str, LayerStats]) -> None:
        """Fold the statistics that live in the decompositions' eigenbasis (none for KFAC)."""

    def stateless(self, steps: int) -> bool:
        """Whether a step without statistics leaves no state behind (its inverses are
        rebuilt the same way from the kept decompositions)."""
        return True

    # ------------------------------------------------------------------ the inverse
    def apply(self, name: str, matrix: Tensor, damping: float) -> Tensor:
        """``M_i⁻¹`` of layer ``name`` applied to a ``(d_out, d_in')`` matrix."""
        opts = self.host.options
        return self.host.factors[name].apply_inverse(
            matrix, damping, opts.damping_mode, opts.inverse_method
        )

    def apply_split(
        self,
        name: str,
        weight: Tensor,
        bias: Tensor | None,
        damping: float,
        out: LayerParts | None = None,
    ) -> LayerParts:
        """:meth:`apply` on ``W̄ = [weight, bias]`` given as its parts, into fresh tensors or
        ``out`` (which may be the parts themselves): KFAC's products read and write the
        parts directly; other fine levels join the matrix and split the result."""
        opts = self.host.options
        if self.plain:
            return self.host.factors[name].apply_inverse_split(
                weight, bias, damping, opts.damping_mode, opts.inverse_method, out
            )
        return apply_on_parts(lambda m: self.apply(name, m, damping), weight, bias, out)

    def apply_outer(self, name: str, left: Tensor, right: Tensor, damping: float) -> OuterApplied:
        """:meth:`apply` of the rank-one matrix ``left rightᵀ``: the matrix, or for a
        Kronecker inverse the pair of vectors whose outer product it is (two mat-vecs)."""
        if not self.plain:
            return self.apply(name, torch.outer(left, right), damping)
        opts = self.host.options
        return self.host.factors[name].apply_inverse_outer(
            left, right, damping, opts.damping_mode, opts.inverse_method
        )

    def dense_inverse(self, name: str, damping: float) -> Tensor:
        """``M_i⁻¹`` of layer ``name`` as a dense ``(P_i, P_i)`` matrix in the row-major
        coordinates of ``W̄`` (column ``k`` is ``M_i⁻¹`` of the ``k``-th unit matrix): for
        oracles and the analysis on small layers (``P_i²`` numbers)."""
        a, g = _fold_tensors(self.host.factors[name])  # (a table's G: the vector f)
        d_out, d_in = g.shape[0], a.shape[0]
        units = torch.eye(d_out * d_in, dtype=a.dtype, device=a.device)
        columns = [self.apply(name, e.reshape(d_out, d_in), damping).reshape(-1) for e in units]
        return torch.stack(columns, dim=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The fine level's own state, as extra top-level entries of the preconditioner's
        (KFAC has none beyond the factors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s entries from the preconditioner's state."""


def _fold_tensors(factors: KroneckerFactors | TokenFactors) -> tuple[Tensor, Tensor]:
    """The running tensors a layer's decomposition is made of: ``A`` and ``G``, a table's
    ``A`` and ``f`` (:mod:`~twolevel_kfac.curvature.tokens`)."""
    a, g = (
        (factors.a_factor, factors.frequencies)
        if isinstance(factors, TokenFactors)
        else (factors.A, factors.G)
    )
    assert a is not None and g is not None
    return a, g
