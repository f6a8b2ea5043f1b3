"""Module hooks that do not keep their owner alive, and the tests for a forward that is not
a training forward of the model's own: one inside a backward pass (activation
checkpointing's recomputation), one with swapped-in parameters (``functional_call``); a
hook on the gradient a backward hands the model output (:func:`on_gradient`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "WeakHook",
    "in_backward",
    "on_gradient",
    "parameters_swapped",
    "registered_parameters",
    "remove_all",
]

_COPIES = frozenset({"ToCopyBackward0", "CloneBackward0", "AliasBackward0"})

Registered = list[tuple[nn.Module, str, "Tensor | None"]]


def registered_parameters(layers: dict[str, nn.Module]) -> Registered:
    """Each layer's ``weight`` and ``bias`` as registered now (``None``: none)."""
    return [(m, key, m._parameters.get(key)) for m in layers.values() for key in ("weight", "bias")]


def parameters_swapped(registered: Registered) -> str | None:
    """Whether a layer runs with other parameters than :func:`registered_parameters` saw
    (``torch.func.functional_call`` swaps them in for its forward): ``"computed"`` where one
    of them is computed from other tensors (fast weights ``θ − α∇``, perturbed weights
    ``θ + ε``, whose gradient reaches the parameters' ``.grad``), ``"other"`` (detached
    copies, an ensemble's stacked leaves, ``vmap``'s per-sample copies), else ``None``."""
    swapped = [t for m, key, p in registered if (t := m._parameters.get(key)) is not p]
    if not swapped:
        return None
    return "computed" if any(t is not None and t.grad_fn is not None for t in swapped) else "other"


def in_backward() -> bool:
    """Whether autograd's engine is running a backward pass on this thread (where
    activation checkpointing recomputes forwards)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class WeakHook:
    """A hook calling a method of the capture while the capture is alive (and its module
    is the one hooked). A copy (``copy.deepcopy(model)``) or a pickle (``torch.save(model)``)
    of the module carries an inert hook: the copy's forwards never feed this optimizer."""

    def __init__(self, capture: weakref.ref[Any], method: str, name: str | None = None) -> None:
        self.capture, self.method, self.name = capture, method, name

    def __call__(self, *args: Any) -> Any:
        """Forward the hook's arguments to the capture's method, and its result (nothing
        once the capture is gone)."""
        target = self.capture() if self.capture is not None else None
        if target is None:
            return None
        if self.name is None:
            return getattr(target, self.method)(*args)
        return getattr(target, self.method)(self.name, *args)

    def __deepcopy__(self, memo: dict[int, Any]) -> WeakHook:
        return WeakHook(None, self.method, self.name)  # type: ignore[arg-type]

    def __reduce__(self) -> tuple[Any, ...]:
        return (WeakHook, (None, self.method, self.name))


def remove_all(handles: list[RemovableHandle]) -> None:
    """Remove every hook handle and empty the list."""
    for handle in handles:
        handle.remove()
    handles.clear()


def on_gradient(output: Tensor, hook: Callable[[Tensor], None]) -> None:
    """Call ``hook`` with the gradient of ``output`` when a backward reaches it, or reaches
    the tensor ``output`` was cast or copied from: a model that computes its loss inside
    ``forward`` and returns a float32 copy of its logits (accelerate's mixed precision
    wraps ``forward`` so) has a backward that never reaches the copy. A hook on the
    autograd node that made the tensor, through casts and clones."""
    node, nr = output.grad_fn, output.output_nr
    while node is not None and type(node).__name__ in _COPIES:
        node, nr = node.next_functions[0]
    if node is None:  # (a leaf: its own gradient)
        output.register_hook(hook)
        return

    def prehook(grads: tuple[Tensor | None, ...]) -> None:
        if grads[nr] is not None:
            hook(grads[nr])  # type: ignore[arg-type]

    node.register_prehook(prehook)
