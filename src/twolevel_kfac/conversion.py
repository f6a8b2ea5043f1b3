"""Modules that compute ``x @ W + b`` with their weight stored ``[in, out]`` (transformers'
``Conv1D``: every attention and MLP weight of GPT-2, GPT and their kin) swapped for the
``nn.Linear`` that computes the same map with the weight ``Wᵀ``, so that KFAC gives them a
block: a weight stored the other way round has none (they took the fallback step, with a
warning), and registering the type with ``Linear``'s functions is refused by the
registration probe (its gradient is the transpose of theirs).

The swap happens in place, before the optimizer is built; :func:`conv1d_from_linear` puts
the original modules back with the trained weights (for ``save_pretrained``, whose
checkpoints keep the ``[in, out]`` layout). Only modules that say they are such a layer are
swapped: a leaf named ``Conv1D`` with ``nf`` outputs and ``nx`` inputs and a weight of
shape ``[nx, nf]``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv1d_from_linear", "linear_from_conv1d"]


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers-style ``Conv1D`` (module docstring)."""
    weight = module._parameters.get("weight")
    return (
        type(module).__name__ == "Conv1D"
        and next(module.children(), None) is None
        and weight is not None
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    )


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _shared(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """The other modules of ``model`` that hold a parameter of ``module`` (tied weights)."""
    own = {id(p) for p in module.parameters(recurse=False)}
    return [
        other
        for other, m in model.named_modules(remove_duplicate=False)
        if other != name and any(id(p) in own for p in m.parameters(recurse=False))
    ]


def linear_from_conv1d(model: nn.Module) -> dict[str, nn.Module]:
    """Swap every ``Conv1D`` of ``model`` (``y = x W + b``, ``W`` of shape ``[in, out]``)
    for the ``nn.Linear`` with weight ``Wᵀ`` and the same bias, in place: the same outputs,
    and a KFAC block for each. Build the optimizer after this.

    Returns:
        The swapped modules by name, for :func:`conv1d_from_linear`.

    Raises:
        ValueError: if a ``Conv1D``'s parameter is also another module's (a tied weight,
            which two separate parameters would untie).
    """
    swapped: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not _is_conv1d(module):
            continue
        if shared := _shared(model, name, module):
            raise ValueError(
                f"{name!r} ({type(module).__name__}) shares a parameter with {shared}: "
                "a Linear in its place would untie them; leave it out of the swap"
            )
        weight, bias = module.weight, module._parameters.get("bias")
        linear = nn.Linear(
            weight.shape[0], weight.shape[1], bias is not None, weight.device, weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
                linear.bias.requires_grad_(bias.requires_grad)
        linear.weight.requires_grad_(weight.requires_grad)
        linear.train(module.training)
        _set(model, name, linear)
        swapped[name] = module
    return swapped


def conv1d_from_linear(model: nn.Module, swapped: dict[str, nn.Module]) -> None:
    """Put back the modules :func:`linear_from_conv1d` swapped out, each with its
    ``Linear``'s trained weight transposed into its own ``[in, out]`` weight and the bias
    copied (before ``save_pretrained``; an optimizer built on the ``Linear`` layers no
    longer steps them).

    Raises:
        ValueError: if a module named in ``swapped`` is no longer a ``Linear`` of the
            original's shape.
    """
    for name, original in swapped.items():
        linear = model.get_submodule(name)
        weight, bias = original._parameters["weight"], original._parameters.get("bias")
        assert weight is not None
        if not isinstance(linear, nn.Linear) or linear.weight.shape != weight.shape[::-1]:
            raise ValueError(f"{name!r} is not the Linear that linear_from_conv1d put there")
        with torch.no_grad():
            weight.copy_(linear.weight.t())
            if bias is not None and linear.bias is not None:
                bias.copy_(linear.bias)
        _set(model, name, original)
