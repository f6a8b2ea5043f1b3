"""Writing preconditioned directions into ``.grad``, and the KL clip's sum over them.

A direction is a layer's weight and bias parts (plain KFAC's own path: fresh tensors
handed to ``.grad`` without a copy, or ``.grad``'s own storage written over in place) or
views of a ``W̄`` matrix (copied into ``.grad``); the KL clip scales them all by
``min(1, √(c / Σ_i |⟨d_i, ∇_i⟩|))`` (with each layer's ``lr_i²`` inside the sum in Ba et
al. 2017's form, ``kl_clip_form``).

A direction is written over its gradient only where that gives the same numbers as a fresh
tensor (:func:`writable_in_place`): a GEMM writing into memory that is not 64-byte aligned
(a ``.grad`` that is a view into the middle of a DDP bucket) takes other kernel paths and
rounds differently (``docs/benchmarks/implementation_choices.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..curvature.blocks import block_parameters
from .options import Rate

__all__ = [
    "assign_grad",
    "assign_layers",
    "clip_scale",
    "kl_clip_scale",
    "part_pairs",
    "scale_in_place",
    "set_grad",
    "sum_abs_layer_dots",
    "writable_in_place",
    "write_grad",
    "write_layer",
]

ALIGNMENT = 64
"""Bytes: the alignment of fresh CPU / CUDA allocations, and the widest vector registers."""


def writable_in_place(parts: tuple[Tensor, Tensor | None]) -> bool:
    """Whether a layer's gradient parts may receive its direction in place with results
    bit-identical to a fresh tensor's: each contiguous and ``ALIGNMENT``-byte aligned."""
    return all(t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0 for t in parts if t is not None)


def sum_abs_layer_dots(
    layers: list[list[tuple[Tensor, Tensor]]], weights: list[float] | None = None
) -> float:
    """``Σ_i w_i |Σ_parts ⟨d, g⟩|`` over the layers' (direction, gradient) part pairs
    (``w_i = 1`` by default), in float64, with one host sync rather than one per part (a
    dot product reads both once; ``(d * g).sum()`` would also write a full-size product)."""
    dots = [torch.dot(_flat(d), _flat(g)) for pairs in layers for d, g in pairs]
    if not dots:
        return 0.0
    w = weights if weights is not None else [1.0] * len(layers)
    if len({(t.dtype, t.device) for t in dots}) > 1:  # mixed layers: one sync per part
        parts = iter([float(t) for t in dots])
        layer_dots = [abs(sum(next(parts) for _ in pairs)) for pairs in layers]
        return sum(wi * x for wi, x in zip(w, layer_dots, strict=True))
    stacked = torch.stack(dots)
    if stacked.device.type == "cpu" and all(len(pairs) in (1, 2) for pairs in layers):
        return _host_layer_sum(stacked, layers, weights)
    values = stacked.double()
    if len(dots) > len(layers):  # weight and bias parts of one layer are summed first
        owner = [i for i, pairs in enumerate(layers) for _ in pairs]
        index = torch.tensor(owner, device=values.device)
        values = values.new_zeros(len(layers)).index_add_(0, index, values)
    if weights is None:
        return float(values.abs().sum())
    return float(values.abs() @ values.new_tensor(w))


def _flat(t: Tensor) -> Tensor:
    """``t`` as the vector ``torch.dot`` takes (a bias part already is one)."""
    return t if t.dim() == 1 else t.reshape(-1)


def _host_layer_sum(
    stacked: Tensor, layers: list[list[tuple[Tensor, Tensor]]], weights: list[float] | None
) -> float:
    """The float64 tail of :func:`sum_abs_layer_dots` for CPU dots of at most two parts a
    layer, bit for bit: each layer's ``|w + b|`` is one float64 addition whatever the order
    (``index_add_`` onto zeros adds the same two numbers), and the sum over the layers runs
    on a tensor of the same float64 values, as before: 4 tensor ops instead of 8."""
    values = iter(stacked.tolist())  # float32 → float64 is exact
    per_layer = [abs(sum(next(values) for _ in pairs)) for pairs in layers]
    totals = torch.tensor(per_layer, dtype=torch.float64)
    if weights is None:
        return float(totals.sum())
    return float(totals @ torch.tensor(weights, dtype=torch.float64))


