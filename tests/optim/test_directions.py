"""The KL clip's sum and the write of the clipped directions into ``.grad``
(:mod:`twolevel_kfac.optim.directions`): the fast paths give the numbers of the plain ones
bit for bit, and the clip's scale is the formula's."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import twolevel_kfac as tk
from twolevel_kfac.optim.directions import (
    assign_layers,
    kl_clip_scale,
    scale_in_place,
    sum_abs_layer_dots,
)

Layers = list[list[tuple[Tensor, Tensor]]]


def _layers(seed: int, dtype: torch.dtype = torch.float32, parts: int = 2) -> Layers:
    """Random (direction, gradient) pairs: a weight part and ``parts − 1`` bias parts a
    layer, one layer with a weight alone, and one whose two parts cancel."""
    gen = torch.Generator().manual_seed(seed)

    def pair(*shape: int) -> tuple[Tensor, Tensor]:
        return tuple(torch.randn(*shape, generator=gen).to(dtype) for _ in range(2))  # type: ignore[return-value]

    layers = [[pair(7, 5), *[pair(7) for _ in range(parts - 1)]] for _ in range(4)]
    layers.append([pair(3, 9)])
    d, g = pair(4)
    layers.append([(d, g), (-d, g)])
    return layers


def _reference_sum(layers: Layers, weights: list[float] | None = None) -> float:
    """The float64 tail of :func:`sum_abs_layer_dots` as it was computed before its host
    path: the dots stacked and widened on their device, each layer's parts summed by
    ``index_add_`` onto zeros, ``|·|``, then the (weighted) sum over the layers."""
    dots = [torch.dot(d.reshape(-1), g.reshape(-1)) for pairs in layers for d, g in pairs]
    values = torch.stack(dots).double()
    owner = torch.tensor([i for i, pairs in enumerate(layers) for _ in pairs])
    values = values.new_zeros(len(layers)).index_add_(0, owner, values)
    if weights is None:
        return float(values.abs().sum())
    return float(values.abs() @ values.new_tensor(weights))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sum_abs_layer_dots_host_path_is_the_device_path_bit_for_bit(
    seed: int, dtype: torch.dtype
) -> None:
    """The CPU path (one ``tolist``, each layer's ``|w + b|`` on the host, the sum over
    the layers on a float64 tensor) returns exactly the float of the index_add_ path,
    with and without per-layer weights (``lr_squared``); three parts a layer (no host
    path) as well."""
    layers = _layers(seed, dtype)
    weights = [0.1 * (i + 1) ** 2 for i in range(len(layers))]
    assert sum_abs_layer_dots(layers) == _reference_sum(layers)
    assert sum_abs_layer_dots(layers, weights) == _reference_sum(layers, weights)
    three = _layers(seed, dtype, parts=3)
    assert sum_abs_layer_dots(three) == _reference_sum(three)


def test_kl_clip_scale_is_the_formula_in_float64() -> None:
    """``ν = min(1, √(c / Σ_i w_i |⟨d_w, g_w⟩ + ⟨d_b, g_b⟩|))`` computed by hand in
    float64, in both forms (``w_i = η_i²`` for ``lr_squared``), binding and not."""
    layers = _layers(0, torch.float64)
    by_hand = [
        abs(math.fsum(float((d * g).sum()) for d, g in pairs)) for pairs in layers
    ]  # elementwise products summed: another order than torch.dot, float64 keeps it close
    total = math.fsum(by_hand)
    lrs = [0.5, 0.25, 0.1, 1.0, 2.0, 0.3]
    total_lr2 = math.fsum(lr * lr * x for lr, x in zip(lrs, by_hand, strict=True))
    for clip in (1e-3 * total, 0.5 * total, 2.0 * total):
        scale, finite = kl_clip_scale(layers, clip)
        assert finite
        assert scale == pytest.approx(min(1.0, math.sqrt(clip / total)), rel=1e-13)
        scale, _ = kl_clip_scale(layers, clip, lrs)
        assert scale == pytest.approx(min(1.0, math.sqrt(clip / total_lr2)), rel=1e-13)
    assert kl_clip_scale(layers, 0.5 * total)[0] < 1.0  # the clip binds …
    assert kl_clip_scale(layers, 2.0 * total)[0] == 1.0  # … or not


def _tensors(seed: int, dtypes: list[torch.dtype]) -> list[Tensor]:
    """Tensors of the given dtypes: small, large, transposed (non-contiguous), with an Inf."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5,), (7, 33), (301, 129), (4, 6)]
    out = []
    for i, dtype in enumerate(dtypes):
        t = torch.randn(shapes[i % len(shapes)], generator=gen) * 10.0 ** (i % 7 - 3)
        if i % 3 == 1:
            t = t.T if t.dim() == 2 else t
        if i % 5 == 4:
            t[..., 0] = float("inf")
        out.append(t.to(dtype))
    return out


