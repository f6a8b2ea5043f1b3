"""Data: CURVES generator (determinism, range, cache) and IDX loaders (good and bad files)."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from twolevel_kfac.experiments.data import curves, idx, load_dataset
from twolevel_kfac.experiments.data.curves import generate_curves, load_curves
from twolevel_kfac.experiments.data.idx import (
    DATASETS,
    load_idx_dataset,
    parse_idx,
    read_idx,
    repo_root,
    resolve_data_dir,
)

# ----------------------------------------------------------------------------- CURVES


def test_curves_deterministic_and_in_range() -> None:
    a = generate_curves(200, seed=3)
    b = generate_curves(200, seed=3)
    c = generate_curves(200, seed=4)
    assert a.shape == (200, 784) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # every point is within √2/2 of a pixel centre, so each image has a pixel ≥ 1 − √2/2
    assert (a.max(axis=1) >= 1 - 0.5**0.5).all()
    assert np.median(a.max(axis=1)) > 0.9
    ink = (a > 0).mean(axis=1)
    assert (ink > 0.005).all() and (ink < 0.25).all(), "thin strokes, never empty"


def test_curves_prefix_independent_of_n() -> None:
    """The first images do not depend on how many are generated (chunking is invisible)."""
    np.testing.assert_array_equal(generate_curves(70, seed=1)[:5], generate_curves(5, seed=1))


def test_curves_straight_segment_is_rendered_exactly() -> None:
    """Collinear control points on row 10 from x=3 to x=20: a 1-px horizontal line."""
    verts = curves._polylines(np.array([[[3.0, 10.0], [11.5, 10.0], [20.0, 10.0]]]), 24)
    img = curves._render_chunk(verts, width=1.0).reshape(28, 28)
    np.testing.assert_allclose(img[10, 3:21], 1.0, atol=1e-6)
    assert img[9].max() == pytest.approx(0.0, abs=1e-6)  # neighbours at distance 1 get 0
    assert img.sum() == pytest.approx(18.0, abs=1e-4)


def test_curves_cache_is_written_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(curves, "N_TRAIN", 40)
    monkeypatch.setattr(curves, "N_TEST", 10)
    train, test = load_curves(tmp_path, seed=7)
    path = tmp_path / "curves" / "curves_seed7.npz"
    assert path.is_file()
    assert train.shape == (40, 784) and test.shape == (10, 784) and train.dtype == torch.float32
    expected = generate_curves(50, seed=7)
    np.testing.assert_array_equal(torch.cat([train, test]).numpy(), expected)

    def boom(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("cache was not reused")

    monkeypatch.setattr(curves, "generate_curves", boom)
    train2, _ = load_curves(tmp_path, seed=7)
    assert torch.equal(train, train2)


def test_curves_stale_cache_is_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curves, "N_TRAIN", 8)
    monkeypatch.setattr(curves, "N_TEST", 2)
    path = tmp_path / "curves" / "curves_seed0.npz"
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, images=np.zeros((10, 784), np.float32), key="v0", n=10)
    train, _ = load_curves(tmp_path, seed=0)
    assert train.abs().sum() > 0


def test_curves_unwritable_cache_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curves, "N_TRAIN", 4)
    monkeypatch.setattr(curves, "N_TEST", 2)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(UserWarning, match="could not cache CURVES"):
        train, test = load_curves(not_a_dir, seed=0)
    assert train.shape == (4, 784) and test.shape == (2, 784)


def test_curves_truncated_cache_is_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(curves, "N_TRAIN", 6)
    monkeypatch.setattr(curves, "N_TEST", 2)
    path = tmp_path / "curves" / "curves_seed0.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="ignoring unreadable CURVES cache"):
        train, _ = load_curves(tmp_path, seed=0)
    np.testing.assert_array_equal(train.numpy(), generate_curves(8, seed=0)[:6])


def test_load_dataset_curves_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(curves, "N_TRAIN", 30)
    monkeypatch.setattr(curves, "N_TEST", 10)
    tx, ty, vx, vy = load_dataset("curves", tmp_path, n_train=12, n_test=4)
    assert tx.shape == (12, 784) and vx.shape == (4, 784)
    assert torch.equal(ty, tx) and torch.equal(vy, vx)
    with pytest.raises(ValueError, match="CURVES has no labels"):
        load_dataset("curves", tmp_path, autoencoder=False)
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        load_dataset("cifar")


# ----------------------------------------------------------------------------- IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_gz(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw))
    return path


@pytest.fixture
def tiny_images() -> np.ndarray:
    return np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)


def test_read_idx_good_file_and_md5(tmp_path: Path, tiny_images: np.ndarray) -> None:
    raw = _idx_bytes(tiny_images)
    path = _write_gz(tmp_path / "imgs-idx3-ubyte.gz", raw)
    np.testing.assert_array_equal(read_idx(path), tiny_images)
    raw_md5 = hashlib.md5(raw).hexdigest()
    gz_md5 = hashlib.md5(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(read_idx(path, md5=[raw_md5]), tiny_images)
    np.testing.assert_array_equal(read_idx(path, md5=[gz_md5.upper()]), tiny_images)


def test_parse_idx_multibyte_big_endian() -> None:
    values = np.array([1, -2, 300], dtype=">i4")
    raw = struct.pack(">BBBBI", 0, 0, 0x0C, 1, 3) + values.tobytes()
    out = parse_idx(raw)
    np.testing.assert_array_equal(out, [1, -2, 300])
    assert out.dtype.isnative


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: b"\x01" + raw[1:], "bad IDX magic number"),
        (lambda raw: raw[:2] + b"\x42" + raw[3:], "bad IDX magic number"),
        (lambda raw: raw[:-7], "truncated"),
        (lambda raw: raw[:10], "truncated IDX header"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
        (lambda raw: b"", "empty file"),
    ],
)
def test_read_idx_bad_content(
    tmp_path: Path, tiny_images: np.ndarray, mutate: Callable[[bytes], bytes], message: str
) -> None:
    path = _write_gz(tmp_path / "bad-idx3-ubyte.gz", mutate(_idx_bytes(tiny_images)))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_wrong_md5(tmp_path: Path, tiny_images: np.ndarray) -> None:
    path = _write_gz(tmp_path / "x-idx3-ubyte.gz", _idx_bytes(tiny_images))
    with pytest.raises(ValueError, match="wrong md5") as info:
        read_idx(path, md5=["0" * 32])
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip_and_missing(tmp_path: Path, tiny_images: np.ndarray) -> None:
    path = _write_gz(tmp_path / "x-idx3-ubyte.gz", _idx_bytes(tiny_images) * 50)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="not a valid gzip file"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match=r"missing data file .*nope\.gz"):
        read_idx(tmp_path / "nope.gz")


def _write_fake_mnist(root: Path, n_train: int = 6, n_test: int = 4) -> None:
    rng = np.random.default_rng(0)
    spec = DATASETS["mnist"]
    for img, lab, n in (
        (spec.train_images, spec.train_labels, n_train),
        (spec.test_images, spec.test_labels, n_test),
    ):
        _write_gz(root / "mnist" / f"{img.name}.gz", _idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        _write_gz(root / "mnist" / f"{lab.name}.gz", _idx_bytes(rng.integers(0, 10, n)))


def test_load_idx_dataset_on_tiny_files(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match="wrong md5"):
        load_idx_dataset("mnist", tmp_path)  # not the official files
    tx, ty, vx, vy = load_idx_dataset("mnist", tmp_path, verify=False)
    assert tx.shape == (6, 784) and tx.dtype == torch.float32
    assert 0.0 <= float(tx.min()) and float(tx.max()) <= 1.0
    assert ty.shape == (6,) and ty.dtype == torch.int64 and vx.shape == (4, 784)
    assert vy.max() < 10
    with pytest.raises(ValueError, match="unknown IDX data set 'svhn'"):
        load_idx_dataset("svhn", tmp_path)


def test_label_count_mismatch(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path)
    lab = tmp_path / "mnist" / f"{DATASETS['mnist'].test_labels.name}.gz"
    _write_gz(lab, _idx_bytes(np.zeros(3)))
    with pytest.raises(ValueError, match="expected 4 labels"):
        load_idx_dataset("mnist", tmp_path, verify=False)


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLKFAC_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(other) == other
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("TLKFAC_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="TLKFAC_DATA"):
        resolve_data_dir()
    monkeypatch.delenv("TLKFAC_DATA")
    monkeypatch.setattr(idx, "repo_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="set TLKFAC_DATA"):
        resolve_data_dir()


def test_resolve_data_dir_picks_the_default_holding_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TLKFAC_DATA", raising=False)
    repo, shared = tmp_path / "repo", tmp_path / "shared" / "data"
    (repo / "data" / "curves").mkdir(parents=True)
    (shared / "mnist").mkdir(parents=True)
    monkeypatch.setattr(idx, "repo_root", lambda: repo)
    assert resolve_data_dir() == shared  # unchanged default without ``require``
    assert resolve_data_dir(require="mnist") == shared
    assert resolve_data_dir(require="svhn") == shared  # nobody has it: the last default
    (repo / "data" / "mnist").mkdir()
    assert resolve_data_dir(require="mnist") == repo / "data"  # where `fetch` installs
    assert resolve_data_dir(tmp_path, require="mnist") == tmp_path  # explicit wins


def test_empty_idx_images_are_refused(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="empty data set"):
        load_idx_dataset("mnist", tmp_path, verify=False)


# ----------------------------------------------------------------------------- real files


def _real_data_dir() -> Path:
    if os.environ.get("TLKFAC_DATA"):
        return Path(os.environ["TLKFAC_DATA"])
    root = repo_root()
    shared = root.parent / "shared" / "data" if root is not None else None
    if shared is None or not (shared / "mnist").is_dir():
        pytest.skip("no MNIST files: set TLKFAC_DATA or provide ../shared/data next to the repo")
    return shared


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_idx_files(name: str) -> None:
    root = _real_data_dir()
    if not (root / DATASETS[name].folder).is_dir():
        pytest.skip(f"no {name} folder in {root}")
    tx, ty, vx, vy = load_idx_dataset(name, root)  # verifies all four md5s
    assert tx.shape == (60000, 784) and vx.shape == (10000, 784)
    assert ty.shape == (60000,) and vy.shape == (10000,)
    assert float(tx.max()) == 1.0 and float(tx.min()) == 0.0
    assert set(ty.unique().tolist()) == set(range(10))
    if name == "mnist":
        assert ty[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
