"""What each stored data set consists of, and how to check one of its files.

``FILE_DATASETS`` describes the data sets read from files (MNIST, Fashion-MNIST,
CIFAR-10/100, SVHN): their folder, files, accepted md5s, expected content, download URLs,
source and licence. ``check_file`` runs the checks of ``tlkfac data verify`` on one file:
it exists, it is not empty, its magic number and structure are right, it holds the
expected number of samples (the size check), and its md5 is an official one.
The generated sets (CURVES, FACES) are described in ``GENERATED``, the text sets read from
the interpreter (``stdlib_chars``) in ``TEXT``.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from twolevel_kfac.experiments.data.cifar import CIFAR_DATASETS, file_md5, read_cifar_batch
from twolevel_kfac.experiments.data.idx import DATASETS as IDX_DATASETS
from twolevel_kfac.experiments.data.idx import parse_idx
from twolevel_kfac.experiments.data.svhn import FOLDER as SVHN_FOLDER
from twolevel_kfac.experiments.data.svhn import SVHN, read_svhn_mat
from twolevel_kfac.experiments.data.svhn import URL as SVHN_URL

__all__ = [
    "FILE_DATASETS",
    "GENERATED",
    "KNOWN_NAMES",
    "TEXT",
    "DatasetSpec",
    "FileReport",
    "FileSpec",
    "check_file",
    "known_names_error",
]


@dataclass(frozen=True)
class FileSpec:
    """One file of a data set."""

    path: str  # relative to the data directory, e.g. ``mnist/train-images-idx3-ubyte.gz``
    md5: tuple[str, ...]  # accepted digests (of the file, or of its decompressed bytes)
    expected: str  # what it holds, e.g. ``uint8 [60000, 28, 28]``
    check: Callable[[Path], str]  # magic, structure and size; returns what it found
    url: str | None = None  # direct download (``None``: the data set's archive holds it)


@dataclass(frozen=True)
class DatasetSpec:
    """A data set read from files."""

    name: str
    title: str
    folder: str
    files: tuple[FileSpec, ...]
    returns: str  # what ``load_dataset`` gives
    source: str
    licence: str
    archive: tuple[str, str] | None = None  # (url, md5) of a tarball holding the files
    mirrors: tuple[str, ...] = ()  # other base URLs for ``FileSpec.url``'s file name


class FileReport(NamedTuple):
    """Outcome of ``check_file``."""

    path: Path
    ok: bool
    message: str  # what was found, or the problem
    md5: str | None = None


# ----------------------------------------------------------------------------- checks


def _idx_check(shape: tuple[int, ...]) -> Callable[[Path], str]:
    """A check: (gzip magic,) IDX magic and header, size, expected shape."""

    def check(path: Path) -> str:
        blob = path.read_bytes()
        if path.suffix == ".gz":
            if blob[:2] != b"\x1f\x8b":
                raise ValueError(f"{path}: bad gzip magic number {blob[:2].hex()} (expected 1f8b)")
            try:
                blob = gzip.decompress(blob)
            except (OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"{path}: truncated or corrupt gzip stream ({exc})") from exc
        arr = parse_idx(blob, source=str(path))
        if arr.shape != shape:
            raise ValueError(f"{path}: wrong size: holds {list(arr.shape)}, expected {list(shape)}")
        return f"{arr.dtype} {list(arr.shape)}"

    return check


def _cifar_check(label_key: str, n_classes: int, n: int) -> Callable[[Path], str]:
    """A check: pickle magic, safe unpickling, keys, ``n`` images and labels."""

    def check(path: Path) -> str:
        images, labels = read_cifar_batch(path, label_key, n_classes)
        if len(images) != n:
            raise ValueError(f"{path}: wrong size: {len(images)} images, expected {n}")
        return f"uint8 {list(images.shape)}, labels {labels.min()}–{labels.max()}"

    return check


def _svhn_check(n: int) -> Callable[[Path], str]:
    """A check: MAT magic, variables ``X``/``y``, ``n`` images."""

    def check(path: Path) -> str:
        images, _ = read_svhn_mat(path)
        if len(images) != n:
            raise ValueError(f"{path}: wrong size: {len(images)} images, expected {n}")
        return f"uint8 {list(images.shape)} (as [N, C, H, W])"

    return check


def _digests(path: Path) -> list[str]:
    """md5 of the file and, for ``.gz`` files, of the decompressed bytes."""
    digests = [file_md5(path)]
    if path.suffix == ".gz":
        digests.append(hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest())
    return digests


def locate(data_dir: Path, spec: FileSpec) -> Path:
    """The file of ``spec`` under ``data_dir`` (an uncompressed IDX file replaces ``.gz``).

    Args:
        data_dir: The data directory.
        spec: The file.

    Returns:
        The path (which may not exist).
    """
    path = data_dir / spec.path
    raw = path.with_suffix("") if path.suffix == ".gz" else None
    return raw if raw is not None and not path.is_file() and raw.is_file() else path


def check_file(path: Path, spec: FileSpec) -> FileReport:
    """Check one file: exists, not empty, magic/structure, size (sample count), md5.

    Args:
        path: Where the file is.
        spec: What it should be.

    Returns:
        The report; ``ok`` false with the problem (naming the file) on failure.
    """
    if not path.is_file():
        return FileReport(path, False, f"{path}: missing file")
    if path.stat().st_size == 0:
        return FileReport(path, False, f"{path}: empty file (0 bytes)")
    try:
        found = spec.check(path)
    except (ValueError, OSError, ImportError) as exc:
        message = str(exc)
        return FileReport(path, False, message if str(path) in message else f"{path}: {message}")
    digests = _digests(path)
    if not {d.lower() for d in spec.md5} & set(digests):
        return FileReport(
            path,
            False,
            f"{path}: wrong md5 {' / '.join(digests)}, expected one of {list(spec.md5)} "
            "(corrupt, or not the official release)",
            digests[0],
        )
    return FileReport(path, True, found, digests[0])


# ----------------------------------------------------------------------------- data sets


def _idx_spec(name: str, title: str, source: str, licence: str) -> DatasetSpec:
    spec = IDX_DATASETS[name]
    files = []
    for entry, shape in (
        (spec.train_images, (60_000, 28, 28)),
        (spec.train_labels, (60_000,)),
        (spec.test_images, (10_000, 28, 28)),
        (spec.test_labels, (10_000,)),
    ):
        files.append(
            FileSpec(
                path=f"{spec.folder}/{entry.name}.gz",
                md5=(entry.gz_md5, entry.raw_md5),
                expected=f"uint8 {list(shape)}",
                check=_idx_check(shape),
                url=f"{spec.urls[0]}{entry.name}.gz",
            )
        )
    return DatasetSpec(
        name=name,
        title=title,
        folder=spec.folder,
        files=tuple(files),
        returns="x float32 [N, 784] in [0, 1], y int64 labels 0–9; 60,000 train / 10,000 test",
        source=source,
        licence=licence,
        mirrors=spec.urls[1:],
    )


def _cifar_spec(name: str, title: str) -> DatasetSpec:
    spec = CIFAR_DATASETS[name]
    files = tuple(
        FileSpec(
            path=f"{spec.folder}/{file}",
            md5=(md5,),
            expected=f"pickle: data uint8 [{spec.n_per_file[file]}, 3072], {spec.label_key}",
            check=_cifar_check(spec.label_key, spec.n_classes, spec.n_per_file[file]),
        )
        for file, md5 in spec.train + spec.test
    )
    return DatasetSpec(
        name=name,
        title=title,
        folder=spec.folder,
        files=files,
        returns=(
            f"x float32 [N, 3, 32, 32] in [0, 1], y int64 labels 0–{spec.n_classes - 1}; "
            "50,000 train / 10,000 test"
        ),
        source="https://www.cs.toronto.edu/~kriz/cifar.html",
        licence="no licence stated; cite Krizhevsky (2009), Learning Multiple Layers of "
        "Features from Tiny Images",
        archive=(spec.url, spec.archive_md5),
    )


def _svhn_spec() -> DatasetSpec:
    files = tuple(
        FileSpec(
            path=f"{SVHN_FOLDER}/{f.name}",
            md5=(f.md5,),
            expected=f"MAT v5: X uint8 [32, 32, 3, {f.n}], y [{f.n}, 1] in 1–10",
            check=_svhn_check(f.n),
            url=SVHN_URL + f.name,
        )
        for f in SVHN.values()
    )
    return DatasetSpec(
        name="svhn",
        title="SVHN (Street View House Numbers), cropped 32×32 digits",
        folder=SVHN_FOLDER,
        files=files,
        returns="x float32 [N, 3, 32, 32] in [0, 1], y int64 labels 0–9 (10 → 0); "
        "73,257 train / 26,032 test",
        source="http://ufldl.stanford.edu/housenumbers/",
        licence="non-commercial use only; cite Netzer et al. (2011)",
    )


FILE_DATASETS: dict[str, DatasetSpec] = {
    "mnist": _idx_spec(
        "mnist",
        "MNIST handwritten digits",
        "http://yann.lecun.com/exdb/mnist/",
        "CC BY-SA 3.0 (Y. LeCun, C. Cortes, C. J. C. Burges)",
    ),
    "fashion_mnist": _idx_spec(
        "fashion_mnist",
        "Fashion-MNIST (Zalando article images)",
        "https://github.com/zalandoresearch/fashion-mnist",
        "MIT (Zalando SE)",
    ),
    "cifar10": _cifar_spec("cifar10", "CIFAR-10 (10 classes of 32×32 colour images)"),
    "cifar100": _cifar_spec("cifar100", "CIFAR-100 (100 fine classes of 32×32 colour images)"),
    "svhn": _svhn_spec(),
}


class GeneratedInfo(NamedTuple):
    """A generated data set: what it is and where it comes from."""

    title: str
    returns: str
    procedure: str
    source: str
    licence: str


GENERATED: dict[str, GeneratedInfo] = {
    "curves": GeneratedInfo(
        title="CURVES (synthetic, generated; Hinton & Salakhutdinov 2006)",
        returns="x = y float32 [N, 784] in [0, 1] (autoencoder); 20,000 train / 10,000 test",
        procedure="quadratic Bézier curve through 3 random control points, anti-aliased "
        "1-px stroke in 28×28 (see twolevel_kfac.experiments.data.curves)",
        source="generated here; the original digs3pts_1.mat is not used",
        licence="none needed (synthetic)",
    ),
    "faces": GeneratedInfo(
        title="FACES-like (generated from scikit-image's lfw_subset)",
        returns="x = y float32 [N, 625] in [0, 1] (autoencoder); 20,000 train / 5,000 test",
        procedure="25×25 LFW faces (0–79 train, 80–99 test) under random rotation ±30°, "
        "scale 0.8–1.2, shift ±2 px, bilinear (see twolevel_kfac.experiments.data.faces)",
        source="skimage.data.lfw_subset() (Labeled Faces in the Wild, "
        "http://vis-www.cs.umass.edu/lfw/); the original newfaces_rot_single.mat is not used",
        licence="LFW images: research use, no licence stated; scikit-image: BSD-3-Clause",
    ),
}

TEXT: dict[str, GeneratedInfo] = {
    "stdlib_chars": GeneratedInfo(
        title="Python standard library source text, character level (next-character prediction)",
        returns="x, y int64 [N, context] token ids 0–127, y = x shifted by one character "
        "(context: dataset.context, default 128); the windows of the first 90 % of the "
        "characters train, of the last 10 % test",
        procedure="the *.py files directly inside sysconfig.get_paths()['stdlib'] (not its "
        "subfolders), sorted by name, read as UTF-8 (errors='replace') and concatenated; a "
        "code point below 128 is its own id, every other character id 0; non-overlapping "
        "windows of context + 1 characters (see twolevel_kfac.experiments.data.text)",
        source="the standard library of the running Python: another Python version gives "
        "another corpus (compare the md5 below)",
        licence="PSF License Version 2 (the CPython sources)",
    ),
}

KNOWN_NAMES: tuple[str, ...] = (
    "mnist",
    "fashion_mnist",
    "curves",
    "faces",
    "cifar10",
    "cifar100",
    "svhn",
    "stdlib_chars",
)


def known_names_error(name: str) -> ValueError:
    """The error for an unknown data set name, listing the known ones.

    Args:
        name: The name given.

    Returns:
        The exception to raise.
    """
    return ValueError(f"unknown data set {name!r}; known data sets: {', '.join(KNOWN_NAMES)}")
