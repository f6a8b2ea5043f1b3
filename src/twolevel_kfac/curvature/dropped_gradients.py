"""Captured forwards whose gradients the user dropped before the step: their statistics
are not the step's.

A forward counts as a sample once the user's backward reaches it, and its statistics wait
for the next ``step()``. A gradient dropped in between (``zero_grad()``, which sets it to
``None``) takes that forward out of the step, and its statistics must go too:

* a GAN's generator step backpropagates through the discriminator ``D`` (its forward of
  the fakes), whose gradients ``D.zero_grad()`` drops before ``D``'s own step: ``D``'s
  factors held that forward (a step 0.79 off the one of ``D``'s own forwards in a trial);
* an adversarial attack's ``torch.autograd.grad`` with respect to the input reaches the
  model's output and accumulates nothing: its forwards were samples (0.29 to 0.70 off).

Recognised at the start of each backward through a captured forward: where earlier
backwards (other graph tasks) reached captured forwards and every layer's gradient is
``None`` now, none of those backwards' gradients is left, and their forwards are dropped
(:func:`backward_started`); and a forward whose backward left every layer's ``.grad`` as
it found it (the same tensor, not written since), judged at the next backward or at the
step (:func:`without_gradient`), gave none (an attack before or after the training
backward). Forwards of one
backward (two views, one loss) are never dropped by each other. Not recognised: gradients
zeroed in place (``zero_grad(set_to_none=False)``, torch's default before 2.0); gradients
kept outside ``.grad`` (``torch.autograd.grad`` of the parameters, assigned later) are
taken as dropped.
"""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .blocks import block_parameters

if TYPE_CHECKING:
    from .forward_pass import ForwardPass, Record

__all__ = ["backward_started", "without_gradient"]

_MANY = 256  # forwards waiting for a step, said once


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
        if (
            a is not None
            and b is not None
            and (a[0]() is None or a[0]() is not b[0]() or a[1] != b[1])
        ):
            return False
    return True


def without_gradient(done: list[ForwardPass], layers: dict[str, nn.Module]) -> None:
    """At the step: the forwards of ``done`` whose backward left every layer's gradient as
    it found it (module docstring) are no samples (``backward_done`` cleared)."""
    now = grad_state(layers) if done else ()
    for forward in done:
        if forward.grads_seen is not None and _unchanged(forward.grads_seen, now):
            forward.backward_done = False


def backward_started(
    forward: ForwardPass,
    done: list[ForwardPass],
    records: dict[str, list[Record]],
    layers: dict[str, nn.Module],
) -> list[ForwardPass]:
    """The user's backward reached ``forward``: drop the forwards of earlier backwards
    (``done``, waiting for the step) whose gradients are gone (module docstring), and their
    ``records`` (by layer, in place); returns the forwards now waiting, ``forward`` among
    them, and warns when they come to :data:`_MANY`."""
    task = _graph_task()
    if task is None:  # (a torch that does not say: nothing is dropped)
        return done
    now = grad_state(layers)
    forward.backward_task, forward.grads_seen = task, now
    earlier = [f for f in done if f.backward_task != task]
    if all(g is None for g in now):  # every gradient dropped: none of theirs is left
        gone = earlier
    else:  # a backward that wrote no gradient gave none (an attack's, of the input)
        gone = [f for f in earlier if f.grads_seen is not None and _unchanged(f.grads_seen, now)]
    for f in earlier:
        f.grads_seen = None  # (judged: later backwards write the gradients, not theirs)
    if gone:
        dropped = {id(f) for f in gone}
        for f in gone:
            f.backward_done = False
        for kept in records.values():
            kept[:] = [r for r in kept if id(r.owner) not in dropped]
        done = [f for f in done if id(f) not in dropped]
    if len(done) + 1 == _MANY:
        warnings.warn(
            f"{_MANY} forwards reached by a backward wait for this optimizer's next step(), "
            "their inputs held until then (the memory grows): a network not stepped while "
            "another trains through it (a GAN's discriminator during generator steps) keeps "
            "each such forward. Freeze it meanwhile (requires_grad_(False)) or drop its "
            "gradients (zero_grad())",
            RuntimeWarning,
            stacklevel=2,
        )
    return [*done, forward]
