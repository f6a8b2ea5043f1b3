"""Data sets of the paper's experiments behind one registry, ``load_dataset``.

| name | source | x | y |
|---|---|---|---|
| ``curves`` | generated (``curves.py``), 20k/10k | ``[N, 784]`` in [0, 1] | x (autoencoder) |
| ``faces`` | generated from LFW faces (``faces.py``), 20k/5k | ``[N, 625]`` in [0, 1] | x |
| ``mnist`` | IDX files (``idx.py``), 60k/10k | ``[N, 784]`` in [0, 1] | int64 labels or x |
| ``fashion_mnist`` | IDX files (``idx.py``), 60k/10k | ``[N, 784]`` in [0, 1] | int64 labels or x |
| ``cifar10`` | pickles (``cifar.py``), 50k/10k | ``[N, 3, 32, 32]`` in [0, 1] | labels 0–9 |
| ``cifar100`` | pickles (``cifar.py``), 50k/10k | ``[N, 3, 32, 32]`` in [0, 1] | labels 0–99 |
| ``svhn`` | MAT files (``svhn.py``), 73,257/26,032 | ``[N, 3, 32, 32]`` in [0, 1] | labels 0–9 |
| ``stdlib_chars`` | stdlib ``*.py`` text (``text.py``), 90/10 % | int64 ``[N, T]`` ids | next ids |

``tlkfac data fetch|verify|info NAME`` (``command.py``) installs and checks them
(``stdlib_chars`` needs no files: it is read from the interpreter's standard library).
"""

from __future__ import annotations

import os

import torch

from twolevel_kfac.experiments.data.cifar import load_cifar
from twolevel_kfac.experiments.data.curves import load_curves
from twolevel_kfac.experiments.data.faces import load_faces
from twolevel_kfac.experiments.data.idx import load_idx_dataset, resolve_data_dir
from twolevel_kfac.experiments.data.svhn import load_svhn
from twolevel_kfac.experiments.data.text import DEFAULT_CONTEXT, load_stdlib_chars

__all__ = ["DATASET_NAMES", "GENERATED_NAMES", "TEXT_NAMES", "load_dataset", "resolve_data_dir"]

DATASET_NAMES = (
    "curves",
    "mnist",
    "fashion_mnist",
    "faces",
    "cifar10",
    "cifar100",
    "svhn",
    "stdlib_chars",
)
GENERATED_NAMES = ("curves", "faces")  # autoencoder sets without labels
TEXT_NAMES = ("stdlib_chars",)  # next-character windows; ``context`` sets their length

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _load_labelled(name: str, data_dir: str | os.PathLike[str] | None, verify: bool) -> Split:
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, verify=verify)
    if name == "svhn":
        return load_svhn(data_dir, verify=verify)
    return load_idx_dataset(name, data_dir, verify=verify)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    autoencoder: bool | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    verify: bool = True,
    context: int | None = None,
) -> Split:
    """Load a data set by name.

    Args:
        name: One of ``DATASET_NAMES``.
        data_dir: Data directory (file-based sets: see ``idx.resolve_data_dir``; CURVES
            and FACES: the cache base, see ``curves.load_curves``).
        autoencoder: Targets are the inputs (``y = x``) when true, the labels when false.
            ``None``: true for ``curves`` and ``faces`` (no labels), false otherwise.
        n_train: Keep only the first ``n_train`` training samples (``None``: all).
        n_test: Keep only the first ``n_test`` test samples (``None``: all).
        seed: CURVES / FACES generator seed (ignored by the file-based sets).
        verify: Check the md5 of every file of a file-based set.
        context: Characters per window of a text set (``TEXT_NAMES``; ``None``: 128).

    Returns:
        ``(train_x, train_y, test_x, test_y)``.

    Raises:
        ValueError: Unknown name, labels requested for CURVES / FACES, an autoencoder of a
            text set, or a ``context`` for a set that is not text.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown data set {name!r}; allowed: {list(DATASET_NAMES)}")
    if context is not None and name not in TEXT_NAMES:
        raise ValueError(f"dataset.context applies to the text data sets {list(TEXT_NAMES)}")
    if name in TEXT_NAMES:
        if autoencoder:
            raise ValueError(f"autoencoder=True: {name} is a next-character task")
        train_x, train_y, test_x, test_y = load_stdlib_chars(
            DEFAULT_CONTEXT if context is None else context
        )
    elif name in GENERATED_NAMES:
        if autoencoder is False:
            raise ValueError(
                f"autoencoder=False: {name.upper()} has no labels, it is an autoencoder task"
            )
        loader = load_curves if name == "curves" else load_faces
        train_x, test_x = loader(data_dir, seed=seed)
        train_y, test_y = train_x, test_x
    else:
        train_x, train_y, test_x, test_y = _load_labelled(name, data_dir, verify)
        if autoencoder:
            train_y, test_y = train_x, test_x
    return (train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test])