def kl_clip_scale(
    layers: list[list[tuple[Tensor, Tensor]]], clip: float, lrs: list[float] | None = None
) -> tuple[float, bool]:
    """The KL clip from each layer's (direction, gradient) part pairs, and whether its sum
    is finite: in the paper's form (Koroko et al. 2023, after Ba et al. 2017)
    ``ν = min(1, √(c / Σ_i |⟨d_i, ∇_i⟩|))``; with ``lrs`` (Ba et al. 2017's form, each
    layer's own learning rate ``η_i``) ``ν = min(1, √(c / Σ_i η_i² |⟨d_i, ∇_i⟩|))``.

    A NaN/Inf entry of any direction makes the sum NaN/Inf (``Inf·0`` is NaN), so a
    finite sum proves every direction finite; a non-finite or non-positive sum gives
    ``ν = 1``.
    """
    total = sum_abs_layer_dots(layers, None if lrs is None else [lr * lr for lr in lrs])
    finite = math.isfinite(total)
    scale = 1.0 if total <= 0 or not finite else min(1.0, math.sqrt(clip / total))
    return scale, finite


def part_pairs(
    directions: dict[str, tuple[Tensor, Tensor | None]],
    grads: dict[str, tuple[Tensor, Tensor | None]],
) -> list[list[tuple[Tensor, Tensor]]]:
    """Each layer's (direction, gradient) part pairs, in the order of ``grads``."""
    pairs = []
    for name, (weight_grad, bias_grad) in grads.items():
        weight, bias = directions[name]
        layer = [(weight, weight_grad)]
        if bias is not None and bias_grad is not None:
            layer.append((bias, bias_grad))
        pairs.append(layer)
    return pairs


def write_layer(
    module: nn.Module, weight: Tensor, bias: Tensor | None, scale: float, assign: bool
) -> None:
    """``.grad ← scale · direction`` for a layer's weight and bias (:func:`write_grad`; its
    :func:`~..curvature.blocks.block_parameters`: the bias alone when only it trains)."""
    main, extra = block_parameters(module)
    write_grad(main, weight, scale, assign)
    write_grad(extra, bias, scale, assign)


def assign_layers(
    modules: list[nn.Module], directions: list[tuple[Tensor, Tensor | None]], scale: float
) -> None:
    """:func:`write_layer` with ``assign=True`` for many layers: fresh directions (or
    ``.grad``'s own storage) scaled in place (:func:`scale_in_place`) and handed to
    ``.grad`` (:func:`assign_grad`)."""
    params, values = [], []
    for module, (weight, bias) in zip(modules, directions, strict=True):
        main, extra = block_parameters(module)
        for param, value in ((main, weight), (extra, bias)):
            if param is not None and value is not None:
                params.append(param)
                values.append(value)
    if scale != 1.0:
        scale_in_place(values, scale)
    for param, value in zip(params, values, strict=True):
        assign_grad(param, value)


def scale_in_place(tensors: list[Tensor], scale: float) -> None:
    """``t.mul_(scale)`` for each tensor, bit for bit, in one ``torch._foreach_mul_`` on
    the CPU (24 small tensors: 19 µs, the loop 73). Its factor is a 0-dim tensor in the
    precision ``mul_`` rounds ``scale`` to: float32 (the op math of float32, bf16 and
    fp16 tensors), float64 when a tensor is float64. A Python float would not do: foreach
    rounds it to a bf16 / fp16 tensor's own dtype first, which ``mul_`` does not (and a
    float64 factor for float32 tensors costs a cast per tensor). Other devices keep the
    loop."""
    if not tensors or not all(t.is_cpu for t in tensors):
        for t in tensors:
            t.mul_(scale)
        return
    wide = any(t.dtype == torch.float64 for t in tensors)
    factor = torch.tensor(scale, dtype=torch.float64 if wide else torch.float32)
    torch._foreach_mul_(tensors, factor)


