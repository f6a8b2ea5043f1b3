"""Data: CIFAR pickles (restricted unpickler), SVHN .mat files and the FACES generator."""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from twolevel_kfac.experiments.data import faces, load_dataset
from twolevel_kfac.experiments.data.cifar import (
    CIFAR_DATASETS,
    RestrictedUnpickler,
    file_md5,
    load_cifar,
    read_cifar_batch,
    restricted_load,
)
from twolevel_kfac.experiments.data.svhn import SVHN, load_svhn, read_svhn_mat

# ----------------------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Writes ``bytes`` as Python 2 ``str`` (BINSTRING), like the official CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _py2_pickle(obj: object) -> bytes:
    """A protocol-2 pickle as Python 2 wrote it (``numpy.core`` module, byte strings)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_batch(n: int, n_classes: int, label_key: bytes, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"testing batch",
        label_key: [int(v) for v in rng.integers(0, n_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [b"img%d.png" % i for i in range(n)],
    }


def write_fake_cifar10(root: Path, n: int = 4) -> Path:
    """Six python-2 style batches of ``n`` images under ``root/cifar-10-batches-py``."""
    folder = root / CIFAR_DATASETS["cifar10"].folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, _) in enumerate(CIFAR_DATASETS["cifar10"].train + CIFAR_DATASETS["cifar10"].test):
        (folder / name).write_bytes(_py2_pickle(_cifar_batch(n, 10, b"labels", i)))
    return folder


def write_fake_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> Path:
    """``train``/``test`` written by Python 3 (protocol 4, byte-string keys)."""
    folder = root / CIFAR_DATASETS["cifar100"].folder
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        batch = _cifar_batch(n, 100, b"fine_labels", seed)
        batch[b"coarse_labels"] = [0] * n
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return folder


def test_cifar10_py2_pickles_load(tmp_path: Path) -> None:
    folder = write_fake_cifar10(tmp_path)
    tx, ty, vx, vy = load_cifar("cifar10", tmp_path, verify=False)
    assert tx.shape == (20, 3, 32, 32) and vx.shape == (4, 3, 32, 32)
    assert tx.dtype == torch.float32 and ty.dtype == torch.int64 and vy.shape == (4,)
    raw = restricted_load(folder / "data_batch_2")
    assert set(raw) >= {"data", "labels", "batch_label"}  # Python 2 strings → str
    np.testing.assert_array_equal(ty[4:8].numpy(), raw["labels"])
    # channel-major rows: the first 1024 values are the red plane, row-major
    np.testing.assert_allclose(tx[4, 0].numpy() * 255, raw["data"][0, :1024].reshape(32, 32))
    np.testing.assert_allclose(tx[4, 2, 0, 5] * 255, raw["data"][0, 2048 + 5], rtol=1e-6)
    assert 0.0 <= float(tx.min()) and float(tx.max()) <= 1.0


def test_cifar100_and_load_dataset(tmp_path: Path) -> None:
    write_fake_cifar100(tmp_path)
    tx, ty, vx, vy = load_dataset("cifar100", tmp_path, verify=False, n_train=5)
    assert tx.shape == (5, 3, 32, 32) and ty.shape == (5,) and vx.shape == (3, 3, 32, 32)
    assert int(ty.max()) < 100 and vy.dtype == torch.int64
    with pytest.raises(ValueError, match="wrong md5"):
        load_cifar("cifar100", tmp_path)  # not the official files


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    for protocol in (0, 2, 4, 5):
        path.write_bytes(pickle.dumps({"data": _Evil(marker)}, protocol=protocol))
        with pytest.raises(ValueError, match=r"refusing to unpickle global (posix|os|nt)\.system"):
            read_cifar_batch(path, "labels", 10)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        RestrictedUnpickler(io.BytesIO(b"cbuiltins\neval\n(S'1'\ntR.")).load()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"PK\x03\x04 not a pickle", "bad magic number"),
        (_py2_pickle(_cifar_batch(3, 10, b"labels", 0))[:500], "corrupt or truncated"),
        (pickle.dumps([1, 2], protocol=2), "expected a pickled dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=4), "missing key"),
        (pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}), "empty data set"),
        (pickle.dumps({b"data": np.zeros((2, 30), np.uint8), b"labels": [0, 1]}), "shape"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "outside"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 integer"),
        (pickle.dumps({b"data": np.array([[1, "a"]], dtype=object), b"labels": [0]}), "uint8"),
    ],
)
def test_bad_cifar_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_cifar_batch(path, "labels", 10)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- SVHN


def write_fake_svhn(root: Path, n_train: int = 5, n_test: int = 3) -> Path:
    from scipy.io import savemat

    folder = root / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1 … 10
        savemat(folder / SVHN[split].name, {"X": x, "y": y})
    return folder


def test_svhn_mat_files(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    from scipy.io import loadmat

    folder = write_fake_svhn(tmp_path, n_train=12)
    images, labels = read_svhn_mat(folder / "train_32x32.mat")
    x = loadmat(folder / "train_32x32.mat")["X"]
    assert images.shape == (12, 3, 32, 32) and images.dtype == np.uint8
    assert images[7, 2, 4, 9] == x[4, 9, 2, 7]  # [N, C, H, W] ← [H, W, C, N]
    assert labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # 10 means digit 0
    tx, ty, vx, vy = load_svhn(tmp_path, verify=False)
    assert vy.tolist() == [1, 2, 3]
    assert tx.shape == (12, 3, 32, 32) and vx.shape == (3, 3, 32, 32) and tx.dtype == torch.float32
    assert ty.dtype == torch.int64 and float(tx.max()) <= 1.0
    assert load_dataset("svhn", tmp_path, verify=False, n_test=2)[2].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="wrong md5"):
        read_svhn_mat(folder / "test_32x32.mat", md5=SVHN["test"].md5)


def test_bad_svhn_files(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    from scipy.io import savemat

    folder = write_fake_svhn(tmp_path)
    good = (folder / "train_32x32.mat").read_bytes()
    cases = {
        "notmat.mat": (b"hello" * 40, "bad magic number"),
        "v73.mat": (b"MATLAB 7.3 MAT-file" + bytes(200), "HDF5"),
        "cut.mat": (good[: len(good) // 2], "unreadable MAT file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_svhn_mat(tmp_path / name)
    savemat(
        tmp_path / "empty.mat", {"X": np.zeros((32, 32, 3, 0), np.uint8), "y": np.zeros((0, 1))}
    )
    with pytest.raises(ValueError, match="empty data set"):
        read_svhn_mat(tmp_path / "empty.mat")
    savemat(tmp_path / "y0.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.zeros((2, 1))})
    with pytest.raises(ValueError, match="labels in 1–10"):
        read_svhn_mat(tmp_path / "y0.mat")
    with pytest.raises(FileNotFoundError, match="missing data file"):
        read_svhn_mat(tmp_path / "nope.mat")


# ----------------------------------------------------------------------------- FACES


def test_faces_deterministic_shapes_range() -> None:
    pytest.importorskip("skimage")
    train, test = faces.generate_faces(40, 12, seed=1)
    assert train.shape == (40, 625) and test.shape == (12, 625) and train.dtype == np.float32
    assert train.min() >= 0.0 and train.max() <= 1.0 and train.std() > 0.1
    again = faces.generate_faces(40, 12, seed=1)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[1])
    assert not np.array_equal(train, faces.generate_faces(40, 12, seed=2)[0])
    head = faces.generate_faces(7, 5, seed=1)  # the first images do not depend on n
    np.testing.assert_array_equal(head[0], train[:7])
    np.testing.assert_array_equal(head[1], test[:5])


def test_faces_train_test_sources_disjoint(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("skimage")
    seen: list[np.ndarray] = []
    warp = faces.warp_bilinear

    def spy(images: np.ndarray, src: np.ndarray, maps: np.ndarray) -> np.ndarray:
        seen.append(src.copy())
        return warp(images, src, maps)

    monkeypatch.setattr(faces, "warp_bilinear", spy)
    faces.generate_faces(400, 200, seed=0)
    train_src, test_src = seen
    assert set(train_src) <= set(range(80)) and len(set(train_src)) > 60
    assert set(test_src) <= set(range(80, 100)) and len(set(test_src)) > 15


def test_faces_warp_matches_skimage() -> None:
    skimage_transform = pytest.importorskip("skimage.transform")
    source = faces.source_faces()
    u = np.random.default_rng(3).random((6, 5))
    maps = faces.inverse_maps(u)
    src = np.arange(6) * 7
    ours = faces.warp_bilinear(source, src, maps)
    for k in range(6):
        matrix = np.vstack([maps[k], [0.0, 0.0, 1.0]])
        ref = skimage_transform.warp(
            source[src[k]],
            skimage_transform.AffineTransform(matrix=matrix),
            order=1,
            mode="edge",
            preserve_range=True,
        )
        np.testing.assert_allclose(ours[k], ref.ravel(), atol=1e-5)
    identity = faces.inverse_maps(np.full((1, 5), 0.5))  # θ = 0, s = 1, t = 0
    np.testing.assert_allclose(faces.warp_bilinear(source, src[:1], identity)[0], source[0].ravel())


def test_faces_cache_and_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("skimage")
    monkeypatch.setattr(faces, "N_TRAIN", 30)
    monkeypatch.setattr(faces, "N_TEST", 10)
    tx, ty, vx, vy = load_dataset("faces", tmp_path, seed=2)
    assert tx.shape == (30, 625) and vx.shape == (10, 625)
    assert torch.equal(ty, tx) and torch.equal(vy, vx)
    path = tmp_path / "faces" / "faces_seed2.npz"
    assert path.is_file() and file_md5(path)

    def boom(*args: object, **kwargs: object) -> object:
        raise AssertionError("cache was not reused")

    monkeypatch.setattr(faces, "generate_faces", boom)
    assert torch.equal(faces.load_faces(tmp_path, seed=2)[0], tx)
    with pytest.raises(ValueError, match="FACES has no labels"):
        load_dataset("faces", tmp_path, autoencoder=False)
