"""The damped Kronecker-factored inverse applied to a layer's gradient matrix.

``(A ⊗ G)⁻¹ vec(V) = vec(G⁻¹ V A⁻¹)`` with ``V = W̄ = [∇W, ∇b]`` (column-major ``vec``),
either as two factor inverses or as a diagonal scaling in the Kronecker eigenbasis
(George et al. 2018, eq. 7). ``V`` may be given whole or as its weight and bias parts
(the gradients where autograd left them): the products then read and write the parts
directly, never concatenating the gradient nor splitting the direction, and may write
the direction over the gradient it came from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BorderedInverse",
    "LayerParts",
    "apply_in_eigenbasis",
    "apply_in_eigenbasis_split",
    "apply_on_parts",
    "multiply_joined",
    "multiply_split",
]


def multiply_joined(left: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``L [V, b]``: ``left`` times the joined matrix ``W̄ = [V, b]`` without forming it.

    One GEMM and one GEMV write straight into the two column blocks of the result, so the
    layer's ``weight`` and ``bias`` gradients are read where autograd left them (forming
    ``[V, b]`` first costs a full write and read of the gradient).
    """
    if bias is None:
        return left @ weight
    columns = weight.shape[1]
    out = left.new_empty(left.shape[0], columns + 1)
    torch.mm(left, weight, out=out[:, :columns])
    torch.mv(left, bias, out=out[:, columns])
    return out


LayerParts = tuple[Tensor, Tensor | None]  # a layer's (weight, bias) parts


def multiply_split(
    matrix: Tensor, right: Tensor, with_bias: bool, out: LayerParts | None = None
) -> LayerParts:
    """``X R`` as its weight and bias parts ``(X R[:, :-1], X R[:, -1])`` (the whole
    product and ``None`` without a bias): the inverse of :func:`multiply_joined`, so a
    preconditioned ``W̄`` never needs splitting and copying.

    The parts are fresh contiguous tensors, or ``out``'s (``(d_out, d_in)`` and
    ``(d_out,)``, any dtype) written in place: a product written over the gradient it
    came from costs less than one written to fresh memory.
    """
    columns = right[:, :-1] if with_bias else right
    if out is None:
        return matrix @ columns, (matrix @ right[:, -1] if with_bias else None)
    out_weight, out_bias = out
    _product_into(torch.mm, matrix, columns, out_weight)
    if with_bias:
        assert out_bias is not None
        _product_into(torch.mv, matrix, right[:, -1], out_bias)
    return out_weight, out_bias


class BorderedInverse(NamedTuple):
    """A symmetric ``(d+1) × (d+1)`` matrix ``S = [[P, q], [qᵀ, c]]`` kept as its blocks:
    the damped ``A⁻¹`` of a layer with a bias, whose last coordinate is the bias'
    homogeneous 1 (Martens & Grosse 2015 §2: ``ā = [a, 1]``).

    ``[X, x] S = [X P + x qᵀ,  X q + c x]``: the GEMM reads a contiguous ``P`` whose rows
    are ``d`` wide, where ``[X, x] S[:, :-1]`` reads rows ``d + 1`` wide (unaligned) and
    ``S[:, -1]`` as a strided vector. With the left product written to a contiguous
    ``X = G⁻¹∇W`` instead of the columns of a ``[G⁻¹∇W, G⁻¹∇b]`` buffer, KFAC's apply on
    every layer of the MNIST autoencoder took 0.96× the time at 2 threads and 0.84× at 1
    (CURVES: 0.95×, 0.93×; ``docs/benchmarks/implementation_choices.md``). It holds the
    same numbers as the full matrix (``full()``), so nothing else changes.
    """

    head: Tensor  # P, (d, d), contiguous
    edge: Tensor  # q, (d,)
    corner: Tensor  # c, a 0-dim tensor (no host sync on an accelerator)

    @staticmethod
    def of(full: Tensor) -> BorderedInverse:
        """The blocks of a symmetric ``(d+1) × (d+1)`` matrix."""
        return BorderedInverse(
            full[:-1, :-1].contiguous(), full[:-1, -1].contiguous(), full[-1, -1].clone()
        )

    def full(self) -> Tensor:
        """``S`` as one matrix."""
        top = torch.cat([self.head, self.edge.unsqueeze(1)], dim=1)
        bottom = torch.cat([self.edge, self.corner.reshape(1)]).unsqueeze(0)
        return torch.cat([top, bottom])

    def matvec(self, v: Tensor) -> Tensor:
        """``S v = [P v₁ + q v₂,  qᵀ v₁ + c v₂]`` for ``v = [v₁, v₂]``."""
        head, last = v[:-1], v[-1]
        top = torch.addmv(self.edge * last, self.head, head)
        return torch.cat([top, (self.edge @ head + self.corner * last).reshape(1)])

    def right_parts(
        self, weight: Tensor, bias: Tensor, out: LayerParts | None = None
    ) -> LayerParts:
        """``[X, x] S`` as its parts ``(X P + x qᵀ,  X q + c x)`` for ``X = weight``,
        ``x = bias``, into fresh tensors or ``out`` (any dtype; not ``weight`` and ``bias``
        themselves, which are read after ``out`` is first written)."""
        if out is None:
            return self._weight_part(weight, bias), self._bias_part(weight, bias)
        out_weight, out_bias = out
        if out_weight.dtype == weight.dtype:
            torch.mm(weight, self.head, out=out_weight)
            out_weight.addr_(bias, self.edge)
        else:
            out_weight.copy_(self._weight_part(weight, bias))
        if out_bias is None:
            return out_weight, self._bias_part(weight, bias)
        if out_bias.dtype == bias.dtype:
            torch.mul(bias, self.corner, out=out_bias).addmv_(weight, self.edge)
        else:
            out_bias.copy_(self._bias_part(weight, bias))
        return out_weight, out_bias

    def _weight_part(self, weight: Tensor, bias: Tensor) -> Tensor:
        return (weight @ self.head).addr_(bias, self.edge)

    def _bias_part(self, weight: Tensor, bias: Tensor) -> Tensor:
        return (bias * self.corner).addmv_(weight, self.edge)

    def right(self, matrix: Tensor) -> Tensor:
        """``M S`` of a ``(rows, d+1)`` matrix ``M = [X, x]`` (a stack of them: through
        ``full()``), a fresh tensor built without ``out=`` writes, so it can be
        differentiated and ``vmap``-ed like the plain product."""
        if matrix.dim() != 2:
            return matrix @ self.full()
        weight, bias = matrix[:, :-1], matrix[:, -1:]
        head = weight @ self.head + bias * self.edge  # out-of-place: every op has a
        tail = weight @ self.edge[:, None] + bias * self.corner  # batching rule
        return torch.cat([head, tail], dim=1)


