"""``tlkfac data fetch|verify|info``: good files, corrupt files, unknown names, imports."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from test_data_formats import write_fake_cifar10
from twolevel_kfac.cli import main
from twolevel_kfac.experiments.data import faces, registry
from twolevel_kfac.experiments.data.cifar import file_md5
from twolevel_kfac.experiments.data.idx import repo_root
from twolevel_kfac.experiments.data.registry import FILE_DATASETS, KNOWN_NAMES

# ----------------------------------------------------------------------------- helpers


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def fake_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny MNIST files in ``tmp_path/data/mnist``; the registry accepts their md5s."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    files = []
    for spec, n in zip(FILE_DATASETS["mnist"].files, (6, 6, 4, 4), strict=True):
        shape = (n, 28, 28) if "images" in spec.path else (n,)
        path = root / spec.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(_idx(rng.integers(0, 10, shape))))
        files.append(
            dataclasses.replace(spec, md5=(file_md5(path),), check=registry._idx_check(shape))
        )
    fake = dataclasses.replace(FILE_DATASETS["mnist"], files=tuple(files))
    monkeypatch.setitem(FILE_DATASETS, "mnist", fake)
    return root


@pytest.fixture
def fake_cifar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Tiny CIFAR-10 batches (4 images each) in ``tmp_path/src``, accepted by the registry."""
    src = tmp_path / "src"
    folder = write_fake_cifar10(src)
    files = tuple(
        dataclasses.replace(
            f,
            md5=(file_md5(src / f.path),),
            check=registry._cifar_check("labels", 10, 4),
        )
        for f in FILE_DATASETS["cifar10"].files
    )
    archive = src / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    fake = dataclasses.replace(
        FILE_DATASETS["cifar10"], files=files, archive=(str(archive), file_md5(archive))
    )
    monkeypatch.setitem(FILE_DATASETS, "cifar10", fake)
    return src


# ----------------------------------------------------------------------------- verify


def test_verify_good_files(fake_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "verify", "mnist", "--data-dir", str(fake_mnist)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == 4 and "uint8 [6, 28, 28]" in out and "all 4 files verified" in out


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda raw: gzip.compress(b"\x01" + raw[1:]), "bad IDX magic number"),
        (lambda raw: gzip.compress(raw[:-100]), "truncated"),
        (lambda raw: gzip.compress(raw)[:40], "truncated or corrupt gzip"),
        (lambda raw: raw, "bad gzip magic number"),
        (lambda raw: gzip.compress(raw[:-1] + b"\x07"), "wrong md5"),
        (lambda raw: gzip.compress(_idx(np.zeros((5, 28, 28)))), "wrong size"),
        (lambda raw: b"", "empty file"),
    ],
)
def test_verify_corrupt_file(
    fake_mnist: Path, capsys: pytest.CaptureFixture[str], mutate: object, problem: str
) -> None:
    path = fake_mnist / "mnist" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(mutate(raw))  # type: ignore[operator]
    assert main(["data", "verify", "mnist", "--data-dir", str(fake_mnist)]) == 2
    captured = capsys.readouterr()
    assert "error: mnist: 1 of 4 files failed" in captured.err
    assert f"{path}: " in captured.err and problem in captured.err
    assert f"FAILED  {path}" in captured.out and captured.out.count("ok ") == 3


