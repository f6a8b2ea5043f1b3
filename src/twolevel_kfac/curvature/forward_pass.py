"""The forward pass in flight while :class:`~.capture.CurvatureCapture` records it: its
Fisher mini-batch, each layer call's captured rows, and the hooks its backward fires."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from .captured_batch import scaled_gradient
from .dropped_gradients import graph_task, layer_writes, still_held

__all__ = [
    "ForwardPass",
    "Record",
    "check_first_order",
    "empirical_hook",
    "fisher_rows",
    "inputs_of",
]


@dataclass
class Record:
    """One call's captured rows of one layer (one module use)."""

    module: nn.Module
    inputs: Tensor
    owner: ForwardPass  # the forward pass it belongs to
    grad: Tensor | None = None
    reshaped: bool = False  # its rows in the batch's order (calls.sample_major)
    writes: int = 0  # the layer's gradient writes when a backward last reached it
    # empirical: each backward's (graph task, δ), summed at the step over those whose
    # gradients are in .grad (dropped_gradients.held_deltas)
    parts: list[tuple[int | None, Tensor]] = field(default_factory=list)


@dataclass
class ForwardPass:
    """State of the forward pass in flight."""

    index: Tensor | None  # the Fisher mini-batch's rows of the batch (None: all of them)
    batch_size: int
    mask: Tensor | None = None  # the positions the loss counts (set_loss_mask)
    first: Tensor | None = None  # the model's first tensor argument (the batch)
    other_rows: tuple[int, ...] = ()  # a batch of one: its other tensor arguments' rows
    padding: Tensor | None = None  # the real positions [N, T] (padding_mask)
    aligned: bool = False  # the layers' rows must be the samples in order (row_order)
    # autograd nodes of layer outputs whose rows are k per sample in the batch's order
    ordered: set[Node] = field(default_factory=set)
    # autograd nodes of layer outputs not computed from parameters alone (their inputs'
    # walks stopped without a proof: forward_checks.check_batched_input)
    per_sample: set[Node] = field(default_factory=set)
    # a Linear's or an Embedding's output node: its input (batch_dim follows a dimension
    # through it); and
    # the (node, dimension) pairs batch_dim found leading to the batch
    through: dict[Node, Tensor] = field(default_factory=dict)
    batch_led: set[tuple[Node, int, int]] = field(default_factory=set)
    backward_done: bool = False  # the user's loss.backward() ran through this forward
    backward_task: int | None = None  # the id of that backward (dropped_gradients)
    writes_seen: tuple[int, ...] | None = None  # the layers' gradient writes by then
    reset: bool = False  # its gradients were dropped since (it counts if the user composes)
    # called (held weakly) as the user's backward first reaches this forward
    on_backward: Callable[[], Callable[[ForwardPass], None] | None] | None = None
    # fisher="mc": each call's output edge (an in-place op after it does not move it)
    outputs: dict[str, list[GradientEdge]] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)
    positions: int | None = None  # the output's positions per sample (live_positions)
    reached: Tensor | None = None  # its output's positions [N, T] with a loss term

    def mark_backward(self) -> None:
        """The user's backward reached this forward (:attr:`on_backward` at the first)."""
        started = None if self.backward_done or self.on_backward is None else self.on_backward()
        if started is not None:
            started(self)
        self.backward_done = True

    def release(self) -> None:
        """Let go of the records and autograd nodes once the forward has returned (the
        nodes hold hooks that name this forward: a cycle only Python's collector frees)."""
        for held in (self.records, self.outputs, self.ordered, self.per_sample, self.through):
            held.clear()
        self.batch_led.clear()

    def add_output(self, node: Node, module: nn.Module, inputs: Tensor) -> None:
        """A layer's output node (:attr:`per_sample`; a ``Linear``'s :attr:`through`)."""
        self.per_sample.add(node)
        if isinstance(module, (nn.Linear, nn.Embedding)):  # (leading dimensions: its input's)
            self.through[node] = inputs

    @property
    def samples(self) -> int:
        """``N``: the samples of its Fisher mini-batch."""
        return self.batch_size if self.index is None else int(self.index.numel())


