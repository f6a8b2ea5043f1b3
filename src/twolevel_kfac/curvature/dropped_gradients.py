"""Captured forwards whose gradients the user dropped before the step: their statistics
are not the step's.

A forward counts as a sample once the user's backward reaches it, and its statistics wait
for the next ``step()``. A gradient dropped in between (``zero_grad()``, which sets it to
``None`` or, with ``set_to_none=False``, zeroes it in place) takes that forward out of the
step, and its statistics must go too:

* a GAN's generator step backpropagates through the discriminator ``D`` (its forward of
  the fakes), whose gradients ``D.zero_grad()`` drops before ``D``'s own step: ``D``'s
  factors held that forward (a step 0.79 off the one of ``D``'s own forwards in a trial);
* an adversarial attack's ``torch.autograd.grad`` with respect to the input reaches the
  model's output and writes no gradient: its forwards were samples (0.29 to 0.70 off).

Recognised at the start of each backward through a captured forward
(:func:`backward_started`): a forward of an earlier backward (another graph task) that
computed no layer gradient (an attack's gradient of the input, before or after the
training backward; a ``torch.autograd.grad`` of the parameters computes them: they are
counted by a hook on each parameter, :class:`Marks`, which clipping, a ``GradScaler`` or
an assigned ``.grad`` leave alone), judged at the next backward or at the step
(:func:`settle`), is no sample; and where every layer's gradient is ``None`` now, or zero
after a change since a backward wrote it (:func:`_dropped`), the earlier backwards'
gradients are gone (``reset``). Forwards of one backward (two views, one loss) are never
dropped by each other. A gradient the user composes and assigns before the step
(``p.grad = g``: PCGrad over separate forwards, micro-batches clipped one by one and
summed) holds the reset forwards: at a step whose layer gradients are not the tensors a
backward wrote, they count again (and so does a GAN discriminator's
``p.grad = p.grad.clone()``, which cannot be told from it). Not recognised: a composed
gradient written into the backward's tensor (``p.grad.copy_(acc)`` after
``zero_grad(set_to_none=False)``, ``p.grad.data = g``): it cannot be told from the
backward's gradient clipped (``clip_grad_value_``), or averaged by DDP, in place; the
forwards whose gradients were zeroed stay out (assign ``p.grad = acc`` instead). Of
several backwards through the same forward, those whose gradients ``.grad`` holds give
its calls' ``δ`` (:func:`held_deltas`, from the backwards the parameters' hooks saw;
:func:`still_held` as the backwards run, where torch does not tell the backward).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .blocks import block_parameters

if TYPE_CHECKING:
    from .forward_pass import ForwardPass, Record

__all__ = [
    "Marks",
    "backward_started",
    "graph_task",
    "held_deltas",
    "layer_writes",
    "settle",
    "still_held",
    "writes",
]

_WRITTEN = "_tlkfac_written_by_backward"  # on a .grad autograd accumulated into: its version


def graph_task() -> int | None:
    """The id of the backward (autograd graph task) running now, where torch tells it."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else int(current())


_WRITES = "_tlkfac_gradient_writes"  # on a parameter: the gradients backwards computed


def writes(layers: dict[str, nn.Module]) -> tuple[int, ...]:
    """How many gradients backwards computed for each layer (:class:`Marks`): a count
    that clipping, a ``GradScaler`` or a ``.grad`` the user assigns leave alone."""
    return tuple(layer_writes(module) for module in layers.values())


def _counting(param: Tensor) -> Callable[[Tensor], None]:
    """A tensor hook on ``param`` that counts each gradient a backward computes for it,
    accumulated (``loss.backward()``) or handed back (``torch.autograd.grad(loss,
    params)``, the user assigning it after); an attack's gradient of the input alone
    computes none."""
    ref = weakref.ref(param)

    def count(grad: Tensor) -> None:
        held = ref()
        if held is not None:
            task, marks = graph_task(), held.__dict__
            marks[_WRITES] = marks.get(_WRITES, 0) + 1
            marks.setdefault(_COMPUTED, set()).add(task)
            marks[_FRESH] = _dropped(held.grad)  # (what it accumulates into is gone)
            grad.__dict__[_FROM] = task  # (autograd.grad hands this tensor back)

    return count


