"""``.npz`` caches of generated data sets (FACES; CURVES has its own equivalent).

A cache file holds the arrays plus ``key``, a string naming the procedure and its
constants; a file whose key differs is stale and regenerated. Files are written to a
temporary name and renamed, so readers never see half-written caches.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from twolevel_kfac.experiments.data.idx import ENV_VAR, repo_root

__all__ = ["cache_dirs", "read_npz_cache", "write_npz_cache"]


def cache_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Candidate base directories, in order: explicit > ``$TLKFAC_DATA`` > ``<repo>/data``.

    Args:
        data_dir: Explicit base directory; when given it is the only candidate.

    Returns:
        The candidates (``<cwd>/data`` replaces ``<repo>/data`` outside a checkout).
    """
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    root = repo_root()
    dirs.append((root if root is not None else Path.cwd()) / "data")
    return dirs


def read_npz_cache(
    path: Path, key: str, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    """Arrays of a cache file, or ``None`` when it is missing, stale or unreadable.

    Args:
        path: The ``.npz`` file.
        key: The expected procedure key.
        shapes: Expected array names and shapes.

    Returns:
        The arrays (float32), or ``None``.
    """
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "key" not in z.files or str(z["key"]) != key:
                return None
            arrays = {name: z[name] for name in shapes if name in z.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        warnings.warn(f"ignoring unreadable cache {path}: {exc}", stacklevel=3)
        return None
    if any(name not in arrays or arrays[name].shape != s for name, s in shapes.items()):
        return None
    return {name: a.astype(np.float32, copy=False) for name, a in arrays.items()}


def write_npz_cache(
    dirs: list[Path], relative: str, key: str, arrays: dict[str, np.ndarray]
) -> Path | None:
    """Save arrays to the first writable candidate directory.

    Args:
        dirs: Candidate base directories.
        relative: Path of the file below a base directory (``faces/faces_seed0.npz``).
        key: The procedure key stored with the arrays.
        arrays: Arrays to store.

    Returns:
        The written path, or ``None`` (with a warning) when no candidate is writable.
    """
    for base in dirs:
        path = base / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, key=np.array(key), **arrays)  # type: ignore[arg-type]
            tmp.replace(path)
            return path
        except OSError:
            continue
    warnings.warn(f"could not cache {relative} in any of {[str(d) for d in dirs]}", stacklevel=3)
    return None