def test_verify_missing_file_and_env(
    fake_mnist: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_mnist / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("TLKFAC_DATA", str(fake_mnist))
    assert main(["data", "verify", "mnist"]) == 2
    assert "t10k-labels-idx1-ubyte.gz: missing file" in capsys.readouterr().err


@pytest.mark.parametrize("action", ["verify", "info", "fetch"])
def test_unknown_name_lists_known(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", action, "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "unknown data set 'imagenet'" in err
    assert all(name in err for name in KNOWN_NAMES)


def test_verify_real_mnist(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(os.environ.get("TLKFAC_DATA") or "")
    if not (root / "mnist").is_dir():
        checkout = repo_root()
        root = checkout.parent / "shared" / "data" if checkout is not None else Path("/none")
    if not (root / "mnist").is_dir():
        pytest.skip("no MNIST files: set TLKFAC_DATA or provide ../shared/data")
    assert main(["data", "verify", "mnist", "--data-dir", str(root)]) == 0
    assert "all 4 files verified" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fetch


def test_fetch_from_flat_folder_and_archive(
    fake_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = fake_cifar / "cifar-10-batches-py"  # the data set's own folder
    dest = tmp_path / "dest"
    assert main(["data", "fetch", "cifar10", "--from", str(flat), "--data-dir", str(dest)]) == 0
    for name in ("data_batch_1", "data_batch_5", "test_batch"):
        installed = dest / "cifar-10-batches-py" / name
        assert installed.read_bytes() == (flat / name).read_bytes()
    assert main(["data", "verify", "cifar10", "--data-dir", str(dest)]) == 0
    only_tar = tmp_path / "downloads"
    only_tar.mkdir()
    (fake_cifar / "cifar-10-python.tar.gz").rename(only_tar / "cifar-10-python.tar.gz")
    dest2 = tmp_path / "dest2"
    assert (
        main(["data", "fetch", "cifar10", "--from", str(only_tar), "--data-dir", str(dest2)]) == 0
    )
    assert "extracting" in capsys.readouterr().out
    assert (dest2 / "cifar-10-batches-py" / "test_batch").is_file()


def test_fetch_from_refuses_bad_files(
    fake_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = fake_cifar / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:-9])
    dest = tmp_path / "dest"
    args = ["data", "fetch", "cifar10", "--from", str(fake_cifar), "--data-dir", str(dest)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data_batch_3" in err and "truncated" in err
    assert not list(dest.rglob("data_batch_*")), "nothing is installed when a file is bad"
    (folder / "test_batch").unlink()
    (fake_cifar / "cifar-10-python.tar.gz").unlink()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cifar10: 2 of 6 files missing or bad" in err and "test_batch not found" in err
    args[4] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    assert main(args) == 2
    assert "neither the files of cifar10 (cifar-10-batches-py/" in capsys.readouterr().err
    write_fake_cifar10(tmp_path / "other", n=3)
    (tmp_path / "other" / "cifar-10-batches-py" / "test_batch").unlink()
    args[4] = str(tmp_path / "other")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cifar10: 6 of 6 files missing or bad" in err and "test_batch not found" in err
    assert "wrong size: 3 images, expected 4" in err


def test_fetch_without_network_suggests_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(*args: object, **kwargs: object) -> object:
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["data", "fetch", "svhn", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not download train_32x32.mat" in err and "--from DIR" in err
    assert not list(tmp_path.rglob("*.mat"))


def test_fetch_and_verify_generated_faces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("skimage")
    monkeypatch.setattr(faces, "N_TRAIN", 80)
    monkeypatch.setattr(faces, "N_TEST", 70)
    args = ["faces", "--data-dir", str(tmp_path), "--seed", "4"]
    assert main(["data", "fetch", *args]) == 0
    path = tmp_path / "faces" / "faces_seed4.npz"
    assert path.is_file()
    assert main(["data", "verify", *args]) == 0
    assert "match a regeneration" in capsys.readouterr().out
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test"][3, 100] += 0.5
    np.savez_compressed(path, **arrays)
    assert main(["data", "verify", *args]) == 2
    assert "content differs" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:300])
    assert main(["data", "verify", *args]) == 2
    assert "unreadable" in capsys.readouterr().err
    path.unlink()
    assert main(["data", "verify", *args]) == 2
    assert "missing cache file" in capsys.readouterr().err
    assert main(["data", "fetch", *args, "--from", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- info


def test_info(fake_mnist: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", "mnist", "--data-dir", str(fake_mnist)]) == 0
    out = capsys.readouterr().out
    assert "MNIST" in out and "licence" in out and "https://" in out
    assert str(fake_mnist / "mnist") in out and FILE_DATASETS["mnist"].files[0].md5[0] in out
    assert main(["data", "info", "cifar-100", "--data-dir", str(fake_mnist)]) == 0
    out = capsys.readouterr().out
    assert "cifar-100-python.tar.gz" in out and "missing" in out and "fine_labels" in out
    assert main(["data", "info", "curves", "--data-dir", str(fake_mnist)]) == 0
    assert "not generated yet" in capsys.readouterr().out
