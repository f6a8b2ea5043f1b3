"""Captured forwards whose gradients the user dropped before the step: their statistics
are not the step's.

A forward counts as a sample once the user's backward reaches it, and its statistics wait
for the next ``step()``. A gradient dropped in between (``zero_grad()``, which sets it to
``None``) takes that forward out of the step, and its statistics must go too:

* a GAN's generator step backpropagates through the discriminator ``D`` (its forward of
  the fakes), whose gradients ``D.zero_grad()`` drops before ``D``'s own step: ``D``'s
  factors held that forward (a step 0.79 off the one of ``D``'s own forwards in a trial);
* an adversarial attack's ``torch.autograd.grad`` with respect to the input reaches the
  model's output and writes no gradient: its forwards were samples (0.29 to 0.70 off).

Recognised at the start of each backward through a captured forward (:func:`backward_started`):
where earlier backwards (other graph tasks) reached captured forwards and every layer's
gradient is ``None`` now, their gradients are gone (``reset``); and a forward whose backward
left every layer's ``.grad`` as it found it (the same tensor, unwritten), judged at the
next backward or at the step (:func:`settle`), wrote none (an attack before or after the
training backward). Forwards of one backward (two views, one loss) are never dropped by
each other. A gradient the user composes and assigns before the step (``p.grad = g``:
PCGrad over separate forwards, micro-batches clipped one by one and summed) holds forwards
whose ``.grad`` was reset: at a step whose layer gradients were not written by a backward
(:func:`mark_accumulation`), the reset forwards count again. Not recognised: gradients
zeroed in place (``zero_grad(set_to_none=False)``, torch's default before 2.0), a composed
gradient written into the backward's tensor (``p.grad.copy_(g)``, ``p.grad.data = g``).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .blocks import block_parameters

if TYPE_CHECKING:
    from .forward_pass import ForwardPass

__all__ = ["backward_started", "mark_accumulation", "settle"]

_WRITTEN = "_tlkfac_written_by_backward"  # set on a .grad that autograd accumulated into


def _graph_task() -> int | None:
    """The id of the backward (autograd graph task) running now, where torch tells it."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else int(current())


GradState = tuple["tuple[weakref.ref[Tensor], int] | None", ...]
"""Each layer's ``.grad`` (its first trained parameter's): the tensor, held weakly, and its
version (an accumulation writes it), or ``None``."""


def grad_state(layers: dict[str, nn.Module]) -> GradState:
    """The layers' gradients as they are now (:data:`GradState`)."""
    grads = (block_parameters(module)[0].grad for module in layers.values())
    return tuple(None if g is None else (weakref.ref(g), g._version) for g in grads)


def _unchanged(before: GradState, now: GradState) -> bool:
    """Whether no layer's gradient was written, set or dropped between two states."""
    for a, b in zip(before, now, strict=True):
        if (a is None) != (b is None):
            return False
        if a is not None and b is not None and (a[0]() is None or a[0]() is not b[0]()):
            return False
        if a is not None and b is not None and a[1] != b[1]:
            return False
    return True


def _mark(param: Tensor) -> None:
    if param.grad is not None:
        setattr(param.grad, _WRITTEN, True)


def mark_accumulation(layers: dict[str, nn.Module]) -> list[RemovableHandle]:
    """Mark each ``.grad`` that autograd accumulates into, for the layers' trained
    parameters (a post-accumulate-grad hook each: a parameter frozen now has none, and its
    ``.grad`` once unfrozen counts as composed); the handles remove them."""
    params = {
        id(p): p for m in layers.values() for p in m.parameters(recurse=False) if p.requires_grad
    }
    return [p.register_post_accumulate_grad_hook(_mark) for p in params.values()]


def _composed(layers: dict[str, nn.Module]) -> bool:
    """Whether a layer's gradient was assigned by the user, not written by a backward."""
    grads = (block_parameters(module)[0].grad for module in layers.values())
    return any(g is not None and not getattr(g, _WRITTEN, False) for g in grads)


def backward_started(
    forward: ForwardPass, done: list[ForwardPass], layers: dict[str, nn.Module]
) -> list[ForwardPass]:
    """The user's backward reached ``forward``: the forwards of earlier backwards
    (``done``, waiting for the step) whose gradients are gone or were never written are
    no samples (``backward_done`` cleared; module docstring); returns the forwards now
    waiting, ``forward`` among them."""
    task = _graph_task()
    if task is None:  # (a torch that does not say: nothing is dropped)
        return done
    now = grad_state(layers)
    forward.backward_task, forward.grads_seen = task, now
    earlier = [f for f in done if f.backward_task != task]
    reset = all(g is None for g in now)  # every gradient dropped: none of theirs is left
    for f in earlier:
        if reset and f.backward_done:
            f.backward_done, f.reset = False, True
        elif f.grads_seen is not None and _unchanged(f.grads_seen, now):
            f.backward_done = False  # (an attack's backward, of the input: nothing written)
        f.grads_seen = None  # (judged: later backwards write the gradients, not theirs)
    return [*done, forward]


def settle(done: list[ForwardPass], layers: dict[str, nn.Module]) -> None:
    """At the step: the last backward's forwards that wrote no gradient are no samples, and
    where the user composed the layers' gradients (assigned, not written by a backward)
    the reset forwards are samples again (module docstring)."""
    if not done:
        return
    now = grad_state(layers)
    for forward in done:
        if forward.grads_seen is not None and _unchanged(forward.grads_seen, now):
            forward.backward_done = False
    if _composed(layers):
        for forward in done:
            if forward.reset:
                forward.backward_done = True
