"""Tselepidis et al. (2020)'s coarse matrix (coarse space ``tselepidis``, label PREVIOUS).

The Nicolaides basis (``r_i = 1`` on layer ``i``) with ``F_c`` built from cross-layer
Kronecker factors instead of the exact Fisher: ``F_c[i,j] = T_ij·⟨1, (A_ij ⊗ G_ij) 1⟩ +
λ·numel_i·δ_ij`` (:func:`tselepidis_coarse_matrix`), for every block type (blocks of their
own as sums of Kronecker sub-blocks).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.twolevel.fisher_products import check_stats

__all__ = [
    "sub_block_products",
    "tselepidis_coarse_matrix",
    "tselepidis_from_sums",
    "tselepidis_sums",
]


def _resample(sums: Tensor, num: int) -> Tensor:
    """``sums[:, m(t)]`` (``[N, T, …]`` → ``[N, num, …]``), ``m(t) = ⌊t·T/num⌋``, ``num ≥ T``."""
    t = sums.shape[1]
    if t == num:
        return sums
    return sums[:, torch.arange(num, device=sums.device) * t // num]


def tselepidis_coarse_matrix(
    stats: Sequence[LayerStats], damping: float, numels: Sequence[int] | None = None
) -> Tensor:
    """Tselepidis et al. (2020) coarse matrix for the Nicolaides basis, ``[L, L]``.

    ``F_c[i,j] = T_ij·sum(A_ij)·sum(G_ij) + λ·numel_i·δ_ij`` with the cross-layer
    Kronecker factors ``A_ij = E[ā_i ā_jᵀ]``, ``G_ij = E[δ_i δ_jᵀ]``, i.e.
    ``T_ij·⟨1, (A_ij ⊗ G_ij) 1⟩``. ``sum(A_ij)`` is computed from the per-(sample,
    location) sums ``s^a = 1ᵀā`` without forming ``A_ij``. Layers with different numbers of
    locations ``T_i ≠ T_j`` are matched by nearest-index resampling to
    ``T_ij = max(T_i, T_j)``, ``m_i(t) = ⌊t·T_i/T_ij⌋``:

        sum(A_ij) = (1/(N T_ij)) Σ_n Σ_t s^a_i[n, m_i(t)] s^a_j[n, m_j(t)]

    (``G_ij`` likewise; Tselepidis' code resamples conv locations too). The factor
    ``T_ij`` makes each entry KFC's expand view of ``1ᵀF_ij1`` (a sum over the matched
    locations, each pair independent): on the diagonal ``1ᵀ(T_i·A_i ⊗ G_i)1``, the block
    the fine level preconditions a layer of ``T_i`` locations with (a convolution, a
    sequence), as Tselepidis' code has it (kfac-pytorch's ``G`` of a convolution carries
    its spatial size). ``T = 1`` layers (an MLP) are unchanged. Before 2026-12-04 the
    factor was left out, so a layer of ``T`` locations entered ``F_c`` ``T`` times too
    small (a tiny conv net's steps 28 against KFAC's 7.6; 9.2 with it). (Tselepidis' gkfac
    re-adds a mirrored triangle at every inverse update; we build it symmetric.)

    Blocks of their own are direct sums of Kronecker sub-blocks
    (:meth:`~twolevel_kfac.curvature.blocks.LayerStats.nicolaides_sums`): a grouped
    convolution's groups (``ā_g``, ``δ_g``), a norm's units (``ā = [x̂_i, 1]``, ``δ_i``). Their
    Nicolaides vector is the sum of their sub-blocks' ones, so the matrix is the one above
    over the sub-blocks ``s``, summed over those of each layer:
    ``F_c[i,j] = Σ_{s∈i, s'∈j} T_ss'·sum(A_ss')·sum(G_ss') + λ·numel_i·δ_ij`` (for such a layer
    the diagonal also holds its sub-blocks' cross terms, which its fine block leaves out).
    The products are formed for a chunk of sub-blocks at a time and summed into ``[L, L]``
    at once (memory ``O(chunk·S)``, not ``O(S²)``: a norm layer brings one sub-block per
    unit); under ``torch.distributed`` the ``[S, S]`` sums are reduced instead
    (:func:`tselepidis_sums`).

    Args:
        stats: one :class:`LayerStats` per layer (the Fisher mini-batch).
        damping: ``λ``.
        numels: the coordinates of each layer's Nicolaides vector (``⟨1, λI 1⟩``; default:
            its ``W̄``'s entries; fewer where rows are left out of the coarse space).

    Returns:
        ``F_c`` of shape ``[L, L]``.
    """
    num_samples = check_stats(stats)
    fc = sub_block_products(stats) / num_samples**2
    return _damped(fc, stats, damping, numels)


def _groups(
    stats: Sequence[LayerStats],
) -> tuple[Tensor, Tensor, Tensor, Iterator[tuple[int, Tensor, Tensor, Tensor]]]:
    """An empty tensor of the sums' (promoted) dtype and device, the sub-blocks' layer
    (``owner``) and location count (``T_s``), ``[S]`` each, and per distinct location count
    ``t`` (one at a time): the sub-blocks with ``T ≤ t`` (``rows``) and their sums
    resampled to ``t`` as rows ``[S_t, N·t]`` (``s^a``, ``s^δ``; every layer's in the
    promoted dtype: a large token table's sums are float64 beside float32 layers)."""
    sums = [s.nicolaides_sums() for s in stats]  # ([N, T_i, S_i], [N, T_i, S_i])
    device = sums[0][0].device
    sizes = torch.tensor([a.shape[-1] for a, _ in sums], device=device)
    owner = torch.repeat_interleave(torch.arange(len(stats), device=device), sizes)
    counts = torch.tensor([s.num_locations for s in stats], device=device)[owner]
    dtype = functools.reduce(torch.promote_types, (a.dtype for a, _ in sums))

    def groups() -> Iterator[tuple[int, Tensor, Tensor, Tensor]]:
        for t in sorted({s.num_locations for s in stats}):
            members = [i for i, s in enumerate(stats) if s.num_locations <= t]
            rows = torch.nonzero(counts <= t).squeeze(1)
            # [N, T, S_i] → resampled [N, t, S_i] → rows [S_i, N·t]
            a, g = (
                torch.cat([_resample(sums[i][side], t).flatten(0, 1).T.to(dtype) for i in members])
                for side in (0, 1)
            )
            yield t, rows, a, g

    return sums[0][0].new_empty(0, dtype=dtype), owner, counts, groups()


def sub_block_products(stats: Sequence[LayerStats], chunk: int = 1024) -> Tensor:
    """``Σ_{s∈i, s'∈j} sum_a[s,s']·sum_g[s,s'] / T_ss'`` (``[L, L]``; the sums of
    :func:`tselepidis_sums`): ``N²`` times the cross-layer term of ``F_c``, without the
    ``[S, S]`` sums (``chunk`` sub-blocks at a time, folded onto the layers by products
    with their one-hot owner matrices: deterministic, unlike an accumulating scatter)."""
    like, owner, counts, groups = _groups(stats)
    layers = torch.arange(len(stats), device=owner.device)
    fc = like.new_zeros(len(stats), len(stats))
    for t, rows, a, g in groups:
        fold_rows = (owner[rows][None, :] == layers[:, None]).to(a.dtype)  # [L, S_t]
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            pairs = torch.maximum(counts[part][:, None], counts[rows][None, :]) == t
            a_part, g_part = a[start : start + chunk], g[start : start + chunk]
            products = torch.where(pairs, (a_part @ a.T) * (g_part @ g.T), 0.0) / t
            fc += fold_rows[:, start : start + chunk] @ products @ fold_rows.T
    return fc


def tselepidis_sums(stats: Sequence[LayerStats]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sample sums behind :func:`tselepidis_coarse_matrix`, ``[S, S]`` each over the
    ``S = Σ_i S_i`` sub-blocks (one per Kronecker layer): ``Σ_n Σ_t s^a_s[n, m_s(t)]
    s^a_s'[n, m_s'(t)]``, the same for ``s^δ``, ``T_ss'``, and the layer of each sub-block
    (``[S]``). They add over disjoint sample sets: what a distributed reduction needs
    (one process forms the products directly: :func:`sub_block_products`).

    One Gram matrix per distinct location count ``t`` instead of a loop over the pairs:
    the sub-blocks with ``T ≤ t``, resampled to ``t``, are the rows of ``[S_t, N·t]``
    matrices whose Gram gives every pair with ``T_ss' = t`` (a 64-layer network at
    ``T = 1`` spent 0.1 s a refresh in the loop). Cost ``O(S_t² N t)`` and memory
    ``O(S²)``: a norm layer brings one row per unit.

    Args:
        stats: one :class:`LayerStats` per layer (the Fisher mini-batch).

    Returns:
        ``(sum_a, sum_g, locations, owner)``: the two ``[S, S]`` sums, ``T_ss'`` and the
        layer index of each sub-block.
    """
    like, owner, counts, groups = _groups(stats)
    pair_counts = torch.maximum(counts[:, None], counts[None, :])
    sum_a, sum_g = (like.new_zeros(len(owner), len(owner)) for _ in range(2))
    for t, rows, a, g in groups:
        block = (rows[:, None], rows[None, :])
        pairs = pair_counts[block] == t
        for x, total in ((a, sum_a), (g, sum_g)):
            total[block] = torch.where(pairs, x @ x.T, total[block])
    return sum_a, sum_g, pair_counts.to(sum_a.dtype), owner


def tselepidis_from_sums(
    sum_a: Tensor,
    sum_g: Tensor,
    locations: Tensor,
    owner: Tensor,
    num_samples: int,
    stats: Sequence[LayerStats],
    damping: float,
    numels: Sequence[int] | None = None,
) -> Tensor:
    """``F_c = Σ_{s∈i,s'∈j} T_ss'·sum(A_ss')·sum(G_ss') + λ·numel_i·δ_ij`` (``[L, L]``)
    from :func:`tselepidis_sums` of ``num_samples`` samples (``stats`` gives the layers;
    ``numels`` as :func:`tselepidis_coarse_matrix`)."""
    fc = sum_a * sum_g / (num_samples**2 * locations)
    if len(stats) != len(owner):  # sub-blocks: sum each layer's rows and columns
        fold = torch.zeros(len(stats), len(owner), dtype=fc.dtype, device=fc.device)
        fold[owner, torch.arange(len(owner), device=fc.device)] = 1.0
        fc = fold @ fc @ fold.T
    return _damped(fc, stats, damping, numels)


def _damped(
    fc: Tensor, stats: Sequence[LayerStats], damping: float, numels: Sequence[int] | None
) -> Tensor:
    """``fc + λ·numel_i·δ_ij``."""
    counts = [s.numel() for s in stats] if numels is None else list(numels)
    return fc + damping * torch.diag(fc.new_tensor(counts))
