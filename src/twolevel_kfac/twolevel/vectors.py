"""Helpers on *layer vectors*: one ``(d_out_i, d_in'_i)`` matrix per preconditioned layer.

A layer vector is a ``list[Tensor]`` holding a gradient or a direction ``[W̄_1, …, W̄_L]``
of the whole network, with ``W̄ = [W, b]`` as in :mod:`twolevel_kfac.curvature.blocks`.
Its flat form is the concatenation of the row-major flattened matrices. Operands with
different numbers of layers raise ``ValueError`` (``zip(strict=True)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from twolevel_kfac.curvature.kronecker_apply import LayerParts

LayerVector = list[Tensor]
"""One ``(d_out_i, d_in'_i)`` matrix per layer."""

LinearMap = Callable[[LayerVector], LayerVector]
Parts = list[LayerParts]
"""A layer vector as its weight and bias parts: ``(V (d_out, d_in), b (d_out,) | None)``
per layer, the ``W̄ = [V, b]`` matrices never formed (how autograd leaves gradients)."""
"""A linear operator on layer vectors, e.g. ``v ↦ M⁻¹v`` or ``v ↦ (F + λI)v``. It returns
new tensors that the caller owns (the combinations overwrite some of them: a fresh
full-size tensor costs about twice an in-place pass on CPU, from first-touch page faults)."""


def add(u: LayerVector, v: LayerVector) -> LayerVector:
    """``u + v`` layer by layer."""
    return [a + b for a, b in zip(u, v, strict=True)]


def sub(u: LayerVector, v: LayerVector) -> LayerVector:
    """``u − v`` layer by layer."""
    return [a - b for a, b in zip(u, v, strict=True)]


def sub_into(u: LayerVector, v: LayerVector) -> LayerVector:
    """``u − v``, written into ``v`` (a temporary the caller owns), which is returned."""
    return [torch.sub(a, b, out=b) for a, b in zip(u, v, strict=True)]


def axpy_into(alpha: float, x: LayerVector, y: LayerVector) -> LayerVector:
    """``α x + y``, written into ``x`` (a temporary the caller owns), which is returned."""
    return [torch.add(b, a, alpha=alpha, out=a) for a, b in zip(x, y, strict=True)]


def scale_into(alpha: float, v: LayerVector) -> LayerVector:
    """``α v``, written into ``v`` (a temporary the caller owns), which is returned."""
    return [b.mul_(alpha) for b in v]


def scale(alpha: float, v: LayerVector) -> LayerVector:
    """``α v`` layer by layer."""
    return [alpha * b for b in v]


def axpy(alpha: float, x: LayerVector, y: LayerVector) -> LayerVector:
    """``α x + y`` layer by layer (new tensors; the inputs are not modified)."""
    return [torch.add(b, a, alpha=alpha) for a, b in zip(x, y, strict=True)]


def dot(u: LayerVector, v: LayerVector) -> Tensor:
    """The Euclidean inner product ``Σ_i ⟨u_i, v_i⟩_F`` of the flat vectors (0-d tensor).

    Raises:
        ValueError: if ``u`` and ``v`` have different numbers of layers, or none.
    """
    if not u:
        raise ValueError("dot of empty layer vectors")
    return torch.stack([(a * b).sum() for a, b in zip(u, v, strict=True)]).sum()
