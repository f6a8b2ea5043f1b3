"""The statistics of one forward's calls of a layer (a weight shared by several modules,
or a module run more than once): each call's ``(ā, δ)`` from :func:`~.blocks.
block_statistics`, their locations side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .blocks import block_statistics, own_statistics
from .row_proof import sample_major

if TYPE_CHECKING:
    from .captured_batch import Call

__all__ = ["CallsStatistics", "calls_statistics", "per_sample", "sample_major", "sample_rows"]


class CallsStatistics(NamedTuple):
    """One forward's ``ā`` and ``δ`` of a layer (``[N, T, d]``), its calls' locations side by
    side: ``lengths`` of each, in order."""

    a: Tensor
    g: Tensor
    lengths: tuple[int, ...]


def calls_statistics(
    name: str,
    calls: Sequence[Call],
    dtype: torch.dtype | None,
    samples: int | None = None,
) -> CallsStatistics:
    """``ā`` and ``δ`` (``[N, T, d]``, in ``dtype``) of one forward's calls of a layer, given
    as ``(module, its input, its output gradient)``: each call's locations side by side (a
    call whose output did not reach the loss has ``δ = 0``), a call on ``k·N`` rows read as
    ``k`` locations of each of the forward's ``N = samples`` (:func:`per_sample`).

    Raises:
        RuntimeError: if the calls saw different numbers of rows.
    """
    pairs = [
        per_sample(block_statistics(call.module, call.inputs, call.grad), samples, call.reshaped)
        for call in calls
    ]
    own = own_statistics(calls[0].module)
    inputs = [a if own is not None and own.exact_inputs else _cast(a, dtype) for a, _ in pairs]
    grads = [None if g is None else _cast(g, dtype) for _, g in pairs]
    d_out = next(g for g in grads if g is not None).shape[2:]  # [d_out], or [G, d_out/G]
    grads = [
        g if g is not None else a.new_zeros(a.shape[0], a.shape[1], *d_out)
        for a, g in zip(inputs, grads, strict=True)
    ]
    rows = sorted({int(a.shape[0]) for a in inputs})
    if len(rows) > 1:
        raise RuntimeError(
            f"layer {name!r} (or a module tied to it) ran {len(calls)} times in one forward "
            f"with different numbers of rows {rows}: KFAC treats the calls of a shared "
            "weight as more locations of the same samples"
        )
    lengths = tuple(int(a.shape[1]) for a in inputs)
    if len(calls) == 1:
        return CallsStatistics(inputs[0], grads[0], lengths)  # type: ignore[arg-type]
    return CallsStatistics(torch.cat(inputs, dim=1), torch.cat(grads, dim=1), lengths)  # type: ignore[arg-type]


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def per_sample(
    pair: tuple[Tensor, Tensor | None], samples: int | None, reshaped: bool = False
) -> tuple[Tensor, Tensor | None]:
    """A call's ``(ā, δ)`` (``[R, T, …]``) read per sample of a forward over ``N = samples``.

    * ``R = k·N`` rows in the batch's order (``reshaped``: :func:`sample_major`):
      ``[N, k·T, …]``. Tokens flattened batch-first inside
      ``forward`` (``x.reshape(B * T, D)`` before a ``Linear``, a router's
      ``x.view(-1, D)``) are ``T`` locations of each sample, as the layer on ``[B, T, D]``
      would see them (the rows sample-major), not ``B·T`` samples: KFAC's factors and
      location count, and the per-sample gradients of the coarse level and EKFAC, are
      those of the unflattened model.
    * Other ``R ≠ N`` rows (made by indexing: a branch on some samples,
      ``x[keep]``, tokens gathered for a mixture-of-experts expert; a concatenation; or
      rows whose order is not proved), which cannot be told apart by sample: ``R`` rows
      of one location, as they are (:func:`sample_rows`). Their ``δ`` are scaled once per
      step and layer, by :func:`~.captured_batch.fisher_scale`, so that the block is
      that of the step's batch Fisher ``Σ āāᵀ/R ⊗ Σ δδᵀ/N`` however the rows are spread
      over the forwards of the step (taken as ``R`` samples, the block was ``N/R`` times
      that: an expert of a top-2-of-8 router on ``T`` tokens per sample, ``4/T``)."""
    a, g = pair
    rows = int(a.shape[0])
    if sample_rows(rows, samples, reshaped) == rows:
        return pair
    assert samples is not None  # (sample_rows regroups only by a positive ``samples``)
    return _locations(a, samples), None if g is None else _locations(g, samples)


def sample_rows(rows: int, samples: int | None, reshaped: bool = False) -> int:
    """The rows ``N'`` of a call's statistics (:func:`per_sample`) of ``rows`` input rows
    in a forward over ``samples``: ``samples`` where the rows are ``k·N`` in the batch's
    order (``reshaped``), else ``rows``."""
    if samples is None or samples < 1 or rows in (0, samples):
        return rows
    return samples if reshaped and rows % samples == 0 else rows


def _locations(tensor: Tensor, samples: int) -> Tensor:
    """``[k·N, T, …] → [N, k·T, …]`` (row ``n·k + j`` is sample ``n``'s ``j``-th)."""
    return tensor.reshape(samples, -1, *tensor.shape[2:])
