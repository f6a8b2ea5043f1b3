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
memory (the running factors: :mod:`.token_factors`). The damped inverse on ``X``
(``[V, D]``) is, for a factored damping (``s_G``,
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
from .layer_types import (
    embedding_reason,
    linear_features,
    one_hot_rows,
    register_layer_type,
)
from .live_positions import live_count
from .token_factors import TokenFactors
from .token_form import keeps_frequencies

__all__ = ["TokenFactors", "TokenStats"]


@dataclass
class TokenStats(BlockStats):
    """``a``: the token ids as a float column ``[N, T, 1]``; ``g``: the output gradients
    ``δ`` ``[N, T, D]``; ``table_rows``: ``V`` (module docstring)."""

    factors_type: ClassVar[Callable[[], Any]] = TokenFactors
    exact_inputs: ClassVar[bool] = True  # the ids stay float64 in a half-precision model
    dead_rows: ClassVar[bool] = True
    table_rows: int = 0

    @classmethod
    def of(cls, module: nn.Module, a: Tensor, g: Tensor) -> TokenStats:
        """The statistics of a large table.

        Raises:
            ValueError: token ids in a floating type too narrow to hold them exactly
                (``factor_dtype`` float16 / bfloat16).
        """
        rows = int(layer_weight(module).shape[0])
        _check_ids(a.dtype, rows)
        return cls(a, g, rows)

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
        """The token ids, ``[N, T]`` (int64; a padding position's: any row, its ``δ`` is
        zero in :meth:`_gradients`)."""
        _check_ids(self.a.dtype, self.table_rows)
        ids = self.a[..., 0].long()
        return ids.clamp_max(self.table_rows - 1) if self.padding else ids

    @property
    def padding(self) -> bool:
        """Whether some position holds a call's ``padding_idx`` (read from the ids each time:
        statistics joined from other ranks' carry theirs, ``dataclasses.replace``)."""
        return bool(self.padded.any())

    @property
    def padded(self) -> Tensor:
        """The positions of a call's ``padding_idx`` (``[N, T]``, bool): :func:`_features`
        gave them the id ``table_rows``, per call (tables sharing a weight may pad with
        different tokens, or one not at all: one ``padding_idx`` for the block was 0.12–0.71
        off in a review, before 2026-12-09)."""
        return self.a[..., 0] == self.table_rows

    def _gradients(self) -> Tensor:
        """``δ`` of the positions that give the table a gradient (padding ones zero)."""
        if not self.padding:
            return self.g
        return self.g.masked_fill(self.padded.unsqueeze(-1), 0.0)

    def block_factors(self) -> tuple[Tensor, Tensor]:
        """``A = Σ_{n,t} δ δᵀ / (N T)`` and ``f_v``: the share of the ``N·T`` positions
        holding token ``v`` (the positions that are not ``dead``: :mod:`.live_positions`)."""
        _check_ids(self.a.dtype, self.table_rows)
        rows, tokens = self.g.flatten(0, 1), self.a[..., 0].long().reshape(-1)
        if self.dead is not None:
            keep = ~self.dead.reshape(-1)
            rows, tokens = rows[keep], tokens[keep]
        count = max(int(rows.shape[0]), 1)
        # (padding positions, id table_rows, counted apart: the dense path's zero one-hot row)
        counts = torch.bincount(tokens, minlength=self.table_rows + 1)[: self.table_rows]
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
        if self.padding:
            counted[self.padded] = 0.0
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
    ids = tokens.reshape(tokens.shape[0], tokens.shape[1:].numel(), 1).to(torch.float64)
    if module.padding_idx is None:
        return ids
    return ids.masked_fill(ids == module.padding_idx, float(module.num_embeddings))


register_layer_type(
    nn.Embedding,
    _features,
    linear_features,
    embedding_reason,
    rows_from_inputs=True,
    statistics=TokenStats,
)
