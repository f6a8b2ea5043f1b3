"""The statistics of one forward's calls of a layer (a weight shared by several modules,
or a module run more than once): each call's ``(ā, δ)`` from :func:`~.blocks.
block_statistics`, their locations side by side."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import block_statistics, own_statistics

__all__ = ["calls_statistics", "per_sample"]


def calls_statistics(
    name: str,
    calls: list[tuple[nn.Module, Tensor, Tensor | None]],
    dtype: torch.dtype | None,
    samples: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``ā`` and ``δ`` (``[N, T, d]``, in ``dtype``) of one forward's calls of a layer, given
    as ``(module, its input, its output gradient)``: each call's locations side by side (a
    call whose output did not reach the loss has ``δ = 0``), a call on ``k·N`` rows read as
    ``k`` locations of each of the forward's ``N = samples`` (:func:`per_sample`).

    Raises:
        RuntimeError: if the calls saw different numbers of rows.
    """
    pairs = [per_sample(block_statistics(module, x, grad), samples) for module, x, grad in calls]
    own = own_statistics(calls[0][0])
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
    if len(calls) == 1:
        return inputs[0], grads[0]  # type: ignore[return-value]
    return torch.cat(inputs, dim=1), torch.cat(grads, dim=1)  # type: ignore[arg-type]


def _cast(tensor: Tensor, dtype: torch.dtype | None) -> Tensor:
    return tensor if dtype is None else tensor.to(dtype)


def per_sample(
    pair: tuple[Tensor, Tensor | None], samples: int | None
) -> tuple[Tensor, Tensor | None]:
    """A call's ``(ā, δ)`` (``[R, T, …]``) on ``R = k·N`` rows, ``k > 1``, of a forward over
    ``N = samples > 1`` samples as ``[N, k·T, …]``: tokens flattened batch-first inside
    ``forward`` (``x.reshape(B * T, D)`` before a ``Linear``, a router's
    ``x.view(-1, D)``) are ``T`` locations of each sample, as the layer on ``[B, T, D]``
    would see them (the rows sample-major), not ``B·T`` samples: KFAC's factors and
    location count, and the per-sample gradients of the coarse level and EKFAC, are then
    those of the unflattened model. Other row counts (a layer on some samples' rows,
    gathered tokens) stay as they are: ``N = R``, as before."""
    a, g = pair
    rows = int(a.shape[0])
    if samples is None or samples <= 1 or rows == samples or rows % samples:
        return pair
    return _locations(a, samples), None if g is None else _locations(g, samples)


def _locations(tensor: Tensor, samples: int) -> Tensor:
    """``[k·N, T, …] → [N, k·T, …]`` (row ``n·k + j`` is sample ``n``'s ``j``-th)."""
    return tensor.reshape(samples, -1, *tensor.shape[2:])