_TASKS = "_tlkfac_tasks"  # on a .grad: the backwards (graph tasks) accumulated into it
_COMPUTED = "_tlkfac_computed"  # on a parameter: the backwards that computed its gradient
_FRESH = "_tlkfac_fresh"  # on a parameter: its next accumulation starts a new .grad
_ACCUMULATED = "_tlkfac_accumulated"  # on a parameter: the backwards accumulated since a step
_FROM = "_tlkfac_from"  # on a computed gradient: its backward (assigned as is: that one's)


def _written(param: Tensor) -> None:
    """After autograd accumulated into ``param.grad``: mark the tensor with its version (an
    in-place change after it, ``zero_()``, moves the version on) and the backward that
    accumulated (after those since it was made or last dropped)."""
    grad = param.grad
    if grad is not None:
        task, marks, own = graph_task(), param.__dict__, grad.__dict__
        own[_WRITTEN] = grad._version
        tasks = [] if marks.get(_FRESH, True) else own.get(_TASKS, [])
        own[_TASKS] = [*tasks, task]
        marks[_FRESH] = False
        marks.setdefault(_ACCUMULATED, set()).add(task)


class Marks:
    """The hooks that count the gradients a backward computes (:func:`_counting`) and mark
    what it accumulates (:func:`_written`), on every layer parameter that trains by the
    time a backward starts (one frozen when the optimizer was built gets them once it
    trains); their handles go to ``handles``, which remove them."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles, self.hooked = handles, set[int]()

    def cover(self, layers: dict[str, nn.Module]) -> None:
        """Hook the layers' trained parameters that have no hook yet."""
        for module in layers.values():
            for param in module.parameters(recurse=False):
                if param.requires_grad and id(param) not in self.hooked:
                    self.hooked.add(id(param))
                    self.handles.append(param.register_hook(_counting(param)))
                    self.handles.append(param.register_post_accumulate_grad_hook(_written))


def _assigned(grad: Tensor | None) -> bool:
    """Whether a gradient was assigned by the user, not written by a backward: one no
    backward accumulated into, and not a view (DDP's ``gradient_as_bucket_view`` puts its
    bucket's view in ``.grad`` after the backward: taken as assigned, a SAM step under DDP
    was 0.79 off one process's before 2026-12-06 (evening))."""
    return grad is not None and getattr(grad, _WRITTEN, None) is None and grad._base is None


def _composed(layers: dict[str, nn.Module]) -> bool:
    """Whether a layer's gradient was assigned by the user, not written by a backward."""
    return any(_assigned(block_parameters(module)[0].grad) for module in layers.values())


def _dropped(grad: Tensor | None) -> bool:
    """Whether a layer's gradient is gone: ``None``, or changed in place since a backward
    wrote it and zero now (``zero_grad(set_to_none=False)``; a clipped or unscaled one is
    changed but not zero), or a DDP bucket's view (``gradient_as_bucket_view``, which no
    backward marks) zero now. One unchanged since its write is read no further."""
    if grad is None:
        return True
    written = getattr(grad, _WRITTEN, None)
    if grad.layout != torch.strided or grad._version == written:
        return False
    if written is None and grad._base is None:
        return False  # (assigned by the user)
    return not bool(grad.any())


def backward_started(
    forward: ForwardPass, done: list[ForwardPass], layers: dict[str, nn.Module], marks: Marks
) -> list[ForwardPass]:
    """The user's backward reached ``forward``: the forwards of earlier backwards
    (``done``, waiting for the step) that wrote no gradient, or whose gradients are gone,
    are no samples (``backward_done`` cleared; module docstring); returns the forwards now
    waiting, ``forward`` among them."""
    task = graph_task()
    if task is None:  # (a torch that does not say: nothing is dropped)
        return done
    marks.cover(layers)  # (before this backward writes anything)
    now = writes(layers)
    forward.backward_task, forward.writes_seen = task, now
    earlier = [f for f in done if f.backward_task != task]
    reset = bool(earlier) and all(_dropped(block_parameters(m)[0].grad) for m in layers.values())
    for f in earlier:
        if f.writes_seen is not None and f.writes_seen == now:
            f.backward_done = False  # (an attack's backward, of the input: nothing written)
        elif reset and f.backward_done:  # every gradient dropped: none of theirs is left
            f.backward_done, f.reset = False, True
        f.writes_seen = None  # (judged: later backwards write the gradients, not theirs)
    return [*done, forward]


