"""Gzipped IDX loaders for MNIST and Fashion-MNIST, with checksum verification.

IDX format (LeCun et al.): a big-endian header ``00 00 TT DD`` (two zero bytes, the
element type code TT, the number of dimensions DD), then DD big-endian uint32 sizes,
then the elements in row-major (C) order. MNIST-style files use TT = 0x08 (uint8):
images have magic 0x00000803 (``[N, 28, 28]``), labels 0x00000801 (``[N]``).

Integrity: a file is accepted when the md5 of its *decompressed* bytes or of the
``.gz`` file itself matches a known value (``KNOWN_FILES``: the canonical ``.gz``
checksums published with the official downloads, and the checksums of the raw IDX
bytes, which survive recompression).

Data directory resolution (``resolve_data_dir``): explicit argument > environment
variable ``TLKFAC_DATA`` > ``<repo>/data`` or ``<repo>/../shared/data``, whichever holds
the wanted folder > error. The files
of a data set live in ``<data_dir>/<folder>/`` (``mnist/``, ``fashion-mnist/``) under
their standard names, compressed (``*.gz``) or not.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "IdxDataset",
    "IdxFile",
    "load_idx_dataset",
    "missing_file",
    "parse_idx",
    "read_idx",
    "repo_root",
    "resolve_data_dir",
]

ENV_VAR = "TLKFAC_DATA"

# IDX element type code -> numpy dtype (big-endian for multi-byte types).
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class IdxFile(NamedTuple):
    """One IDX file of a data set and its accepted checksums."""

    name: str  # file name without ``.gz``
    gz_md5: str  # md5 of the official ``.gz`` download
    raw_md5: str  # md5 of the decompressed IDX bytes


class IdxDataset(NamedTuple):
    """An IDX data set: folder, download mirrors and its four files."""

    folder: str
    urls: tuple[str, ...]  # mirrors; a file's URL is ``url + name + ".gz"``
    train_images: IdxFile
    train_labels: IdxFile
    test_images: IdxFile
    test_labels: IdxFile


DATASETS: dict[str, IdxDataset] = {
    "mnist": IdxDataset(
        folder="mnist",
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        train_images=IdxFile(
            "train-images-idx3-ubyte",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "6bbc9ace898e44ae57da46a324031adb",
        ),
        train_labels=IdxFile(
            "train-labels-idx1-ubyte",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "a25bea736e30d166cdddb491f175f624",
        ),
        test_images=IdxFile(
            "t10k-images-idx3-ubyte",
            "9fb629c4189551a2d022fa330f9573f3",
            "2646ac647ad5339dbf082846283269ea",
        ),
        test_labels=IdxFile(
            "t10k-labels-idx1-ubyte",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    ),
    "fashion_mnist": IdxDataset(
        folder="fashion-mnist",
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        train_images=IdxFile(
            "train-images-idx3-ubyte",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        ),
        train_labels=IdxFile(
            "train-labels-idx1-ubyte",
            "25c81989df183df01b3e8a0aad5dffbe",
            "9018921c3c673c538a1fc5bad174d6f9",
        ),
        test_images=IdxFile(
            "t10k-images-idx3-ubyte",
            "bef4ecab320f06d8554ea6380940ec79",
            "8181f5470baa50b63fa0f6fddb340f0a",
        ),
        test_labels=IdxFile(
            "t10k-labels-idx1-ubyte",
            "bb300cfdad3c16e7a12a480ee83cd310",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
    ),
}


def repo_root() -> Path | None:
    """The source checkout's root (the folder holding ``pyproject.toml``), if any.

    Returns:
        The repository root, or ``None`` for an installed (non-editable) package.
    """
    root = Path(__file__).resolve().parents[4]
    return root if (root / "pyproject.toml").is_file() else None


def resolve_data_dir(
    data_dir: str | os.PathLike[str] | None = None, require: str | None = None
) -> Path:
    """Pick the data directory: explicit > ``$TLKFAC_DATA`` > a checkout's default folders.

    The defaults, tried when neither an argument nor ``$TLKFAC_DATA`` is given, are
    ``<repo>/data`` (where ``tlkfac data fetch`` puts files by default) and
    ``<repo>/../shared/data``. With ``require``, the first default holding that subfolder
    wins; without it (or when none holds it) the last existing default.

    Args:
        data_dir: Explicit directory; wins when given.
        require: Subfolder the caller needs (e.g. ``"mnist"``), to choose among defaults.

    Returns:
        The directory.

    Raises:
        FileNotFoundError: When no candidate exists; the message lists what was tried.
    """
    explicit = [
        ("argument data_dir", data_dir),
        (f"${ENV_VAR}", os.environ.get(ENV_VAR) or None),
    ]
    for label, value in explicit:
        if value is not None:  # an explicit choice that does not exist is an error
            if Path(value).is_dir():
                return Path(value)
            raise FileNotFoundError(f"data directory {label}={value} does not exist")
    root = repo_root()
    defaults = [root / "data", root.parent / "shared" / "data"] if root is not None else []
    existing = [d for d in defaults if d.is_dir()]
    if require is not None:
        for candidate in existing:
            if (candidate / require).is_dir():
                return candidate
    if existing:
        return existing[-1]
    raise FileNotFoundError(
        f"no data directory found (no data_dir argument, ${ENV_VAR} unset, none of "
        f"{[str(d) for d in defaults]} exists). Pass --data-dir / data_dir=..., or set "
        f"{ENV_VAR} to a folder holding the data sets' folders (mnist/, fashion-mnist/ with "
        "the standard *-ubyte.gz files, …); `tlkfac data fetch NAME` puts them there."
    )


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a numpy array of native byte order.

    Args:
        raw: The decompressed file content.
        source: File name for error messages.

    Returns:
        The array, shape from the header.

    Raises:
        ValueError: Bad magic number, unknown type code, truncated or oversized data.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{source}: bad IDX magic number {raw[:4].hex() or '(empty file)'}; "
            "expected 0000TTDD (e.g. 00000803 for images, 00000801 for labels)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{source}: bad IDX magic number {raw[:4].hex()} "
            f"(type code 0x{code:02x}, {ndim} dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ValueError(
            f"{source}: IDX data {kind}: {len(raw)} bytes, header {dims} needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="), copy=True)


def missing_file(path: Path) -> FileNotFoundError:
    """The error of a data file that is not there, with where else to look."""
    return FileNotFoundError(
        f"missing data file {path} (another folder: --data-dir or ${ENV_VAR}; "
        "`tlkfac data fetch NAME` downloads it)"
    )


def _read_bytes(path: Path) -> tuple[bytes, bytes | None]:
    """Decompressed content and, for ``.gz`` files, the compressed bytes."""
    if not path.is_file():
        raise missing_file(path)
    blob = path.read_bytes()
    if path.suffix != ".gz":
        return blob, None
    try:
        return gzip.decompress(blob), blob
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a valid gzip file ({exc}); truncated download?") from exc


def read_idx(path: str | os.PathLike[str], md5: Iterable[str] | None = None) -> np.ndarray:
    """Read a (gzipped) IDX file, optionally verifying its md5.

    Args:
        path: File path; ``.gz`` files are decompressed.
        md5: Accepted hex digests, matched against the decompressed bytes and, for
            ``.gz`` files, the compressed file. ``None`` skips the check.

    Returns:
        The decoded array.

    Raises:
        FileNotFoundError: The file is missing.
        ValueError: Bad gzip stream, bad magic number, wrong size or wrong md5.
    """
    path = Path(path)
    raw, compressed = _read_bytes(path)
    if md5 is not None:
        accepted = {m.lower() for m in md5}
        digests = [hashlib.md5(raw, usedforsecurity=False).hexdigest()]
        if compressed is not None:
            digests.append(hashlib.md5(compressed, usedforsecurity=False).hexdigest())
        if accepted.isdisjoint(digests):
            raise ValueError(
                f"{path}: wrong md5 {' / '.join(digests)} (decompressed / file), "
                f"expected one of {sorted(accepted)}; the file is corrupt or not the "
                "official release: delete it and fetch it again"
            )
    return parse_idx(raw, source=str(path))


def _locate(folder: Path, entry: IdxFile) -> Path:
    """``folder/name.gz`` if present, else the uncompressed ``folder/name``."""
    gz = folder / f"{entry.name}.gz"
    if gz.is_file() or not (folder / entry.name).is_file():
        return gz
    return folder / entry.name


def _images(path: Path, entry: IdxFile, verify: bool) -> torch.Tensor:
    """uint8 images ``[N, H, W]`` → float32 ``[N, H·W]`` scaled to [0, 1]."""
    arr = read_idx(path, (entry.gz_md5, entry.raw_md5) if verify else None)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 images [N, H, W], got {arr.dtype} {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{path}: empty data set (0 images)")
    return torch.from_numpy(arr.reshape(len(arr), -1).astype(np.float32) / np.float32(255.0))


def _labels(path: Path, entry: IdxFile, verify: bool, n: int) -> torch.Tensor:
    """uint8 labels ``[N]`` → int64, checking that there are ``n`` of them."""
    arr = read_idx(path, (entry.gz_md5, entry.raw_md5) if verify else None)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{path}: expected {n} labels, got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64))


def load_idx_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        data_dir: Data directory (see ``resolve_data_dir``).
        verify: Check md5 checksums against ``DATASETS``.

    Returns:
        ``(train_x [60000, 784], train_y [60000], test_x [10000, 784], test_y [10000])``:
        float32 images scaled to [0, 1] and int64 labels.

    Raises:
        ValueError: Unknown name, or a file fails its checks.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown IDX data set {name!r}; allowed: {sorted(DATASETS)}")
    spec = DATASETS[name]
    folder = resolve_data_dir(data_dir, require=spec.folder) / spec.folder
    out: list[torch.Tensor] = []
    for img, lab in ((spec.train_images, spec.train_labels), (spec.test_images, spec.test_labels)):
        x = _images(_locate(folder, img), img, verify)
        out += [x, _labels(_locate(folder, lab), lab, verify, len(x))]
    return out[0], out[1], out[2], out[3]
