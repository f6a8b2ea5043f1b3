"""Exact Fisher–vector products on the Fisher mini-batch, without per-sample gradients.

The Fisher of a mini-batch of ``N`` samples (README: "Conventions") is
``F = (1/N) Σ_n vec(∇ℓ_n) vec(∇ℓ_n)ᵀ`` over *all* preconditioned layers, including the
inter-layer blocks that KFAC drops. With ``∇_iℓ_n = Σ_t δ_{i,n,t} ā_{i,n,t}ᵀ`` (layer ``i``,
sample ``n``, location ``t``) its product with a layer vector ``v`` is (Koroko et al. 2023, §2)

    c_n = Σ_j ⟨∇_jℓ_n, v_j⟩ = Σ_j Σ_t δ_{j,n,t}ᵀ v_j ā_{j,n,t},
    (F v)_i = (1/N) Σ_n c_n ∇_iℓ_n = (1/N) Σ_{n,t} c_n δ_{i,n,t} ā_{i,n,t}ᵀ,

which costs ``O(N·T·d_out·d_in')`` per layer and never forms ``∇ℓ_n`` nor a ``(N·T)²``
matrix. (The authors' conv FVP pairs samples and locations wrongly — ``repeat`` instead
of ``repeat_interleave`` — a defect we do not reproduce.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from twolevel_kfac.curvature.blocks import LayerStats
from twolevel_kfac.curvature.sample_products import (
    per_sample_dots,
    per_sample_dots_parts,
    weighted_gradient_sum,
)
from twolevel_kfac.twolevel.vectors import LayerVector, Parts

DISAGREE_HINT = (
    " (the two-level coarse level couples the layers sample by sample, so every layer "
    "must see every sample of the Fisher mini-batch: a layer applied to some rows only, "
    "or to rows that are not samples, needs KFAC without a coarse level)"
)


def check_stats(stats: Sequence[LayerStats], num_layers: int | None = None) -> int:
    """Validate per-layer statistics of one Fisher mini-batch and return its size ``N``.

    Args:
        stats: one :class:`LayerStats` per preconditioned layer.
        num_layers: the number of layers the caller's vectors have, if any.

    Returns:
        The number of samples ``N`` shared by all layers.

    Raises:
        ValueError: if ``stats`` is empty, the layers disagree on ``N``, or the number of
            layers differs from ``num_layers``.
    """
    if not stats:
        raise ValueError("stats must hold at least one layer")
    if num_layers is not None and len(stats) != num_layers:
        raise ValueError(f"stats has {len(stats)} layers but the vector has {num_layers}")
    return shared_size(s.num_samples for s in stats)


def shared_size(sizes: Iterable[int] | Mapping[str, int]) -> int:
    """The one Fisher mini-batch size ``N`` the layers report (by name, for the message).

    Raises:
        ValueError: they disagree (:data:`DISAGREE_HINT` says why that is refused).
    """
    values = list(sizes.values() if isinstance(sizes, Mapping) else sizes)
    distinct = set(values)
    if len(distinct) != 1:
        found: object = sorted(distinct)
        if isinstance(sizes, Mapping):  # each size with the layers that have it
            found = {n: sorted(k for k, v in sizes.items() if v == n) for n in sorted(distinct)}
        raise ValueError(f"layers disagree on the Fisher mini-batch size: {found}" + DISAGREE_HINT)
    return distinct.pop()


def sample_coefficients(stats: Sequence[LayerStats], v: LayerVector) -> Tensor:
    """Per-sample inner products ``c_n = Σ_j ⟨∇_jℓ_n, v_j⟩`` (Koroko et al. 2023, §2).

    Args:
        stats: one :class:`LayerStats` per layer (``ā`` ``[N,T,d_in']``, ``δ`` ``[N,T,d_out]``).
        v: a layer vector, ``v_j`` of shape ``(d_out_j, d_in'_j)``.

    Returns:
        ``c`` of shape ``[N]``.
    """
    check_stats(stats, len(v))
    coeffs = [per_sample_dots(s, vj.unsqueeze(0))[:, 0] for s, vj in zip(stats, v, strict=True)]
    total = coeffs[0]
    for c in coeffs[1:]:
        total = total + c
    return total


def fisher_vector_product(stats: Sequence[LayerStats], v: LayerVector) -> LayerVector:
    """The exact Fisher–vector product ``(F v)_i = (1/N) Σ_n ∇_iℓ_n c_n`` (Koroko et al. 2023, §2).

    Args:
        stats: one :class:`LayerStats` per layer, all with the same ``N``.
        v: a layer vector.

    Returns:
        ``F v`` as a layer vector.
    """
    n = check_stats(stats, len(v))
    weights = sample_coefficients(stats, v) / n
    return [weighted_gradient_sum(s, weights) for s in stats]


def damped_fvp(stats: Sequence[LayerStats], v: LayerVector, damping: float) -> LayerVector:
    """``F̂ v = (F + λI) v`` with the exact Fisher ``F`` of the mini-batch.

    Args:
        stats: one :class:`LayerStats` per layer.
        v: a layer vector.
        damping: ``λ ≥ 0``.

    Returns:
        ``(F + λI) v`` as a layer vector.
    """
    fv = fisher_vector_product(stats, v)
    if damping == 0.0:
        return fv
    return [f.add_(vi, alpha=damping) for f, vi in zip(fv, v, strict=True)]


def sample_coefficients_parts(stats: Sequence[LayerStats], v: Parts) -> Tensor:
    """:func:`sample_coefficients` of a vector given as weight and bias parts."""
    check_stats(stats, len(v))
    coefficients = per_sample_dots_parts(stats[0], *v[0])
    for layer, (weight, bias) in zip(stats[1:], v[1:], strict=True):
        coefficients = coefficients + per_sample_dots_parts(layer, weight, bias)
    return coefficients
