"""The coarse level on layer vectors given as weight and bias parts (:data:`Parts`).

Autograd leaves a layer's gradient as ``∇W`` and ``∇b``; between refreshes the two-level
steps restrict from and prolong into those parts directly, with each layer's basis
``[k_i, d_out_i, d_in'_i]`` split once into its ``W`` and ``b`` columns, so the
``W̄ = [V, b]`` matrices are never formed.

The ``W`` columns of a dense basis are a contiguous copy, as large as the basis (a GEMV
needs a flat ``[k_i, d_out·d_in]`` matrix; on the strided view of ``W̄`` the restriction
is 1.7× and the prolongation 1.4× slower, MNIST autoencoder, and rounds differently): the
coarse level holds such a basis twice between refreshes (a refresh step drops the old
operator, and its split, before anything else: :meth:`~twolevel_kfac.optim.coarse.
CoarseLevel.release_replaced`). A basis kept as outer products
(:class:`~twolevel_kfac.twolevel.layer_basis.OuterVectors`, the spectral space's) splits its
right factor only (:class:`OuterPart`): no copy, and one pass over the parts each way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from twolevel_kfac.twolevel.layer_basis import (
    LayerBasis,
    OuterVectors,
    SplitVectors,
    add_rows,
    prolong_add_layer,
    restrict_layer,
)
from twolevel_kfac.twolevel.vectors import Parts


class ConstantPart(NamedTuple):
    """A layer's basis of one vector whose entries all equal ``value`` (a 0-dim tensor):
    the normalised Nicolaides vector of ``nicolaides`` and ``tselepidis``. Then
    ``⟨r, v⟩ = value·Σv`` and ``v + α y r = v + α y·value``: the basis is never read, which
    halves the restriction's memory traffic and saves a third of the prolongation's (MNIST
    autoencoder, both per step: 2.0 → 0.8 ms; CURVES 0.59 → 0.36 ms at 2 threads)."""

    value: Tensor


class OuterPart(NamedTuple):
    """A layer's basis of outer products ``r_j = l_j r̃_jᵀ`` (:class:`~twolevel_kfac.
    twolevel.layer_basis.OuterVectors`) with ``r̃`` split at the bias column: ``⟨r_j, (V, b)⟩ =
    l_jᵀV r̃_j^W + (l_jᵀb) r̃_j^b`` and ``V += α (lᵀdiag(y)) r̃^W``, ``b += α lᵀ(y ∘ r̃^b)``.
    ``right_weight`` is a view of ``r̃`` and ``right_bias`` a ``[k]`` copy (or ``None``)."""

    left: Tensor
    right_weight: Tensor
    right_bias: Tensor | None


LayerSplit = tuple[Tensor, Tensor | None] | ConstantPart | OuterPart
SplitBasis = list[LayerSplit]
"""Per layer, the basis as ``([k_i, d_out·d_in], [k_i, d_out] or None)``, a
:class:`ConstantPart` or an :class:`OuterPart`."""


def _constant(t: Tensor) -> bool:
    """Whether every entry of ``t`` equals its first."""
    return bool((t == t.reshape(-1)[0]).all())


def split_basis(basis: Sequence[LayerBasis], has_bias: Sequence[bool]) -> SplitBasis:
    """Each layer's basis as contiguous ``[k_i, d_out·d_in]`` weight and ``[k_i, d_out]``
    bias parts (the bias is ``W̄``'s last column where ``has_bias``), as its one value
    when it is one vector of equal entries (:class:`ConstantPart`), or as its split outer
    factors when it is kept as outer products (:class:`OuterPart`)."""
    out: SplitBasis = []
    for b, bias in zip(basis, has_bias, strict=True):
        if isinstance(b, OuterVectors):
            if b.left.shape[0] == 1 and _constant(b.left) and _constant(b.right):
                out.append(ConstantPart(b.left[0, 0] * b.right[0, 0]))
                continue
            right = b.right[:, :-1] if bias else b.right
            out.append(OuterPart(b.left, right, b.right[:, -1].clone() if bias else None))
            continue
        if isinstance(b, SplitVectors):  # already the parts: views, no copy
            out.append((b.weight.flatten(1), b.bias) if bias else (b.dense().flatten(1), None))
            continue
        if b.shape[0] == 1 and _constant(b):
            out.append(ConstantPart(b.reshape(-1)[0].clone()))
        elif bias:
            out.append((b[:, :, :-1].reshape(b.shape[0], -1), b[:, :, -1].contiguous()))
        else:
            out.append((b.flatten(1), None))
    return out


def restrict_parts(split: SplitBasis, v: Parts) -> Tensor:
    """``R₀v`` (:func:`~twolevel_kfac.twolevel.coarse_matrix.restrict`) of a vector given
    as :data:`Parts` (``split`` from :func:`split_basis`):
    ``⟨r_k, v⟩ = ⟨r_k^W, V⟩ + ⟨r_k^b, b⟩`` (every layer's one value at once where
    :func:`_constant_batch` allows)."""
    values = _constant_batch(split, v)
    if values is not None:
        totals = torch.stack([vw.sum() for vw, _ in v])
        biased = [i for i, (_, vb) in enumerate(v) if vb is not None]
        if biased:  # Σv_W + Σv_b, one addition per layer as below
            sums = torch.stack([vb.sum() for _, vb in v if vb is not None])
            index = torch.tensor(biased, device=totals.device)
            totals = totals.index_add_(0, index, sums)
        return totals.to(values.dtype) * values
    coefficients = []
    for entry, (vw, vb) in zip(split, v, strict=True):
        if isinstance(entry, ConstantPart):
            total = vw.sum() if vb is None else vw.sum() + vb.sum()
            coefficients.append((total.to(entry.value.dtype) * entry.value).reshape(1))
            continue
        if isinstance(entry, OuterPart):
            weight = OuterVectors(entry.left, entry.right_weight)
            y = restrict_layer(weight, vw.reshape(vw.shape[0], -1))
            if entry.right_bias is not None and vb is not None:
                y = y.addcmul_(entry.left @ vb, entry.right_bias)
            coefficients.append(y)
            continue
        bw, bb = entry
        y = bw @ vw.reshape(-1)
        if bb is not None and vb is not None:
            y = y.addmv_(bb, vb)
        coefficients.append(y)
    return torch.cat(coefficients)


def prolong_add_into_parts(split: SplitBasis, y: Tensor, target: Parts, alpha: float) -> Parts:
    """``target ← target + α R₀ᵀy`` in place
    (:func:`~twolevel_kfac.twolevel.coarse_matrix.prolong_add_into`) for a contiguous
    target given as :data:`Parts` (every layer's shift at once where
    :func:`_constant_batch` allows)."""
    values = _constant_batch(split, target)
    if values is not None:
        shifts = (y * (alpha * values)).to(target[0][0].dtype).tolist()
        tensors, scalars = [], []
        for pair, shift in zip(target, shifts, strict=True):
            present = [t for t in pair if t is not None]
            tensors += present
            scalars += [shift] * len(present)
        torch._foreach_add_(tensors, scalars)
        return target
    sizes = [1 if isinstance(e, ConstantPart) else int(e[0].shape[0]) for e in split]
    for entry, yi, (tw, tb) in zip(split, torch.split(y, sizes), target, strict=True):
        if isinstance(entry, ConstantPart):
            shift = (yi * (alpha * entry.value)).to(tw.dtype)
            tw.add_(shift)
            if tb is not None:
                tb.add_(shift)
            continue
        if isinstance(entry, OuterPart):
            coefficients = yi.to(tw.dtype)
            weight = OuterVectors(entry.left, entry.right_weight)
            prolong_add_layer(weight, coefficients, tw.view(tw.shape[0], -1), alpha)
            if entry.right_bias is not None and tb is not None:  # α lᵀ(y ∘ r̃^b)
                tb.addmv_(entry.left.T, coefficients * entry.right_bias, alpha=alpha)
            continue
        bw, bb = entry
        coefficients = yi.to(tw.dtype)
        add_rows(tw.view(-1), bw, coefficients, alpha)
        if bb is not None and tb is not None:
            add_rows(tb, bb, coefficients, alpha)
    return target


def _constant_batch(split: SplitBasis, v: Parts) -> Tensor | None:
    """The layers' values as one ``[L]`` tensor when every layer's basis is a
    :class:`ConstantPart` (Nicolaides, Tselepidis) and the restriction and prolongation
    can treat all layers at once, bit for bit as one at a time: the parts on the CPU (the
    prolongation reads the shifts as Python numbers) in one dtype, the values in one
    dtype. ``None`` otherwise. On CURVES' twelve layers this saves ~100 small operations
    per step (``restrict_parts`` and ``prolong_add_into_parts``)."""
    if not split or len(split) != len(v) or not all(isinstance(e, ConstantPart) for e in split):
        return None  # (a length mismatch raises in the loop's zip)
    tensors = [t for pair in v for t in pair if t is not None]
    if not all(t.is_cpu and t.dtype == tensors[0].dtype for t in tensors):
        return None
    values = [e.value for e in split if isinstance(e, ConstantPart)]
    if any(x.dtype != values[0].dtype or not x.is_cpu for x in values):
        return None
    return torch.stack(values)