def layer_writes(module: nn.Module) -> int:
    """How many gradients backwards computed for ``module``'s parameters (:class:`Marks`)."""
    return sum(getattr(p, _WRITES, 0) for p in module.parameters(recurse=False))


def still_held(module: nn.Module, seen: int) -> bool:
    """Whether the gradient of a backward through a layer call, ``seen`` its
    :func:`layer_writes` when that backward reached the call, is still in ``.grad``: the
    backward computed the layer's gradient (not an attack's of the input alone) and it
    was not dropped since (:func:`_dropped`). A second backward through the same forward
    (``l1.backward(retain_graph=True); l2.backward()``) adds to it."""
    return layer_writes(module) > seen and not _dropped(block_parameters(module)[0].grad)


def held_deltas(records: Mapping[str, Sequence[Record]], layers: dict[str, nn.Module]) -> None:
    """At the step: each record's ``δ``, the sum of those of the backwards through its call
    (``record.parts``, empirical) whose gradients are in the layer's ``.grad``: the
    backwards that accumulated into it since it was made or last dropped; or, where the
    user assigned it (a composition), those of its forward's backwards that accumulated
    into a ``.grad`` since the last step (PCGrad's per-task ``backward()``s between
    ``zero_grad()``s; one backward of the summed losses beside per-task
    ``autograd.grad``s), else all that computed the layer's gradient (per-task
    ``autograd.grad``s). A ``torch.autograd.grad`` after the training backward (a
    gradient-norm probe, a saliency map) adds nothing (0.4–0.98 off before 2026-12-06
    (evening)), and PCGrad's tasks all count (the last task's alone were kept: 2.8 off).
    Without what torch tells (an older torch), the ``δ`` the hooks kept stand."""
    for name, module in layers.items():
        main = block_parameters(module)[0]
        grad = main.grad
        computed = getattr(main, _COMPUTED, None)
        accumulated: set[int | None] = getattr(main, _ACCUMULATED, set())
        setattr(main, _COMPUTED, set())
        setattr(main, _ACCUMULATED, set())
        composed = _assigned(grad)
        kept = computed if composed else getattr(grad, _TASKS, None)
        if composed and hasattr(grad, _FROM):  # one backward's gradient, assigned as is
            kept = accumulated = {getattr(grad, _FROM)}
        kept = set() if grad is None else None if kept is None else set(kept)
        if kept is None or None in kept or (grad is not None and grad._base is not None):
            continue  # (what torch does not tell, or a DDP bucket's view, whose marks may be
            # an earlier backward's: the δ the hooks kept stand)
        for record in records.get(name, ()):
            tasks = {task for task, _ in record.parts}
            chosen_tasks = (tasks & accumulated or tasks & kept) if composed else tasks & kept
            chosen = [delta for task, delta in record.parts if task in chosen_tasks]
            if record.parts:
                record.grad = sum(chosen[1:], chosen[0]) if chosen else None


def settle(
    done: list[ForwardPass],
    layers: dict[str, nn.Module],
    records: Mapping[str, Sequence[Record]] | None = None,
) -> None:
    """At the step: the last backward's forwards that wrote no gradient are no samples, and
    where the user composed the layers' gradients (assigned, not written by a backward)
    the reset forwards, whose backwards wrote, are samples again (module docstring); the
    ``records``' ``δ`` are those of the backwards whose gradients are held
    (:func:`held_deltas`)."""
    if records is not None:
        held_deltas(records, layers)
    now = writes(layers) if done else ()
    for forward in done:
        if forward.writes_seen is not None and forward.writes_seen == now:
            forward.backward_done = False
    if done and _composed(layers):
        for forward in done:
            if forward.reset:
                forward.backward_done = True
