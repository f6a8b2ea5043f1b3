"""The statistics of one forward's calls of a layer (a weight shared by several modules,
or a module run more than once): each call's ``(ā, δ)`` from :func:`~.blocks.
block_statistics`, their locations side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .blocks import block_statistics, own_statistics

if TYPE_CHECKING:
    from .captured_batch import Call

__all__ = ["calls_statistics", "per_sample", "sample_major"]


def calls_statistics(
    name: str,
    calls: Sequence[Call],
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
    if len(calls) == 1:
        return inputs[0], grads[0]  # type: ignore[return-value]
    return torch.cat(inputs, dim=1), torch.cat(grads, dim=1)  # type: ignore[arg-type]


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
    * Other ``R ≠ N`` rows (``N > 1``; made by indexing: a branch on some samples,
      ``x[keep]``, tokens gathered for a mixture-of-experts expert; a concatenation), which cannot
      be told apart by sample: ``R`` rows of one location, with ``δ`` times ``√(R/N)``, so
      that the block ``A ⊗ G`` is that of the batch's Fisher ``(1/N) Σ_n``:
      ``Σ āāᵀ/R ⊗ Σ δδᵀ/N``, whatever ``R`` and the rows' order (KFAC's expand view of
      ``R`` locations spread over ``N`` samples; exact for a branch on whole samples). Taken
      as ``R`` samples, the block was ``N/R`` times that (an expert of a top-2-of-8 router
      on ``T`` tokens per sample: ``4/T``).

    A forward over one sample whose rows are not sample-major keeps them as they are (a
    first tensor argument that is not the batch would make every layer's rows look
    gathered)."""
    a, g = pair
    rows = int(a.shape[0])
    if samples is None or samples < 1 or rows in (0, samples):
        return pair
    if reshaped and rows % samples == 0:
        return _locations(a, samples), None if g is None else _locations(g, samples)
    if samples == 1:
        return pair
    return a, None if g is None else g * math.sqrt(rows / samples)


_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
_REORDERS = frozenset(
    {
        "IndexBackward0",
        "IndexSelectBackward0",
        "GatherBackward0",
        "MaskedSelectBackward0",
        "CatBackward0",
        "StackBackward0",
        "RepeatBackward0",
        "RepeatInterleaveBackward0",
        "ExpandBackward0",
        "IndexPutBackward0",
    }
)
_WALK = 256  # autograd nodes looked at, at most


def sample_major(inputs: Tensor, samples: int) -> bool:
    """Whether a layer input of ``R ≠ N = samples`` rows keeps its rows in the batch's
    order, sample-major (tokens flattened batch-first): no autograd node between it and
    the last reshape on each path back (``view``, ``reshape``, ``flatten``) makes rows by
    indexing, gathering, concatenating, stacking or repeating (a mixture-of-experts
    expert's gathered tokens, ``torch.cat`` of two views). An input without autograd
    history (the data) counts when it is a view (a micro-batch ``x.split(m)`` reshaped).
    ``False`` for ``R = N`` (nothing to regroup)."""
    if int(inputs.shape[0]) == samples:
        return False
    node = inputs.grad_fn
    if node is None:
        return inputs._base is not None
    stack, seen = [node], {node}
    while stack and len(seen) <= _WALK:
        node = stack.pop()
        name = type(node).__name__
        if name in _REORDERS:
            return False
        if name in _RESHAPES:
            continue  # the rows before a reshape are another tensor's
        for parent, _ in node.next_functions:
            if parent is not None and parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return True


def _locations(tensor: Tensor, samples: int) -> Tensor:
    """``[k·N, T, …] → [N, k·T, …]`` (row ``n·k + j`` is sample ``n``'s ``j``-th)."""
    return tensor.reshape(samples, -1, *tensor.shape[2:])
