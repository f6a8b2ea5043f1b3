"""Weight initialisation shared by the model modules (``models``, ``sequence_models``)."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

__all__ = ["init_weights"]

M = TypeVar("M", bound=nn.Module)


def init_weights(model: M) -> M:
    """Xavier-uniform weights, zero biases for Linear/Conv2d; BN weight 1, bias 0.

    Args:
        model: Module to initialise in place.

    Returns:
        The same module.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
