"""Data sets of the paper's experiments behind one registry, ``load_dataset``.

| name | source | x | y |
|---|---|---|---|
| ``curves`` | generated (``curves.py``), 20k/10k | ``[N, 784]`` in [0, 1] | x (autoencoder) |
| ``mnist`` | IDX files (``idx.py``), 60k/10k | ``[N, 784]`` in [0, 1] | int64 labels or x |
| ``fashion_mnist`` | IDX files (``idx.py``), 60k/10k | ``[N, 784]`` in [0, 1] | int64 labels or x |
"""

from __future__ import annotations

import os

import torch

from twolevel_kfac.experiments.data.curves import load_curves
from twolevel_kfac.experiments.data.idx import load_idx_dataset, resolve_data_dir

__all__ = ["DATASET_NAMES", "load_dataset", "resolve_data_dir"]

DATASET_NAMES = ("curves", "mnist", "fashion_mnist")

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    autoencoder: bool | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> Split:
    """Load a data set by name.

    Args:
        name: One of ``DATASET_NAMES``.
        data_dir: Data directory (IDX files: see ``idx.resolve_data_dir``; CURVES: the
            cache base, see ``curves.load_curves``).
        autoencoder: Targets are the inputs (``y = x``) when true, the labels when false.
            ``None``: true for ``curves`` (it has no labels), false otherwise.
        n_train: Keep only the first ``n_train`` training samples (``None``: all).
        n_test: Keep only the first ``n_test`` test samples (``None``: all).
        seed: CURVES generator seed (ignored by the IDX data sets).

    Returns:
        ``(train_x, train_y, test_x, test_y)``.

    Raises:
        ValueError: Unknown name, or labels requested for CURVES.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; allowed: {list(DATASET_NAMES)}")
    if name == "curves":
        if autoencoder is False:
            raise ValueError("autoencoder=False: CURVES has no labels, it is an autoencoder task")
        train_x, test_x = load_curves(data_dir, seed=seed)
        train_y, test_y = train_x, test_x
    else:
        train_x, train_y, test_x, test_y = load_idx_dataset(name, data_dir)
        if autoencoder:
            train_y, test_y = train_x, test_x
    return (train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test])
