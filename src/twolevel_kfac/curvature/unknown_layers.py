"""Modules of a type without a curvature block that hold a weight matrix of their own
(transformers' ``Conv1D``, ``nn.Bilinear``, ``nn.EmbeddingBag``, a custom linear layer):
their parameters take the fallback step, where a linear map would have a block. A
warning says so, once per type (a GPT-2 has four ``Conv1D`` per block), rather than
``describe_blocks()`` alone; nothing is refused, since such a module may be no linear map
at all (a position table, a codebook), and ``unsupported="ignore"`` silences it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from ..warning_level import caller_level
from .layer_types import layer_type

__all__ = ["no_block_reason", "warn_unknown_layers"]


def no_block_reason(module: nn.Module) -> str | None:
    """Why ``module`` is reported: a leaf of a type without a block whose own ``weight``
    has two dimensions or more, or a module of such a type holding an own parameter
    ``[E, …]`` of three dimensions or more, ``E > 1`` (stacked matrices: a mixture of
    experts' experts; a per-sample perturbation or prompts too); ``None`` for every other
    module."""
    if layer_type(module) is not None:
        return None
    weight = module._parameters.get("weight")
    if weight is not None and weight.dim() >= 2 and next(module.children(), None) is None:
        return (
            f"{type(module).__name__} has a weight matrix but no block type: if it is a "
            "linear map of its input, convert it to nn.Linear (transformers' Conv1D computes "
            "x @ W + b with W stored [in, out]: tk.linear_from_conv1d(model) swaps each for "
            "the nn.Linear with weight W.T before the optimizer is built) or register its "
            "type (tk.register_layer_type)"
        )
    stacked = [n for n, p in module._parameters.items() if _stacked(p)]
    if not stacked:
        return None
    return (
        f"{type(module).__name__} holds parameters of three or more dimensions "
        f"({', '.join(stacked)}) that no block type covers: stacked matrices, such as the "
        "experts transformers 5 stores for Mixtral and Qwen2-MoE, are preconditioned only "
        "when written as one nn.Linear per expert and matrix"
    )


def _stacked(param: nn.Parameter | None) -> bool:
    return param is not None and param.dim() >= 3 and param.shape[0] > 1


def warn_unknown_layers(
    model: nn.Module, trains: Callable[[nn.Module], bool], unsupported: str
) -> None:
    """Warn of the modules of ``model`` that train (``trains``) and have a
    :func:`no_block_reason`, once per reason (the first three names and how many more, and
    their share of the model's trainable parameters), unless ``unsupported="ignore"``."""
    found: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, module in model.named_modules():
        reason = no_block_reason(module) if trains(module) else None
        if reason is not None:
            found.setdefault(reason, []).append(repr(name))
            own = (p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
            sizes[reason] = sizes.get(reason, 0) + sum(own)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad) or 1
    for reason, names in found.items() if unsupported != "ignore" else ():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        warnings.warn(
            f"module{'s' if len(names) > 1 else ''} {', '.join(names[:3])}{more}: {reason}; "
            f"{'their' if len(names) > 1 else 'its'} parameters ({sizes[reason] / total:.0%} "
            "of the model's trainable ones) get the un-preconditioned fallback step "
            "(fallback='sgd': momentum SGD; 'adamw': AdamW; unsupported='ignore' silences "
            "this)",
            stacklevel=caller_level(),
        )
