"""What a forward tells about the training loop that is likely a mistake, said as it is
found (:class:`~.capture.CurvatureCapture` calls these): more forwards than
``accumulation_steps`` under the empirical Fisher, training forwards left in ``eval()``,
and a layer replaced after the optimizer was built (its hooks copied onto the new one)."""

from __future__ import annotations

import warnings

from torch import nn

from ..warning_level import caller_level

__all__ = ["replaced_layer", "warn_eval_forwards", "warn_forwards"]


def warn_forwards(forwards: int, accumulation_steps: int) -> None:
    """Warn that several forwards' empirical ``δ`` were each scaled as a whole batch."""
    warnings.warn(
        f"{forwards} forward passes ran before one step with accumulation_steps="
        f"{accumulation_steps}: fisher='empirical' scales each output gradient by "
        "batch size × accumulation_steps, so a loss averaged over k forwards (two views "
        "of a batch, micro-batches) needs accumulation_steps=k; a loss summing them "
        "needs nothing",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def warn_eval_forwards() -> None:
    """Warn that a step due to capture saw forwards in ``eval()`` mode only (a validation
    pass that left the model there): the factors stay as they are."""
    warnings.warn(
        "the model ran in eval() mode (with gradients) at a step that captures curvature, "
        "and no forward ran in train mode: nothing was captured, and the factors stay as "
        "they are (none before the first capture) for as long as the model stays in "
        "eval(). Call model.train() after a validation pass (and run it under "
        "torch.no_grad())",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def replaced_layer(name: str, module: nn.Module) -> str:
    """What to say when layer ``name``'s hook runs on ``module``, which replaced it after
    the optimizer was built (``torch.ao.quantization.prepare_qat`` swaps modules and copies
    their forward hooks, without ``with_kwargs``): the block belongs to the old module."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return (
        f"layer {name!r} was replaced by a {kind} after the optimizer was built (as "
        "torch.ao.quantization's prepare_qat or convert swaps modules, copying their hooks): "
        "the optimizer's curvature block belongs to the module it replaced. Build the "
        "optimizer after converting the model"
    )
