"""SVHN (cropped digits, 32×32) loader for the official MATLAB files.

Layout: ``<data_dir>/svhn/train_32x32.mat`` (73,257 images) and ``test_32x32.mat``
(26,032), downloaded from ``http://ufldl.stanford.edu/housenumbers/``. Each is a MAT v5
file (128-byte text header starting ``MATLAB 5.0 MAT-file``) with ``X``: uint8
``[32, 32, 3, N]`` (row, column, channel, image) and ``y``: ``[N, 1]`` labels 1–10, where
10 stands for the digit 0. The loader returns images ``[N, 3, 32, 32]`` and labels 0–9.

Reading needs ``scipy.io.loadmat`` (scipy comes with scikit-image, the ``faces`` extra);
MAT files hold no code, so reading an untrusted file is safe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from twolevel_kfac.experiments.data.cifar import file_md5
from twolevel_kfac.experiments.data.idx import missing_file, resolve_data_dir

__all__ = ["SVHN", "SvhnFile", "check_mat_header", "load_svhn", "read_svhn_mat"]

FOLDER = "svhn"
URL = "http://ufldl.stanford.edu/housenumbers/"


class SvhnFile(NamedTuple):
    """One official SVHN file."""

    name: str
    md5: str
    n: int  # images


SVHN: dict[str, SvhnFile] = {
    "train": SvhnFile("train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373", 73_257),
    "test": SvhnFile("test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3", 26_032),
}


def check_mat_header(path: Path, head: bytes) -> None:
    """Check the MAT v5 magic: the text ``MATLAB 5.0 MAT-file`` and the endian tag.

    Args:
        path: The file, for messages.
        head: Its first 128 bytes (or fewer for a short file).

    Raises:
        ValueError: Not a MAT v5 file (a v7.3 / HDF5 file is named as such).
    """
    if head.startswith(b"MATLAB 7.3"):
        raise ValueError(f"{path}: MAT v7.3 (HDF5) file; save it as MAT v5 (-v7 or older)")
    if (
        len(head) < 128
        or not head.startswith(b"MATLAB 5.0 MAT-file")
        or head[126:]
        not in (
            b"IM",
            b"MI",
        )
    ):
        raise ValueError(
            f"{path}: bad magic number {head[:10]!r}: not a MAT v5 file "
            "(expected the header 'MATLAB 5.0 MAT-file' … 'IM')"
        )


def read_svhn_mat(path: str | os.PathLike[str], md5: str | None = None) -> tuple[np.ndarray, ...]:
    """Read one SVHN ``.mat`` file.

    Args:
        path: The file.
        md5: Expected md5; ``None`` skips the check.

    Returns:
        ``(images uint8 [N, 3, 32, 32], labels int64 [N] in 0–9)``.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Wrong md5 or magic, unreadable, missing keys, bad shapes or labels.
        ImportError: scipy is not installed.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file(path)
    with path.open("rb") as handle:
        check_mat_header(path, handle.read(128))
    if md5 is not None and (got := file_md5(path)) != md5.lower():
        raise ValueError(
            f"{path}: wrong md5 {got}, expected {md5}; the file is corrupt or not the "
            "official release: delete it and fetch it again"
        )
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy ships with scikit-image
        raise ImportError("reading SVHN needs scipy: pip install 'twolevel-kfac[faces]'") from exc
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as exc:  # scipy raises many types for corrupt files
        raise ValueError(f"{path}: unreadable MAT file ({exc}); truncated download?") from exc
    if "X" not in mat or "y" not in mat:
        raise ValueError(f"{path}: missing variable 'X' or 'y' (has {sorted(mat)})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise ValueError(f"{path}: 'X' must be uint8 [32, 32, 3, N], got {x.dtype} {x.shape}")
    n = x.shape[3]
    if n == 0:
        raise ValueError(f"{path}: empty data set (0 images)")
    labels = y.reshape(-1)
    if labels.shape != (n,) or not np.all((labels >= 1) & (labels <= 10)):
        raise ValueError(f"{path}: 'y' must hold {n} labels in 1–10, got {y.dtype} {y.shape}")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # [N, channel, row, column]
    return images, (labels.astype(np.int64) % 10)


def load_svhn(
    data_dir: str | os.PathLike[str] | None = None, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load SVHN (train and test, without ``extra``).

    Args:
        data_dir: Data directory holding ``svhn/`` (see ``idx.resolve_data_dir``).
        verify: Check the md5s against ``SVHN``.

    Returns:
        ``(train_x [73257, 3, 32, 32], train_y, test_x [26032, 3, 32, 32], test_y)``:
        float32 images in [0, 1] and int64 labels 0–9.
    """
    folder = resolve_data_dir(data_dir, require=FOLDER) / FOLDER
    out: list[torch.Tensor] = []
    for split in ("train", "test"):
        spec = SVHN[split]
        images, labels = read_svhn_mat(folder / spec.name, spec.md5 if verify else None)
        out.append(torch.from_numpy(images.astype(np.float32) / np.float32(255.0)))
        out.append(torch.from_numpy(labels))
    return out[0], out[1], out[2], out[3]