def clip_scale(
    clip: float | None,
    form: str,
    layers: list[list[tuple[Tensor, Tensor]]],
    names: list[str],
    lrs: Mapping[str, Rate],
) -> tuple[float, bool | None]:
    """:func:`kl_clip_scale` as configured: ``(1, None)`` without a clip (finiteness not
    known); ``form="lr_squared"`` reads the learning rate of each layer of ``names``, and
    where a layer's weight and bias have rates of their own, its term is
    ``η_W²⟨d_W, ∇_W⟩ + η_b²⟨d_b, ∇_b⟩`` (:func:`_rated`; the weight's rate for both before
    2026-12-06 (evening): ``ν`` 0.91 where 0.45 was due in a trial)."""
    if clip is None:
        return 1.0, None
    if form != "lr_squared":
        return kl_clip_scale(layers, clip)
    rates = [_rate(lrs[n]) for n in names]
    rated = [
        _rated(pairs, rate) if isinstance(rate, tuple) else pairs
        for pairs, rate in zip(layers, rates, strict=True)
    ]
    return kl_clip_scale(rated, clip, [1.0 if isinstance(r, tuple) else r for r in rates])


def _rate(value: Rate) -> Rate:
    return value if isinstance(value, tuple) else float(value)


def _rated(
    pairs: list[tuple[Tensor, Tensor]], rates: tuple[float, float]
) -> list[tuple[Tensor, Tensor]]:
    """A layer's (direction, gradient) pairs with each part's gradient times its rate²
    (``rates``: the weight's, the bias's): its weight and bias parts, or one ``W̄`` matrix
    pair, whose last column is the bias (a layer whose parts have rates of their own has
    both, and their gradients)."""
    weight, bias = rates[0] ** 2, rates[1] ** 2
    if len(pairs) == 1:
        ((d, g),) = pairs
        return [(d[:, :-1], g[:, :-1] * weight), (d[:, -1], g[:, -1] * bias)]
    return [(d, g * r) for (d, g), r in zip(pairs, (weight, bias), strict=True)]


def write_grad(param: Tensor | None, value: Tensor | None, scale: float, assign: bool) -> None:
    """``param.grad ← scale · value`` (nothing when either is ``None``): ``assign``: a fresh
    direction (or ``.grad``'s own storage), scaled in place and handed over
    (:func:`assign_grad`); else copied (:func:`set_grad`: ``value`` may be a view)."""
    if param is None or value is None:
        return
    if assign:
        assign_grad(param, value.mul_(scale) if scale != 1.0 else value)
    else:
        set_grad(param, value, scale)


def set_grad(param: Tensor, value: Tensor, scale: float) -> None:
    """``param.grad ← scale · value`` as a copy (``value`` may be a view of something else)."""
    grad = param.grad
    if grad is None:
        param.grad = (value * scale).to(param.dtype).reshape(param.shape)
    elif scale == 1.0:
        grad.copy_(value.reshape(grad.shape))
    else:
        torch.mul(value.reshape(grad.shape), scale, out=grad)


def assign_grad(param: Tensor, value: Tensor) -> None:
    """``param.grad ← value`` without a copy.

    ``value`` is a fresh tensor of ``param``'s dtype, or ``param.grad``'s own storage
    written in place; a gradient that is a view (DDP's ``gradient_as_bucket_view`` keeps
    its buckets' storage there) is copied into instead (copying in every case is no
    faster: ``docs/benchmarks/implementation_choices.md``)."""
    grad = param.grad
    if value.shape != param.shape:  # a Conv2d weight from its (d_out, d_in) matrix
        value = value.view(param.shape)
    if grad is not None and _same_storage(grad, value):
        return
    if grad is not None and grad._base is not None:
        grad.copy_(value)
    else:
        param.grad = value


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same entries of the same memory."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape
