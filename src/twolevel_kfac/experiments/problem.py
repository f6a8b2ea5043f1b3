"""The data and held-out evaluation of a problem (``ProblemSpec``).

``load_data`` loads the configured data set (``experiments.data.load_dataset``),
average-pools its images to ``dataset.image_size`` (``pool_images``), reshapes inputs to
``dataset.input_shape`` and splits off ``dataset.val_fraction`` of the training
set as the validation set (the paper's "validation": an 80/20 split of the training set),
with a permutation seeded by ``dataset.seed``, so every run seed sees the same split.
``evaluate`` computes the mean loss (and accuracy) in eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twolevel_kfac.experiments.config import ProblemSpec
from twolevel_kfac.experiments.losses import LIKELIHOODS, LossFn
from twolevel_kfac.placement import module_device

__all__ = ["Data", "denormals_flushed", "evaluate", "load_data", "pool_images"]


@contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush denormal floats to zero inside (denormal activations made CPU steps several
    times slower), then back to torch's default, off (torch has no getter to restore)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@dataclass
class Data:
    """Train / validation / test tensors; ``val`` and ``test`` may be empty (``None``)."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor] | None
    test: tuple[Tensor, Tensor] | None


def load_data(problem: ProblemSpec, data_dir: str | Path | None = None) -> Data:
    """Load the problem's data set, pool and reshape inputs, split off the validation set.

    The split is a permutation seeded with ``dataset.seed``: the same for every run seed.

    Raises:
        ValueError: A regression loss with class labels as targets, an ``image_size`` for
            inputs that are not images, an ``input_shape`` that does not fit, an empty
            training set, or a batch larger than it.
    """
    from twolevel_kfac.experiments.data import load_dataset

    ds = problem.dataset
    train_x, train_y, test_x, test_y = load_dataset(
        ds.name,
        data_dir,
        autoencoder=ds.autoencoder,
        n_train=ds.n_train,
        n_test=ds.n_test,
        seed=ds.seed,
        context=ds.context,
    )
    categorical = LIKELIHOODS[problem.loss] == "categorical"
    if not categorical and not torch.is_floating_point(train_y):
        raise ValueError(
            f"loss {problem.loss!r} needs real-valued targets but {ds.name!r} gives labels; "
            "set dataset.autoencoder: true or loss: cross_entropy (sequence_cross_entropy "
            "for [N, T] targets)"
        )
    if ds.image_size is not None:
        images = torch.is_floating_point(train_y) and train_y.shape == train_x.shape
        train_x, test_x = (pool_images(x, ds.image_size) for x in (train_x, test_x))
        if images:  # autoencoder targets are the images: pooled the same way
            train_y, test_y = (pool_images(y, ds.image_size) for y in (train_y, test_y))
    if ds.input_shape:
        size, shape = math.prod(ds.input_shape), list(train_x.shape[1:])
        if size != math.prod(shape):
            raise ValueError(
                f"dataset.input_shape {ds.input_shape} ({size} values) does not fit the "
                f"{ds.name!r} inputs of shape {shape} ({math.prod(shape)} values)"
            )
        train_x, test_x = (x.reshape(len(x), *ds.input_shape) for x in (train_x, test_x))
    n_val = round(len(train_x) * ds.val_fraction)
    n_train = len(train_x) - n_val
    if n_train <= 0:
        raise ValueError(
            f"the training set of {ds.name!r} is empty ({len(train_x)} examples, "
            f"{n_val} held out by dataset.val_fraction {ds.val_fraction})"
        )
    if problem.batch_size > n_train:
        raise ValueError(
            f"problem.batch_size {problem.batch_size} is larger than the training set "
            f"({n_train} examples after the validation split)"
        )
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(ds.seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Data(
        train=(train_x[train_idx], train_y[train_idx]),
        val=(train_x[val_idx], train_y[val_idx]) if n_val else None,
        test=(test_x, test_y) if len(test_x) else None,
    )


def pool_images(x: Tensor, size: int) -> Tensor:
    """Average-pool images to ``size × size`` (``adaptive_avg_pool2d``, as the Fisher
    analysis' ``data.image_size``).

    Args:
        x: ``[N, C, H, W]`` images, or ``[N, D]`` flat square one-channel images
            (``D = H²``, e.g. 784 for 28×28), which come back flat (``[N, size²]``).
        size: The side of the pooled images.

    Returns:
        The pooled images, in the layout of ``x``.

    Raises:
        ValueError: Flat inputs that are not square images, or another layout.
    """
    if x.dim() == 4:
        return F.adaptive_avg_pool2d(x, size)
    side = math.isqrt(x.shape[-1]) if x.dim() == 2 else 0
    if side * side != x.shape[-1] or side == 0:
        raise ValueError(
            f"dataset.image_size needs [N, C, H, W] images or flat square one-channel images; "
            f"got inputs of shape {list(x.shape)}"
        )
    return F.adaptive_avg_pool2d(x.reshape(-1, 1, side, side), size).flatten(1)


def check_batch_norm_rows(model: nn.Module, n_rows: int, batch_size: int, processes: int) -> None:
    """Refuse batches that BatchNorm cannot normalise in training (fewer than 2 rows per
    process), found before the first step instead of by torch in the middle of an epoch.

    Raises:
        ValueError: the model has BatchNorm layers and ``batch_size`` or the last batch of
            an epoch (``n_rows % batch_size`` rows) leaves a process a single row.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    last = n_rows % batch_size
    smallest, which = (last, "the last batch of an epoch") if last else (batch_size, "a batch")
    if smallest // processes < 2:
        per = f" per process (--nproc {processes})" if processes > 1 else ""
        raise ValueError(
            f"the model has BatchNorm layers, which need at least 2 rows per batch in "
            f"training, but {which} has {smallest} row(s){per} ({n_rows} training examples, "
            f"problem.batch_size {batch_size}): change the batch size or dataset.n_train"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, batch_size: int = 2048
) -> tuple[float, float | None]:
    """Mean loss over a data set in eval mode, and accuracy for integer targets.

    Accuracy is the share of targets equal to the argmax of the logits over their last
    dimension: of the samples for ``[N, C]`` logits, of the tokens (every position of
    every sequence) for ``[N, T, C]`` logits and ``[N, T]`` targets. The loss is the mean
    over the rows of ``x`` of the loss of each chunk, weighted by its rows.

    Runs under ``torch.no_grad()`` in ``eval()`` mode, so KFAC's hooks capture nothing;
    the model's train/eval mode is restored afterwards. Each chunk of ``batch_size`` rows
    is copied to the model's device when it is used.

    Returns:
        ``(loss, accuracy)``, accuracy ``None`` for real-valued targets.
    """
    was_training = model.training
    model.eval()
    classify = not torch.is_floating_point(y)
    total, correct, targets = 0.0, 0, 0
    device = module_device(model)
    for start in range(0, len(x), batch_size):
        xb, yb = (part[start : start + batch_size].to(device) for part in (x, y))
        out = model(xb)
        total += float(loss_fn(out, yb)) * len(xb)
        if classify:
            correct += int((out.argmax(dim=-1) == yb).sum())
            targets += yb.numel()
    model.train(was_training)
    return total / max(len(x), 1), (correct / max(targets, 1) if classify else None)
