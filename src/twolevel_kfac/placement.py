"""Moving saved state between devices: checkpoints are device-independent.

A state dict (of a preconditioner, a model, a run checkpoint) is a tree of dicts, lists and
tuples with tensors at the leaves. :func:`move_tensors` copies such a tree with every tensor
on another device: the CPU before saving (a checkpoint written on a GPU loads on a machine
without one), the device of the layer's parameters when a preconditioner loads its state
(the optimizers' ``load_state_dict``). Tensors already on the target device are kept as they
are (``Tensor.to`` returns the tensor itself), so a CPU run neither copies nor changes a bit.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar, cast

import torch
from torch import Tensor, nn

__all__ = ["CPU", "autocast_off", "module_device", "move_tensors"]

CPU = torch.device("cpu")

T = TypeVar("T")


def move_tensors(tree: T, device: torch.device, dtype: torch.dtype | None = None) -> T:
    """``tree`` with every tensor in its dicts, lists and tuples on ``device``, floating
    ones in ``dtype`` when given (a new container where something inside moved; other
    leaves as they are)."""
    if isinstance(tree, Tensor):
        floating = dtype is not None and tree.is_floating_point()
        return cast(T, tree.to(device, dtype) if floating else tree.to(device))
    if isinstance(tree, dict):
        return cast(T, {key: move_tensors(value, device, dtype) for key, value in tree.items()})
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):  # not a namedtuple
        return cast(T, type(tree)(move_tensors(value, device, dtype) for value in tree))
    return tree


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU if it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return CPU


def autocast_off(tensor: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context that leaves any ``torch.autocast`` region of ``tensor``'s device type (a
    no-op outside one: entering ``torch.autocast`` costs about 3 µs)."""
    device_type = tensor.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = True
    except RuntimeError:  # a device type without autocast (meta): nothing to leave
        enabled = False
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