def fisher_rows(tensor: Tensor, forward: ForwardPass) -> Tensor:
    """The Fisher mini-batch's rows of a batched tensor: of ``k·B`` rows (a layer's input
    proved ``k`` per sample in the batch's order, ``calls.sample_major``: others are
    refused before), the ``k`` of each of its samples."""
    index, batch = forward.index, forward.batch_size
    if index is None:
        return tensor
    if (rows := int(tensor.shape[0])) != batch and rows % batch == 0:
        k = rows // batch
        index = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
    return tensor.index_select(0, index)


def inputs_of(tensor: Tensor) -> tuple[Node, ...]:
    """The nodes a backward reaches after ``tensor``'s producer (held instead of the
    producer by a hook on the tensor, which the producer holds: no reference cycle)."""
    node = tensor.grad_fn
    return () if node is None else tuple(n for n, _ in node.next_functions if n is not None)


def _goes_on(nodes: tuple[Node, ...]) -> bool:
    """Whether the backward running now goes on past a tensor into what made it (``nodes``:
    :func:`inputs_of`): not for ``autograd.grad(…, inputs=tensor)``, which stops there."""
    try:
        will_run = torch._C._will_engine_execute_node
        return any(will_run(n) for n in nodes)
    except (AttributeError, RuntimeError):  # (another torch: taken as going on)
        return True


def check_first_order(where: str, nodes: tuple[Node, ...]) -> None:
    """Refuse a backward that builds a graph of its own (``create_graph=True``: grad mode
    is on inside it) through a captured forward, seen by the hook at ``where`` on a tensor
    (``nodes``: :func:`inputs_of`): a physics-informed loss's ``torch.autograd.grad(u, x,
    create_graph=True)``, a gradient penalty through the model. The hooks would take that
    backward's output gradients (``∂u/∂s``) for the loss's, and the weight gradient of
    such a loss is not ``Σ δ āᵀ``. A backward that stops at the tensor (a critic's penalty
    ``autograd.grad(D(out), out, create_graph=True)`` on the model output) goes through
    nothing of the model, and passes.

    Raises:
        RuntimeError: naming where, and what is and is not supported.
    """
    if torch.is_grad_enabled() and _goes_on(nodes):
        raise RuntimeError(
            f"a backward with create_graph=True reached {where} in a forward the optimizer "
            "captures (torch.autograd.grad of the model's outputs for a physics-informed "
            "residual or a gradient penalty, loss.backward(create_graph=True), or a torch.func "
            "transform through the model): KFAC "
            "takes a loss of the model's outputs, and its statistics would hold this "
            "backward's gradients as the loss's. Losses with derivatives of the model are "
            "not supported (KFAC for them: Dangel et al. 2024, arXiv 2405.15603)"
        )


def empirical_hook(
    name: str, record: Record, forward: ForwardPass, scale: float, output: Tensor
) -> Callable[[Tensor], None]:
    """The tensor hook on layer ``name``'s ``output`` that keeps the user's backward's
    ``δ = scale · ∂loss/∂s`` (``scale = B·k``) of the Fisher mini-batch rows; a second
    backward through the same forward whose first's gradient is still in ``.grad``
    (``l1.backward(retain_graph=True); l2.backward()``) adds its ``δ``: the per-sample
    gradients of ``l1 + l2`` (the last alone was kept before 2026-12-06 (evening): steps
    0.9–2.0 off in a trial)."""
    nodes = inputs_of(output)

    def grad_hook(grad: Tensor) -> None:
        check_first_order(f"layer {name!r}", nodes)
        forward.mark_backward()
        delta = scaled_gradient(fisher_rows(grad.detach(), forward), scale)
        record.parts.append((graph_task(), delta))
        if record.grad is not None and still_held(record.module, record.writes):
            delta = record.grad + delta
        record.grad, record.writes = delta, layer_writes(record.module)

    return grad_hook