@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32] * 6,
        [torch.bfloat16] * 4,
        [torch.float16] * 4,
        [torch.float64] * 4,
        [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16],
        [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float64],
    ],
)
@pytest.mark.parametrize("scale", [0.1, 1 / 3, 1.0 + 2.0**-30, 7e-3])
def test_scale_in_place_is_mul_bit_for_bit(dtypes: list[torch.dtype], scale: float) -> None:
    """One ``torch._foreach_mul_`` gives each tensor's ``mul_(scale)`` exactly (a Python
    float factor would not for bf16 / fp16: foreach rounds it to their dtype first)."""
    tensors = _tensors(len(dtypes), dtypes)
    expected = [t.clone().mul_(scale) for t in tensors]
    scale_in_place(tensors, scale)
    for got, want in zip(tensors, expected, strict=True):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        assert torch.equal(got, want)
    scale_in_place([], scale)  # nothing to scale


def test_assign_layers_scales_and_hands_over_the_directions() -> None:
    """``.grad ← scale · direction`` for every block parameter: the direction tensor itself
    (no copy) for a contiguous ``.grad``, copied into a ``.grad`` that is a view (a DDP
    bucket); a layer without a trained bias gets its weight alone, a BitFit layer (frozen
    weight) its bias alone; ``scale = 1`` leaves the values untouched."""
    torch.manual_seed(0)
    full, no_bias, bitfit = nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2)
    no_bias.bias.requires_grad_(False)
    bitfit.weight.requires_grad_(False)
    bucket = torch.zeros(6)
    no_bias.weight.grad = bucket.view(2, 3)  # a view: its storage must receive the copy
    gen = torch.Generator().manual_seed(1)
    directions = [
        (torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)),
        (torch.randn(2, 3, generator=gen), None),
        (torch.randn(2, generator=gen), None),
    ]
    for scale in (0.25, 1.0):
        copies = [tuple(None if t is None else t.clone() for t in d) for d in directions]
        values = [tuple(None if t is None else t.clone() for t in d) for d in directions]
        assign_layers([full, no_bias, bitfit], values, scale)
        assert full.weight.grad is values[0][0] and full.bias.grad is values[0][1]
        assert torch.equal(full.weight.grad, copies[0][0] * scale)
        assert torch.equal(full.bias.grad, copies[0][1] * scale)
        assert no_bias.weight.grad.data_ptr() == bucket.data_ptr()
        assert torch.equal(bucket, (copies[1][0] * scale).reshape(-1))
        assert no_bias.bias.grad is None
        assert bitfit.bias.grad is values[2][0] and bitfit.weight.grad is None
        assert torch.equal(bitfit.bias.grad, copies[2][0] * scale)
        bitfit.bias.grad = None


def test_kfac_step_writes_the_clipped_direction(float64: None) -> None:
    """End to end: with the clip binding, each ``.grad`` after ``precond.step()`` is
    ``ν · M⁻¹∇`` of the same step without a clip, ``ν`` from the hand-computed sum."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    grads, directions = {}, {}
    for clip in (None, 1e-6):
        pre = tk.KFACPreconditioner(model, fisher="empirical", kl_clip=clip)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads[clip] = [p.grad.clone() for p in model.parameters()]
        pre.step()
        directions[clip] = [p.grad.clone() for p in model.parameters()]
        pre.remove_hooks()
    pairs = list(zip(directions[None], grads[None], strict=True))
    total = sum(  # each Linear's weight and bias: one layer of the sum
        abs(math.fsum(float((d * g).sum()) for d, g in pairs[i : i + 2])) for i in (0, 2)
    )
    nu = math.sqrt(1e-6 / total)
    assert nu < 1.0
    assert pre.last_stats["kl_scale"] == pytest.approx(nu, rel=1e-12)
    for clipped, plain in zip(directions[1e-6], directions[None], strict=True):
        torch.testing.assert_close(clipped, nu * plain, rtol=1e-12, atol=0)
