"""CIFAR-10 / CIFAR-100 loaders for the official python-pickle release, unpickled safely.

Layout (as extracted from the official tarballs, under the data directory):

- ``cifar-10-batches-py/``: ``data_batch_1`` … ``data_batch_5`` (10,000 images each) and
  ``test_batch`` (10,000); labels under ``labels`` (0–9).
- ``cifar-100-python/``: ``train`` (50,000) and ``test`` (10,000); labels under
  ``fine_labels`` (0–99).

Each file is a pickled dict (written by Python 2, so its keys are byte strings such as
``b'data'``, read here as ``'data'``): ``data`` is a uint8 array ``[N, 3072]`` (the 1024
red, then green, then blue values of a 32×32 image, row-major), the labels a list of ints.

Safety: the files are read with ``RestrictedUnpickler``, whose ``find_class`` resolves
only the numpy callables that rebuild arrays (``numpy.core.multiarray._reconstruct`` or
``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``) and refuses
every other global, so a malicious file cannot run code; dicts, lists, strings and
numbers need no globals. Object arrays are refused as well.

Integrity: the md5 of every file (``CIFAR_DATASETS``, the values published with the
official release and used by torchvision) is checked on load unless ``verify=False``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from twolevel_kfac.experiments.data.idx import missing_file, resolve_data_dir

__all__ = [
    "CIFAR_DATASETS",
    "CifarDataset",
    "ForbiddenGlobalError",
    "RestrictedUnpickler",
    "file_md5",
    "load_cifar",
    "read_cifar_batch",
    "restricted_load",
]

_PICKLE_FIRST_BYTES = (0x80, ord("("), ord("}"))  # PROTO (protocol ≥ 2), MARK, EMPTY_DICT


class CifarDataset(NamedTuple):
    """One CIFAR release: archive, folder, files with md5 and their label key."""

    url: str  # the official tarball
    archive_md5: str
    folder: str  # the folder the tarball extracts to
    train: tuple[tuple[str, str], ...]  # (file name, md5)
    test: tuple[tuple[str, str], ...]
    label_key: str
    n_classes: int
    n_per_file: dict[str, int]  # images per file


CIFAR_DATASETS: dict[str, CifarDataset] = {
    "cifar10": CifarDataset(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        label_key="labels",
        n_classes=10,
        n_per_file={f"data_batch_{i}": 10_000 for i in range(1, 6)} | {"test_batch": 10_000},
    ),
    "cifar100": CifarDataset(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        label_key="fine_labels",
        n_classes=100,
        n_per_file={"train": 50_000, "test": 10_000},
    ),
}


def _numpy_reconstruct() -> Callable[..., Any]:
    """Numpy's array-unpickling helper, wherever this numpy version keeps it."""
    core = getattr(np, "_core", None) or np.core
    return core.multiarray._reconstruct


_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays, dicts, lists, strings and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global, allowing only the numpy array-reconstruction callables.

        Args:
            module: Module named by the pickle.
            name: Attribute named by the pickle.

        Returns:
            The allowed callable.

        Raises:
            ForbiddenGlobalError: For every other global (nothing is imported).
        """
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise ForbiddenGlobalError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays, dicts, "
                "lists, strings and numbers are allowed in a data file"
            )
        return factory()


def restricted_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle a data file with ``RestrictedUnpickler`` (Python 2 strings as latin-1).

    Args:
        path: The pickle file.

    Returns:
        The unpickled object.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Not a pickle, truncated, or it names a forbidden global.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file(path)
    blob = path.read_bytes()
    if not blob or blob[0] not in _PICKLE_FIRST_BYTES:
        raise ValueError(
            f"{path}: bad magic number {blob[:2].hex() or '(empty file)'}: not a python "
            "pickle (expected 80 02 for the official CIFAR files)"
        )
    try:
        return RestrictedUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except ForbiddenGlobalError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        LookupError,
        AttributeError,
    ) as exc:
        raise ValueError(f"{path}: corrupt or truncated pickle ({exc!r})") from exc


def file_md5(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB blocks.

    Args:
        path: The file.

    Returns:
        The digest.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(key: object) -> object:
    return key.decode("latin1") if isinstance(key, bytes) else key


def read_cifar_batch(
    path: str | os.PathLike[str], label_key: str, n_classes: int, md5: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR pickle file.

    Args:
        path: The file (e.g. ``cifar-10-batches-py/data_batch_1``).
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).
        n_classes: Labels must lie in ``[0, n_classes)``.
        md5: Expected md5 of the file; ``None`` skips the check.

    Returns:
        ``(images uint8 [N, 3, 32, 32], labels int64 [N])``.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Wrong md5, not a (safe) pickle, missing keys, bad shapes or labels.
    """
    path = Path(path)
    if md5 is not None and path.is_file() and (got := file_md5(path)) != md5.lower():
        raise ValueError(
            f"{path}: wrong md5 {got}, expected {md5}; the file is corrupt or not the "
            "official release: delete it and fetch it again"
        )
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    entries = {_key(k): v for k, v in obj.items()}
    if "data" not in entries or label_key not in entries:
        raise ValueError(
            f"{path}: missing key 'data' or {label_key!r} (has {sorted(map(str, entries))})"
        )
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: 'data' must be a uint8 array [N, 3072], got {data!r:.80}")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' has shape {data.shape}, expected [N, 3072]")
    if len(data) == 0:
        raise ValueError(f"{path}: empty data set (0 images)")
    labels = np.asarray(entries[label_key])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: {label_key!r} must hold {len(data)} integer labels, got "
            f"{labels.dtype} {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{path}: labels outside [0, {n_classes}): {labels.min()}…{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar(
    name: str, data_dir: str | os.PathLike[str] | None = None, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 or CIFAR-100 from the python-pickle layout.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: Data directory holding the extracted folder (see
            ``idx.resolve_data_dir``).
        verify: Check each file's md5 against ``CIFAR_DATASETS``.

    Returns:
        ``(train_x [50000, 3, 32, 32], train_y [50000], test_x [10000, 3, 32, 32],
        test_y [10000])``: float32 images in [0, 1] and int64 labels.

    Raises:
        ValueError: Unknown name, or a file fails its checks.
    """
    if name not in CIFAR_DATASETS:
        raise ValueError(f"unknown CIFAR data set {name!r}; allowed: {sorted(CIFAR_DATASETS)}")
    spec = CIFAR_DATASETS[name]
    folder = resolve_data_dir(data_dir, require=spec.folder) / spec.folder
    out: list[torch.Tensor] = []
    for files in (spec.train, spec.test):
        parts = [
            read_cifar_batch(folder / f, spec.label_key, spec.n_classes, md5 if verify else None)
            for f, md5 in files
        ]
        images = np.concatenate([p[0] for p in parts])
        out.append(torch.from_numpy(images.astype(np.float32) / np.float32(255.0)))
        out.append(torch.from_numpy(np.concatenate([p[1] for p in parts])))
    return out[0], out[1], out[2], out[3]
