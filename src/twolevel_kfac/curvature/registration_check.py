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
    if torch.compiler.is_compiling():  # a probe is no graph to trace: an eager capture's
        return
    if entry.statistics is not None or entry.rows_from_inputs or not output.requires_grad:
        _CHECKED.add(entry)  # a block type of its own, or a table: its own contract
        return
    weight, bias = layer_weight(module), layer_bias(module)
    rerun, copies = _own_use(module, inputs)
    if rerun is None or not isinstance(rerun, Tensor):
        _CHECKED.add(entry)  # a forward that cannot run alone: not probed
        return
    generator = torch.Generator().manual_seed(20261204)  # not torch's stream nor seed 0's
    probe = torch.randn(rerun.shape, generator=generator).to(rerun)
    wanted = [copies.get(id(p)) if p is not None else None for p in (weight, bias)]
    trained = [c for c in wanted if c is not None and c.requires_grad]
    grads = iter(torch.autograd.grad(rerun, trained, probe, allow_unused=True))
    expected = tuple(next(grads) if c is not None and c.requires_grad else None for c in wanted)
    with torch.no_grad():
        a = input_features(module, inputs.detach()).double()
        g = output_gradients(module, probe).double()
        problem = _mismatch(weight, bias, a, g, expected, rerun.dtype)
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


def _own_use(module: nn.Module, inputs: Tensor) -> tuple[Tensor | None, dict[int, Tensor]]:
    """``module.forward`` run again on a detached input with detached copies of its (and
    its submodules') parameters (by the originals' ids) and without its submodules' hooks:
    autograd's gradient of its own use, which neither a tied use, nor the user's graph, nor
    hooks see (``None`` where that forward fails)."""
    copies: dict[int, Tensor] = {}
    swapped, hooks = [], []
    for owner in module.modules():
        for key, param in list(owner._parameters.items()):
            if param is not None:
                copy = copies.setdefault(id(param), param.detach().requires_grad_(True))
                swapped.append((owner, key, param))
                owner._parameters[key] = copy  # type: ignore[assignment]
        hooks.append((owner, dict(owner._forward_hooks), dict(owner._forward_pre_hooks)))
        owner._forward_hooks.clear()
        owner._forward_pre_hooks.clear()
    try:
        with torch.enable_grad():
            return module.forward(inputs.detach()), copies
    except Exception:  # any failure: the probe is skipped, not the step
        return None, copies
    finally:
        for owner, key, param in swapped:
            owner._parameters[key] = param
        for owner, post, pre in hooks:
            owner._forward_hooks.update(post)
            owner._forward_pre_hooks.update(pre)


def _mismatch(
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    g: Tensor,
    expected: tuple[Tensor | None, ...],
    dtype: torch.dtype,
) -> str | None:
    """Why ``Σ δ āᵀ`` (and ``Σ δ`` for the bias) is not the autograd gradient, or ``None``."""
    rows = int(g.shape[-1])
    if weight.numel() % rows or a.shape[-1] * rows != weight.numel():
        return (
            f"ā has {a.shape[-1]} and δ {rows} columns, but the weight has shape "
            f"{tuple(weight.shape)}"
        )
    half = torch.float16, torch.bfloat16  # a half-precision weight or autocast output
    tolerance = 5e-2 if dtype in half or weight.dtype in half else 1e-5
    pairs = []
    if weight.requires_grad:
        pairs.append((torch.einsum("nto,nti->oi", g, a), expected[0], "weight"))
    if bias is not None and bias.requires_grad:
        pairs.append((g.sum(dim=(0, 1)), expected[1], "bias"))
    for got, want, what in pairs:
        want_t = torch.zeros_like(got) if want is None else want.double().reshape(got.shape)
        error = float((got - want_t).norm() / want_t.norm().clamp_min(1e-30))
        if error > tolerance:
            return f"Σ δ āᵀ is {error:.2g} off its {what}'s gradient, relative"
    return None
