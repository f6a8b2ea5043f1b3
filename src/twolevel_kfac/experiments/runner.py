"""A minimal, deterministic training loop and an optimizer factory for the experiments.

``train`` drives any ``torch.optim.Optimizer`` through exactly

    opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); opt.step()

(the usage contract of ``twolevel_kfac.KFAC``/``TwoLevelKFAC``, design.md §2) and returns
one record per epoch. ``make_optimizer`` maps the method names of the paper's figures
(Koroko et al. 2023) to optimizers.
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from twolevel_kfac.experiments.losses import LossFn

__all__ = ["TWO_LEVEL_METHODS", "evaluate", "make_optimizer", "train"]

# Figure label -> ``coarse_space`` argument of TwoLevelKFAC.
TWO_LEVEL_METHODS: dict[str, str] = {
    "nico": "nicolaides",
    "spectral": "spectral",
    "residu": "residual",
    "kry_nico": "krylov_nicolaides",
    "kry_residu": "krylov_residual",
    "previous": "tselepidis",
}


def _public_class(name: str, module: str) -> Callable[..., torch.optim.Optimizer]:
    """``twolevel_kfac.<name>``, falling back to ``<module>.<name>``; imported lazily."""
    for mod_name in ("twolevel_kfac", module):
        try:
            cls: Any = getattr(importlib.import_module(mod_name), name, None)
        except ImportError:
            cls = None
        if cls is not None:
            return cls
    raise ImportError(f"twolevel_kfac.{name} is not available (neither it nor {module}.{name})")


def make_optimizer(name: str, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    """Build the optimizer of a method of the paper's figures.

    Args:
        name: ``"sgd"`` (momentum 0.9, Nesterov), ``"adam"``, ``"kfac"``, or a two-level
            label of ``TWO_LEVEL_METHODS`` (``"nico"``, ``"residu"``, ``"previous"``, …).
        model: The model whose parameters are optimised.
        **hparams: Constructor arguments (``lr``, ``damping``, …); for SGD ``momentum``
            and ``nesterov`` may override the defaults.

    Returns:
        The optimizer.

    Raises:
        ValueError: Unknown method name.
    """
    key = name.lower()
    if key == "sgd":
        sgd_args: dict[str, Any] = {"momentum": 0.9, "nesterov": True, **hparams}
        return torch.optim.SGD(model.parameters(), **sgd_args)
    if key == "adam":
        return torch.optim.Adam(model.parameters(), **hparams)
    if key == "kfac":
        return _public_class("KFAC", "twolevel_kfac.optim.kfac")(model, **hparams)
    if key in TWO_LEVEL_METHODS:
        cls = _public_class("TwoLevelKFAC", "twolevel_kfac.optim.twolevel")
        return cls(model, coarse_space=TWO_LEVEL_METHODS[key], **hparams)
    allowed = ["sgd", "adam", "kfac", *TWO_LEVEL_METHODS]
    raise ValueError(f"unknown optimizer {name!r}; allowed: {allowed}")


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, batch_size: int = 2048
) -> tuple[float, float | None]:
    """Mean loss over a data set (eval mode), and accuracy for integer targets.

    Args:
        model: The model; restored to its previous train/eval mode afterwards.
        loss_fn: Batch-mean loss.
        x: Inputs.
        y: Targets; int64 labels make it a classification problem.
        batch_size: Evaluation batch size (does not change the result).

    Returns:
        ``(loss, accuracy)``, accuracy ``None`` for non-classification targets.
    """
    was_training = model.training
    model.eval()
    classify = not torch.is_floating_point(y)
    total, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        out = model(xb)
        total += float(loss_fn(out, yb)) * len(xb)
        if classify:
            correct += int((out.argmax(dim=1) == yb).sum())
    model.train(was_training)
    n = max(len(x), 1)
    return total / n, (correct / n if classify else None)


def _run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor],
    batches: tuple[Tensor, ...],
    deadline: float,
) -> tuple[list[float], float]:
    """One pass over the index ``batches`` of ``data = (x, y)``.

    Stops early at a non-finite loss or when ``time.perf_counter()`` passes ``deadline``.

    Returns:
        The minibatch losses and the training time of the pass in seconds.
    """
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for idx in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(data[0][idx]), data[1][idx])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]) or time.perf_counter() >= deadline:
            break
    return losses, time.perf_counter() - start


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
    max_seconds: float | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train for ``epochs`` passes with reshuffled minibatches; one record per epoch.

    Shuffling uses ``torch.Generator().manual_seed(seed)``, so two runs from the same model
    state, optimizer and seed give the same losses. Training stops early when the
    training time exceeds ``max_seconds`` (the last record then covers a partial epoch)
    or a loss is NaN/Inf (the record gets ``"diverged": True``).

    Args:
        model: The model (initialised by the caller).
        optimizer: Any optimizer following the zero_grad/backward/step protocol.
        loss_fn: Batch-mean loss ``loss_fn(model(x), y)``.
        train_x: Training inputs.
        train_y: Training targets (int64 labels make it a classification problem).
        test_x: Test inputs.
        test_y: Test targets.
        epochs: Number of passes over the training set.
        batch_size: Minibatch size (the last minibatch of an epoch may be smaller).
        seed: Shuffling seed.
        max_seconds: Training-time budget (evaluation excluded); ``None`` for none.
        progress: Show a tqdm bar (only when stderr is a terminal).

    Returns:
        Records with keys ``epoch, step, wall_time_s`` (cumulative training time,
        evaluation excluded), ``train_loss`` (mean of the epoch's minibatch losses),
        ``test_loss`` and, for classification, ``test_acc``.
    """
    gen = torch.Generator().manual_seed(seed)
    budget = math.inf if max_seconds is None else max_seconds
    records: list[dict[str, Any]] = []
    step, elapsed = 0, 0.0
    bar = tqdm(range(1, epochs + 1), disable=not (progress and sys.stderr.isatty()), leave=False)
    for epoch in bar:
        batches = torch.randperm(len(train_x), generator=gen).split(batch_size)
        deadline = time.perf_counter() + budget - elapsed
        losses, seconds = _run_epoch(
            model, optimizer, loss_fn, (train_x, train_y), batches, deadline
        )
        step, elapsed = step + len(losses), elapsed + seconds
        test_loss, test_acc = evaluate(model, loss_fn, test_x, test_y)
        record: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "wall_time_s": elapsed,
            "train_loss": sum(losses) / len(losses),
            "test_loss": test_loss,
        }
        if test_acc is not None:
            record["test_acc"] = test_acc
        diverged = not math.isfinite(losses[-1])
        if diverged:
            record["diverged"] = True
        records.append(record)
        bar.set_postfix(train=f"{record['train_loss']:.4g}", test=f"{test_loss:.4g}")
        if diverged or elapsed >= budget:
            break
    bar.close()
    return records
