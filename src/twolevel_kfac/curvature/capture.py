"""Capture of per-layer inputs ``a`` and pre-activation gradients ``δ`` with module hooks.

The training loop stays ``loss = loss_fn(model(x), y); loss.backward(); opt.step()``. On a
step where the factors are refreshed (``capture.active``), during ``model(x)``:

1. a forward *pre*-hook on the root module picks the Fisher mini-batch: a random subset of
   ``round(fisher_batch · B)`` rows of the batch (all rows when ``fisher_batch = 1``);
2. a forward hook on every preconditioned layer keeps the subset's layer input (detached);
3. the gradients ``δ`` come from either
   * ``fisher="empirical"``: a tensor hook on the layer output, fired by the user's own
     ``loss.backward()``; ``δ_n = B · ∂loss/∂s_n`` because the loss is a mean over the batch;
   * ``fisher="mc"``: a forward hook on the root module samples targets from the model's
     predictive distribution (:mod:`.likelihoods`) for the subset rows and runs
     ``torch.autograd.grad(Σ_n ℓ_n(ŷ_n), layer_outputs, retain_graph=True)`` before the
     forward returns. The user's backward later reuses the retained graph untouched.

Several forwards before one ``step()`` (gradient accumulation) append their samples; with
``k`` micro-batches whose losses are divided by ``k``, ``accumulation_steps=k`` scales the
empirical ``δ`` by ``B·k`` so the statistics equal those of the whole batch.
Nothing is captured in ``eval()`` mode, under ``torch.no_grad()``, or when inactive.
The random draws (the subset, the MC targets) use the optimizer's CPU generator whatever the
model's device (the subset's indices, then the targets, are moved to the data's device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .blocks import LayerStats, input_features, output_gradients
from .likelihoods import sampled_nll

FISHER_TYPES = ("mc", "empirical")


@dataclass
class _Record:
    """One forward call's captured rows of one layer."""

    inputs: Tensor
    grad: Tensor | None = None


@dataclass
class _Forward:
    """State of the forward pass in flight."""

    index: Tensor | None
    batch_size: int
    outputs: dict[str, Tensor] = field(default_factory=dict)
    records: dict[str, _Record] = field(default_factory=dict)


def _rows(tensor: Tensor, forward: _Forward) -> Tensor:
    """The Fisher mini-batch's rows of a batched tensor."""
    return tensor if forward.index is None else tensor.index_select(0, forward.index)


def first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


class CurvatureCapture:
    """Hooks that collect :class:`LayerStats` of the Fisher mini-batch for named layers."""

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, nn.Module],
        fisher: str,
        likelihood: str,
        fisher_batch: float,
        generator: torch.Generator,
        accumulation_steps: int = 1,
    ) -> None:
        self.model = model
        self.layers = layers
        self.fisher = fisher
        self.likelihood = likelihood
        self.fisher_batch = fisher_batch
        self.generator = generator
        self.accumulation_steps = accumulation_steps
        self.active = False
        self._forward: _Forward | None = None
        self._records: dict[str, list[_Record]] = {name: [] for name in layers}
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True),
        ]
        if fisher == "mc":
            self._handles.append(model.register_forward_hook(self._root_hook))
        for name, module in layers.items():
            self._handles.append(module.register_forward_hook(self._layer_hook(name)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _capturing(self, module: nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _root_pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._forward = None
        if not self._capturing(module):
            return
        x = first_tensor(args, kwargs)
        if x is None or x.dim() == 0:
            raise RuntimeError("KFAC capture: the model's first argument must be a batched tensor")
        batch = int(x.shape[0])
        index = None
        if self.fisher_batch < 1.0:
            size = max(1, round(self.fisher_batch * batch))
            perm = torch.randperm(batch, generator=self.generator)
            index = perm[:size].sort().values.to(x.device)
        self._forward = _Forward(index=index, batch_size=batch)

    def _layer_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            forward = self._forward
            if forward is None or not self._capturing(module):
                return
            if name in forward.records:
                raise RuntimeError(
                    f"layer {name!r} ran twice in one forward pass; KFAC does not support "
                    "weight sharing across calls"
                )
            record = _Record(inputs=_rows(args[0].detach(), forward))
            forward.records[name] = record
            self._records[name].append(record)
            if self.fisher == "mc":
                forward.outputs[name] = output
            elif output.requires_grad:
                scale = float(forward.batch_size * self.accumulation_steps)

                def grad_hook(grad: Tensor) -> None:
                    record.grad = _rows(grad.detach(), forward) * scale

                output.register_hook(grad_hook)

        return hook

    def _root_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        forward = self._forward
        if forward is None or not forward.outputs:
            return
        if not isinstance(output, Tensor):
            raise TypeError("fisher='mc' needs a model that returns one tensor of outputs")
        if not output.requires_grad or not bool(torch.isfinite(output.detach()).all()):
            forward.outputs.clear()  # a non-finite output gives no statistics this step
            return
        names = list(forward.outputs)
        loss = sampled_nll(_rows(output, forward), self.likelihood, self.generator)
        grads = torch.autograd.grad(
            loss, [forward.outputs[n] for n in names], retain_graph=True, allow_unused=True
        )
        unreached = [name for name, grad in zip(names, grads, strict=True) if grad is None]
        if unreached:
            forward.outputs.clear()
            raise RuntimeError(
                f"fisher='mc' cannot differentiate the sampled loss with respect to the "
                f"output of layer(s) {unreached}: they do not reach the model output in "
                "autograd's graph (a torch.compile'd model hides its layers' outputs this "
                "way; its Fisher would silently be zero). Use fisher='empirical' or an "
                "eager model"
            )
        for name, grad in zip(names, grads, strict=True):
            forward.records[name].grad = _rows(grad.detach(), forward)
        forward.outputs.clear()

    def has_statistics(self) -> bool:
        return any(r.grad is not None for records in self._records.values() for r in records)

    def collect(self) -> dict[str, LayerStats]:
        """The statistics gathered since the last call (forwards whose backward has run), in
        ``[N, T, features]`` format; clears the buffers."""
        stats: dict[str, LayerStats] = {}
        for name, module in self.layers.items():
            done = [r for r in self._records[name] if r.grad is not None]
            self._records[name] = []
            if not done:
                continue
            a = torch.cat([input_features(module, r.inputs) for r in done])
            g = torch.cat([output_gradients(module, r.grad) for r in done if r.grad is not None])
            stats[name] = LayerStats(a, g)
        self._forward = None
        return stats

    def discard(self) -> None:
        """Drop everything captured so far (e.g. on a skipped step)."""
        for name in self._records:
            self._records[name] = []
        self._forward = None
