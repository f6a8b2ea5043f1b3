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
from torch.nn.utils.parametrize import ParametrizationList

from ..warning_level import caller_level
from .layer_types import layer_type

__all__ = ["no_block_reason", "warn_unknown_layers"]


def _trained(param: nn.Parameter) -> bool:
    return param.requires_grad


def no_block_reason(
    module: nn.Module, counts: Callable[[nn.Parameter], bool] = _trained
) -> str | None:
    """Why ``module`` is reported: a leaf of a type without a block whose own ``weight``
    has two dimensions or more, or a module of such a type holding an own parameter
    ``[E, …]`` that ``counts`` (trained, in the optimizer's ``params``) of three dimensions
    or more, ``E > 1`` (stacked matrices: a mixture of experts' experts; a per-sample
    perturbation or prompts too; a parametrization's originals aside, warned of apart);
    ``None`` for every other module."""
    if layer_type(module) is not None:
        return None
    weight = module._parameters.get("weight")
    if isinstance(module, nn.EmbeddingBag):  # (a table pooled: a lookup and a sum)
        return (
            "EmbeddingBag has no block type: a bag is a lookup pooled over its slots, "
            "nn.Embedding(..., padding_idx=p)(ids).sum(1) (or .mean(1) over the real slots), "
            "which KFAC preconditions, its padding slots left out"
        )
    if weight is not None and weight.dim() >= 2 and next(module.children(), None) is None:
        return (
            f"{type(module).__name__} has a weight matrix but no block type: if it is a "
            "linear map of its input, convert it to nn.Linear (transformers' Conv1D computes "
            "x @ W + b with W stored [in, out]: tk.linear_from_conv1d(model) swaps each for "
            "the nn.Linear with weight W.T before the optimizer is built) or register its "
            "type (tk.register_layer_type)"
        )
    if isinstance(module, ParametrizationList):
        return None
    stacked = [n for n, p in module._parameters.items() if p is not None and _stacked(p, counts)]
    if not stacked:
        return None
    return (
        f"{type(module).__name__} holds parameters of three or more dimensions "
        f"({', '.join(stacked)}) that no block type covers: stacked matrices, such as the "
        "experts transformers 5 stores for Mixtral and Qwen2-MoE, are preconditioned only "
        "when written as one nn.Linear per expert and matrix"
    )


def _stacked(param: nn.Parameter, counts: Callable[[nn.Parameter], bool]) -> bool:
    return param.dim() >= 3 and param.shape[0] > 1 and counts(param)


def warn_unknown_layers(
    model: nn.Module,
    trains: Callable[[nn.Module], bool],
    unsupported: str,
    counts: Callable[[nn.Parameter], bool] = _trained,
) -> None:
    """Warn of the modules of ``model`` that train (``trains``) and have a
    :func:`no_block_reason`, once per reason (the first three names and how many more, and
    the share of the trainable parameters, those that ``counts``, in them), unless
    ``unsupported="ignore"``."""
    found: dict[str, list[str]] = {}
    held: dict[str, dict[int, int]] = {}  # by reason: each parameter's size, once
    for name, module in model.named_modules():
        reason = no_block_reason(module, counts) if trains(module) else None
        if reason is not None:
            found.setdefault(reason, []).append(repr(name))
            own = (p for p in module.parameters(recurse=False) if counts(p))
            held.setdefault(reason, {}).update((id(p), p.numel()) for p in own)
    total = sum({id(p): p.numel() for p in model.parameters() if counts(p)}.values()) or 1
    for reason, names in found.items() if unsupported != "ignore" else ():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        share = sum(held[reason].values()) / total
        warnings.warn(
            f"module{'s' if len(names) > 1 else ''} {', '.join(names[:3])}{more}: {reason}; "
            f"{'their' if len(names) > 1 else 'its'} parameters ({_percent(share)} of the "
            "model's trained ones) get the un-preconditioned fallback step (fallback='sgd': "
            "momentum SGD; 'adamw': AdamW; unsupported='ignore' silences this)",
            stacklevel=caller_level(),
        )


def _percent(share: float) -> str:
    return f"{share:.0%}" if share >= 0.01 else "under 1%"
