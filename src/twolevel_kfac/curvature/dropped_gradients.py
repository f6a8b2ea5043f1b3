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
``None`` now, none of those backwards' gradients is left, and their forwards are dropped.
Forwards of one backward (two views, one loss) are never dropped by each other. Not
recognised: gradients zeroed in place (``zero_grad(set_to_none=False)``, torch's default
before 2.0), gradients kept outside ``.grad`` (``torch.autograd.grad`` of the parameters,
assigned later: those forwards are dropped at the next backward, as if zeroed).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import block_parameters

if TYPE_CHECKING:
    from .forward_pass import ForwardPass, Record

__all__ = ["backward_started"]

_MANY = 256  # forwards waiting for a step, said once


def _graph_task() -> int | None:
    """The id of the backward (autograd graph task) running now, where torch tells it."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else int(current())


def _all_dropped(layers: dict[str, nn.Module]) -> bool:
    """Whether no layer holds a gradient (each block's first trained parameter)."""
    return all(block_parameters(module)[0].grad is None for module in layers.values())


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
    forward.backward_task = task
    earlier = [f for f in done if f.backward_task != task]
    if earlier and _all_dropped(layers):
        gone = {id(f) for f in earlier}
        for f in earlier:
            f.backward_done = False
        for kept in records.values():
            kept[:] = [r for r in kept if id(r.owner) not in gone]
        done = [f for f in done if id(f) not in gone]
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
