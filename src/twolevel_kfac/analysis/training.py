"""Training with exact curvature: the comparison behind "the off-diagonal blocks can be
discarded", and the metrics along training.

Every run starts from the same initialisation and sees the same batches. At each step the
exact curvature of the batch is computed (:func:`~.exact.compute_curvature`, no running
averages, no Monte-Carlo noise unless ``fisher: mc``) and the run's method gives the
direction ``d`` (:class:`~.operators.MethodSet` with the configured backend:
``exact`` = ``F̂⁻¹g`` (dense solve or conjugate gradients),
``block_diagonal`` = exact per-layer blocks, ``kfac`` = the optimizer's ``M⁻¹g`` with
factors of this batch, two-level = the optimizer's step path). The update is plain
``θ ← θ − lr·ν·d`` (no momentum; ``ν = min(1, √(c/|dᵀg|))`` the authors' KL clipping when
``train.kl_clip = c`` is set, else ``ν = 1``): the methods differ only in how they
approximate ``F̂⁻¹``.

Along the way the run records the batch loss per step, the optimizer's own
``E(β*) − E(0)`` diagnostic of every coarse space in ``gain_spaces`` at every step (the
authors' figure: how much the optimal coarse correction would lower the F̂-norm error of the
KFAC direction at the run's current state), and every ``checkpoint_every`` steps the
direction metrics of ``metric_methods`` and the relative coarse gains (dense ``F`` from the
statistics, or matrix-free products) plus the loss on a fixed evaluation set.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import AnalyzeConfig
from .coordinates import analysis_layers, from_layer_matrices, loss_at, num_parameters
from .evaluate import checkpoint_metrics
from .exact import compute_curvature
from .operators import MethodSet


@dataclass
class RunResult:
    """One training run (see the module docstring)."""

    method: str
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    gains: dict[str, list[float]] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False
    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return {
            "method": self.method,
            "losses": self.losses,
            "eval_steps": self.eval_steps,
            "eval_losses": self.eval_losses,
            "coarse_gain_per_step": self.gains,
            "checkpoints": self.checkpoints,
            "diverged": self.diverged,
        }


def batch_schedule(num_data: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """The index batches of a run: reshuffled epochs from a seeded generator (shared by runs)."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[Tensor] = []
    perm = torch.randperm(num_data, generator=generator)
    pos = 0
    while len(batches) < steps:
        if pos + batch_size > num_data:
            perm, pos = torch.randperm(num_data, generator=generator), 0
        batches.append(perm[pos : pos + min(batch_size, num_data)])
        pos += batch_size
    return batches


@torch.no_grad()
def apply_step(model: nn.Module, direction: list[Tensor], lr: float) -> None:
    """``θ ← θ − lr·d`` on the analysis layers (``d`` a layer vector)."""
    params = dict(model.named_parameters())
    for name, value in from_layer_matrices(analysis_layers(model), direction).items():
        params[name].sub_(lr * value)


def kl_scale(direction: Tensor, ms: MethodSet, clip: float | None) -> float:
    """``ν = min(1, √(c / |dᵀg|))`` (the authors' form, no ``lr²``); 1 without clipping."""
    if clip is None:
        return 1.0
    total = abs(float(direction @ ms.curvature.flat_grad))
    return 1.0 if total <= 0 or not math.isfinite(total) else min(1.0, math.sqrt(clip / total))


def _checkpoint(ms: MethodSet, config: AnalyzeConfig, step: int) -> dict[str, Any]:
    spec = config.train
    return {"step": step, **checkpoint_metrics(ms, spec.metric_methods, spec.gain_spaces)}


def train_run(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    config: AnalyzeConfig,
    method: str,
    progress: Callable[[], None] | None = None,
    steps: int | None = None,
) -> RunResult:
    """Train a copy of ``model`` for ``config.train.steps`` steps with ``method``.

    Args:
        model: the initial network (not modified).
        data: the training pool ``(x, y)``; the first ``eval_size`` samples also form the
            fixed evaluation set.
        config: the analysis configuration (its ``train`` section).
        method: the direction of the run (a method name of :mod:`.operators`).
        progress: called once per step.
        steps: the number of steps (default ``config.train.steps``).

    Returns:
        The :class:`RunResult`; its ``model`` is the trained copy.
    """
    spec = config.train
    damping = spec.damping if spec.damping is not None else config.damping
    net = copy.deepcopy(model)
    layers = analysis_layers(net)
    x_all, y_all = data
    x_eval, y_eval = x_all[: spec.eval_size], y_all[: spec.eval_size]
    generator = torch.Generator().manual_seed(config.seed + 7)
    num_steps = spec.steps if steps is None else steps
    batches = batch_schedule(x_all.shape[0], config.batch_size, num_steps, config.seed)
    run = RunResult(method, gains={s: [] for s in spec.gain_spaces}, model=net)
    backend = config.resolve_backend(num_parameters(layers))
    for step, index in enumerate([*batches, None]):
        final = index is None
        if step % spec.checkpoint_every == 0 or final:
            run.eval_steps.append(step)
            run.eval_losses.append(loss_at(net, layers, x_eval, y_eval, config.likelihood))
        if final:
            break
        x, y = x_all[index], y_all[index]
        curvature = compute_curvature(
            net,
            x,
            y,
            config.likelihood,
            config.fisher,
            mc_samples=config.mc_samples,
            generator=generator,
            dense=None,
        )
        run.losses.append(curvature.loss)
        if not math.isfinite(curvature.loss):
            run.diverged = True
            break
        ms = config.method_set(net, curvature, damping, backend)
        for space in spec.gain_spaces:
            run.gains[space].append(ms.energy_gain(space))
        if step % spec.checkpoint_every == 0:
            run.checkpoints.append(_checkpoint(ms, config, step))
        direction = ms.direction(method)
        apply_step(net, ms.layer_vector(direction), spec.lr * kl_scale(direction, ms, spec.kl_clip))
        ms.close()
        if progress is not None:
            progress()
    return run