def _product_into(product: Callable[..., Tensor], left: Tensor, right: Tensor, out: Tensor) -> None:
    """``out ← left·right`` (``torch.mm`` or ``torch.mv``), through a cast when ``out``
    has another dtype than the operands."""
    if out.dtype == left.dtype:
        product(left, right, out=out)
    else:
        out.copy_(product(left, right))


def apply_in_eigenbasis_split(
    vectors_g: Tensor,
    inverse_grid: Tensor,
    vectors_a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out: LayerParts | None = None,
) -> LayerParts:
    """:func:`apply_in_eigenbasis` on ``W̄ = [weight, bias]`` given as its parts, returning
    the parts of the result (:func:`multiply_joined`, :func:`multiply_split`; ``out`` may
    be the input parts: they are read before the result is written)."""
    rotated = multiply_joined(vectors_g.T, weight, bias) @ vectors_a
    return multiply_split(
        vectors_g @ rotated.mul_(inverse_grid), vectors_a.T, bias is not None, out
    )


def apply_in_eigenbasis(
    vectors_g: Tensor, inverse_grid: Tensor, vectors_a: Tensor, matrix: Tensor
) -> Tensor:
    """``Q_G [(Q_Gᵀ V Q_A) ⊙ D⁻¹] Q_Aᵀ``: a diagonal scaling in the Kronecker eigenbasis
    (George et al. 2018, eq. 7), computed in the basis' dtype, returned in ``V``'s."""
    v = matrix.to(inverse_grid.dtype)
    return apply_in_eigenbasis_split(vectors_g, inverse_grid, vectors_a, v, None)[0].to(
        matrix.dtype
    )


def apply_on_parts(
    apply: Callable[[Tensor], Tensor],
    weight: Tensor,
    bias: Tensor | None,
    out: LayerParts | None = None,
) -> LayerParts:
    """``apply`` (a map of ``(d_out, d_in')`` matrices) on ``W̄ = [weight, bias]`` given as
    its parts: the matrix joined, the result split into fresh tensors or into ``out``
    (which may be the parts themselves: the result exists before it is written)."""
    joined = weight if bias is None else torch.cat([weight, bias.unsqueeze(1)], dim=1)
    result = apply(joined)
    columns = weight.shape[1]
    parts = (result[:, :columns], None if bias is None else result[:, columns])
    if out is None:
        return parts[0].contiguous(), None if parts[1] is None else parts[1].contiguous()
    for target, part in zip(out, parts, strict=True):
        if target is not None and part is not None:
            target.copy_(part)
    return out


class InverseOnMatrices:
    """The applications of a block's damped inverse derived from the one on ``W̄`` matrices
    (``apply_inverse``), for the block types that only define that (a norm's unit-wise
    blocks, a grouped convolution's blocks per group, a large embedding table's).

    Such a block has no single pair of dense Kronecker factors: the attributes of
    :class:`~.kronecker.KroneckerFactors` that callers read to tell a Kronecker block
    (``check_blocks``, EKFAC's bases, the coarse level) are ``None`` here."""

    A: Tensor | None = None
    G: Tensor | None = None
    decomp_a: tuple[Tensor, Tensor] | None = None
    decomp_g: tuple[Tensor, Tensor] | None = None

    def apply_inverse(self, grad: Tensor, damping: float, mode: str, method: str) -> Tensor:
        """The damped inverse applied to a ``(d_out, d_in')`` matrix."""
        raise NotImplementedError

    def apply_inverse_outer(
        self, left: Tensor, right: Tensor, damping: float, mode: str, method: str
    ) -> Tensor | tuple[Tensor, Tensor]:
        """:meth:`apply_inverse` of ``left rightᵀ``: the matrix, or the pair of vectors
        whose outer product it is (where the block's inverse is a Kronecker product)."""
        return self.apply_inverse(torch.outer(left, right), damping, mode, method)

    def apply_inverse_split(
        self,
        weight: Tensor,
        bias: Tensor | None,
        damping: float,
        mode: str,
        method: str,
        out: LayerParts | None = None,
    ) -> LayerParts:
        """:meth:`apply_inverse` on ``W̄ = [weight, bias]`` given as its parts."""
        return apply_on_parts(
            lambda m: self.apply_inverse(m, damping, mode, method), weight, bias, out
        )
