"""A check of a module type registered with :func:`~.layer_types.register_layer_type`:
that its ``features`` and ``gradients`` reproduce its weight's gradient.

A ``Linear``-like block assumes ``∇_W̄ ℓ = Σ_t δ_t ā_tᵀ`` with ``W̄ = [W.reshape(d_out, -1), b]``,
``ā`` what ``features`` gives and ``δ`` the pre-activation gradient ``gradients`` gives.
A registration that breaks it preconditions with a block of something else, silently: a
weight stored ``[in, out]`` (transformers' ``Conv1D``) with ``Linear``'s functions is wrong
without an error when square and fails with a bare shape error otherwise; a module that
scales its output registered with ``Linear``'s ``δ`` is off by the scale. At the first
captured forward of each such type, one probe checks it: for a fixed pseudo-random
``u`` shaped like the output, ``∇_W̄ ⟨u, f(x)⟩`` from autograd against ``Σ_t δ(u)_t ā_tᵀ``.
Types of torch and of this package are not probed (their blocks are tested)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blocks import input_features, layer_bias, layer_weight, output_gradients
from .layer_types import LayerType, layer_type

__all__ = ["check_registration"]

_CHECKED: set[LayerType] = set()  # registrations probed (a new one of a type is probed again)
_OWN = ("torch.", "twolevel_kfac.")


def check_registration(name: str, module: nn.Module, inputs: Tensor, output: Tensor) -> None:
    """Probe ``module``'s registered type once (module docstring).

    Raises:
        ValueError: naming the layer, the type, the error and the contract.
    """
    entry, kind = layer_type(module), type(module)
    if entry is None or entry in _CHECKED or kind.__module__.startswith(_OWN):
        return
    if entry.statistics is not None or entry.rows_from_inputs or not output.requires_grad:
        _CHECKED.add(entry)  # a block type of its own, or a table: its own contract
        return
    weight, bias = layer_weight(module), layer_bias(module)
    params = [p for p in (weight, bias) if p is not None and p.requires_grad]
    generator = torch.Generator().manual_seed(20261204)  # not torch's stream nor seed 0's
    probe = torch.randn(output.shape, generator=generator).to(output)
    expected = torch.autograd.grad(output, params, probe, retain_graph=True, allow_unused=True)
    with torch.no_grad():
        a = input_features(module, inputs.detach()).double()
        g = output_gradients(module, probe).double()
        problem = _mismatch(weight, bias, a, g, expected)
    if problem is not None:
        raise ValueError(
            f"layer {name!r}: the features and gradients registered for {kind.__name__} do "
            f"not reproduce its weight's gradient ({problem}). They must give the input "
            "ā [N, T, d_in] and the pre-activation gradient δ = ∂L/∂(W ā + b) [N, T, d_out] "
            "of a weight stored as [d_out, …] (Σ_t δ_t ā_tᵀ is its gradient). A weight "
            "stored [in, out] (transformers' Conv1D) is not supported: convert such modules "
            "to nn.Linear (weight.T); a module that rescales its output must scale δ too"
        )
    _CHECKED.add(entry)


def _mismatch(
    weight: Tensor, bias: Tensor | None, a: Tensor, g: Tensor, expected: tuple[Tensor | None, ...]
) -> str | None:
    """Why ``Σ δ āᵀ`` (and ``Σ δ`` for the bias) is not the autograd gradient, or ``None``."""
    rows = int(g.shape[-1])
    if weight.numel() % rows or a.shape[-1] * rows != weight.numel():
        return (
            f"ā has {a.shape[-1]} and δ {rows} columns, but the weight has shape "
            f"{tuple(weight.shape)}"
        )
    tolerance = 1e-3 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    pairs = []
    if weight.requires_grad:
        pairs.append((torch.einsum("nto,nti->oi", g, a), expected[0], "weight"))
    if bias is not None and bias.requires_grad:
        pairs.append((g.sum(dim=(0, 1)), expected[-1], "bias"))
    for got, want, what in pairs:
        want_t = torch.zeros_like(got) if want is None else want.double().reshape(got.shape)
        error = float((got - want_t).norm() / want_t.norm().clamp_min(1e-30))
        if error > tolerance:
            return f"Σ δ āᵀ is {error:.2g} off its {what}'s gradient, relative"
    return None
