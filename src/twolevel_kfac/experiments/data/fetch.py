"""Put a file-based data set into a data directory: import local files or download.

``import_dataset`` copies the files of a data set from a local folder (same layout as
the data directory, the data set's folder itself, or a flat folder; or the official
tarball for CIFAR) after checking each one (``registry.check_file``). ``download_dataset``
fetches the official URLs with ``urllib`` and checks them the same way; this is the only
place that touches the network. Files are written under a temporary name and renamed, so
a failed fetch never leaves a half-written file under the final name.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from twolevel_kfac.experiments.data.cifar import file_md5
from twolevel_kfac.experiments.data.registry import (
    DatasetSpec,
    FileReport,
    FileSpec,
    check_file,
    locate,
)

__all__ = ["download_dataset", "import_dataset"]

_TIMEOUT_S = 60.0


def _install(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically (no-op when they are the same file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and target.samefile(source):
        return
    tmp = target.with_name(target.name + ".part")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _extract_archive(archive: Path, md5: str, spec: DatasetSpec, into: Path) -> None:
    """Check the tarball's md5, then write out only the expected members (by name)."""
    got = file_md5(archive)
    if got != md5:
        raise ValueError(f"{archive}: wrong md5 {got}, expected {md5} (corrupt download?)")
    try:
        with tarfile.open(archive, "r:*") as tar:
            for file in spec.files:
                member = tar.extractfile(str(PurePosixPath(file.path)))
                if member is None:
                    raise ValueError(f"{archive}: {file.path} is not a regular file")
                target = into / file.path
                target.parent.mkdir(parents=True, exist_ok=True)
                with target.open("wb") as out:
                    shutil.copyfileobj(member, out)
    except KeyError as exc:
        raise ValueError(f"{archive}: archive lacks {exc}") from exc
    except tarfile.TarError as exc:
        raise ValueError(f"{archive}: corrupt or truncated archive ({exc})") from exc


def _candidates(source_dir: Path, spec: DatasetSpec, file: FileSpec) -> list[Path]:
    """Where a file may sit in a local folder: data-dir layout, data set folder, flat."""
    rel = PurePosixPath(file.path)
    inner = PurePosixPath(*rel.parts[1:]) if rel.parts[0] == spec.folder else rel
    found = []
    for base in (source_dir / rel, source_dir / inner, source_dir / rel.name):
        found += [base, base.with_suffix("")] if base.suffix == ".gz" else [base]
    return list(dict.fromkeys(found))


def import_dataset(
    spec: DatasetSpec, source_dir: Path, data_dir: Path, report: Callable[[str], None] = print
) -> list[FileReport]:
    """Check the data set's files in ``source_dir`` and copy them into ``data_dir``.

    Args:
        spec: The data set.
        source_dir: Local folder with the downloaded files (or the official archive).
        data_dir: Destination data directory (created when missing).
        report: Receives one progress line per file.

    Returns:
        The reports of the installed files.

    Raises:
        FileNotFoundError: ``source_dir`` or one of the files is missing.
        ValueError: A file fails its checks (nothing of it is installed).
    """
    if not source_dir.is_dir():
        raise FileNotFoundError(f"--from {source_dir}: no such directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    found = [any(p.is_file() for p in _candidates(source_dir, spec, f)) for f in spec.files]
    if spec.archive is not None and not all(found):
        archive = source_dir / spec.archive[0].rsplit("/", 1)[-1]
        if archive.is_file():
            with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
                report(f"extracting {archive}")
                _extract_archive(archive, spec.archive[1], spec, Path(tmp))
                return import_dataset(spec, Path(tmp), data_dir, report)
        if not any(found):
            raise FileNotFoundError(
                f"--from {source_dir}: neither the files of {spec.name} ({spec.files[0].path}, "
                f"…) nor its archive {archive.name} are there"
            )
    checked: list[tuple[FileReport, Path]] = []
    missing, bad = [], []
    for file in spec.files:
        paths = [p for p in _candidates(source_dir, spec, file) if p.is_file()]
        if not paths:
            missing.append(f"{file.path} not found in {source_dir}")
            continue
        result = check_file(paths[0], file)
        if not result.ok:
            bad.append(result.message)
        name = file.path if paths[0].suffix == Path(file.path).suffix else file.path[:-3]
        checked.append((result, data_dir / name))
    if missing or bad:
        error = ValueError if bad else FileNotFoundError
        raise error(
            f"{spec.name}: {len(missing) + len(bad)} of {len(spec.files)} files missing or bad "
            f"in {source_dir}, nothing installed:\n  " + "\n  ".join(missing + bad)
        )
    out = []
    for result, target in checked:  # install only once every file passed
        _install(result.path, target)
        report(f"ok      {target}  ({result.message})")
        out.append(result._replace(path=target))
    return out


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` into ``target`` (via ``target.part``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, tmp.open("wb") as out:
        shutil.copyfileobj(response, out)
    tmp.replace(target)


def _download_any(urls: list[str], target: Path, name: str) -> None:
    errors = []
    for url in urls:
        try:
            _download(url, target)
            return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    raise ConnectionError(
        f"could not download {target.name} ({'; '.join(errors)}). Without internet access, "
        f"download the files elsewhere and import them: tlkfac data fetch {name} --from DIR"
    )


def download_dataset(
    spec: DatasetSpec, data_dir: Path, report: Callable[[str], None] = print
) -> list[FileReport]:
    """Download the data set from its official URLs into ``data_dir`` and check it.

    Args:
        spec: The data set.
        data_dir: Destination data directory (created when missing).
        report: Receives one progress line per file.

    Returns:
        The reports of the installed files.

    Raises:
        ConnectionError: A download failed (the message suggests ``--from``).
        ValueError: A downloaded file fails its checks.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        staging = Path(tmp)
        if spec.archive is not None:
            archive = staging / spec.archive[0].rsplit("/", 1)[-1]
            report(f"downloading {spec.archive[0]}")
            _download_any([spec.archive[0]], archive, spec.name)
            _extract_archive(archive, spec.archive[1], spec, staging)
        else:
            for file in spec.files:
                if file.url is None:  # pragma: no cover - every direct file has a URL
                    raise ValueError(f"{spec.name}: no download URL for {file.path}")
                name = file.url.rsplit("/", 1)[-1]
                urls = [file.url] + [mirror + name for mirror in spec.mirrors]
                report(f"downloading {file.url}")
                _download_any(urls, staging / file.path, spec.name)
        return import_dataset(spec, staging, data_dir, report)


def present(spec: DatasetSpec, data_dir: Path) -> list[Path]:
    """The data set's files that exist under ``data_dir``.

    Args:
        spec: The data set.
        data_dir: The data directory.

    Returns:
        Existing file paths.
    """
    return [p for p in (locate(data_dir, f) for f in spec.files) if p.is_file()]
