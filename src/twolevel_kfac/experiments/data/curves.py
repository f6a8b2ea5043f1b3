"""Synthetic CURVES data set (Hinton & Salakhutdinov 2006), generated deterministically.

The original CURVES files (``digs3pts_1.mat``) are not available offline, so we rebuild a
data set of the same kind: 28×28 grey-level images of one smooth curve each, 20,000 for
training and 10,000 for testing, 784 features in [0, 1].

Procedure (``generate_curves``, all numbers in pixel units, pixel (row i, column j) has
its centre at (x, y) = (j, i), so the image covers [-0.5, 27.5]²):

1. ``rng = numpy.random.default_rng(seed)``; draw the control points of all
   ``n_train + n_test`` images at once, ``P = rng.uniform(2.0, 25.0, size=(N, 3, 2))``
   (float64, order (image, point, (x, y))), so a curve never starts at the border.
   Images ``0 … n_train-1`` are the training set, the rest the test set; the chunk size
   used for rendering has no influence on the result.
2. The curve is the quadratic Bézier curve with these control points,
   C(t) = (1−t)² P₀ + 2t(1−t) P₁ + t² P₂, t ∈ [0, 1]: it starts at P₀, ends at P₂ and
   bends towards P₁ (C(½) is halfway between P₁ and the midpoint of P₀P₂), so it is a
   smooth arc without cusps that stays in the triangle P₀P₁P₂, inside the image.
3. C is replaced by the polyline through C(k/K), k = 0 … K with K = 24 segments. The
   chord deviates from the curve by at most ‖C''‖/(8K²) ≤ 0.03 px for these points.
4. Each pixel centre p gets the Euclidean distance d(p) to the polyline (exact
   point-to-segment distance, minimum over segments), and the intensity
   I(p) = clip((w + 1)/2 − d(p), 0, 1) with stroke width w = 1: the area-coverage
   approximation of an anti-aliased line of width w seen through a 1-pixel box
   filter (pixels on the curve get 1, pixels one pixel away get 0).
5. Images are flattened row-major to ``[N, 784]`` float32.

Generating 30,000 images takes a few seconds on one CPU core (vectorised over a
chunk of images × 784 pixels × K segments). ``load_curves`` caches the result as a
compressed ``.npz`` at ``<data_dir>/curves/curves_seed{seed}.npz``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from twolevel_kfac.experiments.data.cache import cache_dirs

__all__ = [
    "N_TEST",
    "N_TRAIN",
    "curves_cache_key",
    "curves_cache_path",
    "generate_curves",
    "load_curves",
]

N_TRAIN = 20_000
N_TEST = 10_000
SIDE = 28
SEGMENTS = 24  # K: polyline segments per curve
STROKE_WIDTH = 1.0  # w: stroke width in pixels
POINT_RANGE = (2.0, 25.0)  # control points ~ U[2, 25]² in pixel coordinates
CACHE_VERSION = 2  # bump when the procedure above changes: old caches are regenerated
_CHUNK = 64  # images per vectorised block (~5 MB temporaries)


def _polylines(ctrl: np.ndarray, segments: int) -> np.ndarray:
    """Vertices C(k/K) of the quadratic Bézier curves with control points P₀, P₁, P₂.

    Args:
        ctrl: Control points P, shape ``[N, 3, 2]``.
        segments: Number of polyline segments K.

    Returns:
        float32 array ``[N, K+1, 2]``.
    """
    t = np.linspace(0.0, 1.0, segments + 1)
    basis = np.stack([(1 - t) ** 2, 2 * t * (1 - t), t**2], axis=1)  # [K+1, 3]
    return np.einsum("kj,njd->nkd", basis, ctrl).astype(np.float32)


def _render_chunk(verts: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased rendering I(p) = clip((w+1)/2 − d(p), 0, 1) of polylines.

    Args:
        verts: Polyline vertices ``[n, K+1, 2]`` in pixel coordinates (x, y).
        width: Stroke width w in pixels.

    Returns:
        float32 images ``[n, 784]``.
    """
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    px, py = xs.reshape(1, -1, 1), ys.reshape(1, -1, 1)  # [1, 784, 1]
    a, b = verts[:, :-1], verts[:, 1:]  # segment ends, [n, K, 2]
    ax, ay = a[..., 0][:, None, :], a[..., 1][:, None, :]
    dx = (b[..., 0] - a[..., 0])[:, None, :]
    dy = (b[..., 1] - a[..., 1])[:, None, :]
    inv_len2 = 1.0 / np.maximum(dx * dx + dy * dy, np.float32(1e-12))
    rx, ry = px - ax, py - ay  # [n, 784, K]
    s = np.clip((rx * dx + ry * dy) * inv_len2, 0.0, 1.0)  # projection onto segment
    rx -= s * dx
    ry -= s * dy
    dist = np.sqrt((rx * rx + ry * ry).min(axis=2))
    return np.clip(np.float32((width + 1.0) / 2.0) - dist, 0.0, 1.0).astype(np.float32)


def generate_curves(
    n: int = N_TRAIN + N_TEST, seed: int = 0, width: float = STROKE_WIDTH
) -> np.ndarray:
    """Generate ``n`` CURVES images by the procedure of the module docstring.

    Args:
        n: Number of images.
        seed: Seed of the ``numpy.random.Generator`` that draws the control points.
        width: Stroke width w in pixels.

    Returns:
        float32 array ``[n, 784]`` with values in [0, 1].
    """
    rng = np.random.default_rng(seed)
    ctrl = rng.uniform(*POINT_RANGE, size=(n, 3, 2))
    verts = _polylines(ctrl, SEGMENTS)
    out = np.empty((n, SIDE * SIDE), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = _render_chunk(verts[start : start + _CHUNK], width)
    return out


def curves_cache_path(data_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Path of the cache file ``<data_dir>/curves/curves_seed{seed}.npz``.

    Args:
        data_dir: Base data directory; ``None`` means ``TLKFAC_DATA``, else ``<repo>/data``.
        seed: Generator seed.

    Returns:
        The cache path in the first candidate directory.
    """
    return cache_dirs(data_dir)[0] / "curves" / f"curves_seed{seed}.npz"


def curves_cache_key() -> str:
    """Identifies the procedure and its constants; a cache with another key is stale.

    Returns:
        The key string.
    """
    return f"v{CACHE_VERSION}-K{SEGMENTS}-w{STROKE_WIDTH}-P{POINT_RANGE}-{SIDE}px"


def _read_cache(path: Path, n_total: int) -> np.ndarray | None:
    """Images from a cache file, or ``None`` when it is missing, stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            key = str(z["key"]) if "key" in z.files else None
            ok = key == curves_cache_key() and int(z["n"]) == n_total
            images = z["images"] if ok else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        warnings.warn(f"ignoring unreadable CURVES cache {path}: {exc}", stacklevel=3)
        return None
    if images is None or images.shape != (n_total, SIDE * SIDE):
        return None
    return images.astype(np.float32, copy=False)


def _write_cache(dirs: list[Path], name: str, images: np.ndarray) -> Path | None:
    """Save to the first writable candidate directory; ``None`` when none is writable."""
    for base in dirs:
        path = base / "curves" / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, images=images, key=curves_cache_key(), n=len(images))
            tmp.replace(path)  # atomic: readers never see a half-written file
            return path
        except OSError:
            continue
    warnings.warn(f"could not cache CURVES in any of {[str(d) for d in dirs]}", stacklevel=3)
    return None


def load_curves(
    data_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CURVES train/test images, generated once and cached.

    The cache is looked up in (and written to the first writable of) the explicit
    ``data_dir``, else ``$TLKFAC_DATA`` and ``<repo>/data``.

    Args:
        data_dir: Base data directory (the cache lives in its ``curves/`` subfolder).
        seed: Generator seed.

    Returns:
        ``(train_x [20000, 784], test_x [10000, 784])``, float32 in [0, 1].
    """
    n_total = N_TRAIN + N_TEST
    dirs = cache_dirs(data_dir)
    name = f"curves_seed{seed}.npz"
    images = None
    for base in dirs:
        images = _read_cache(base / "curves" / name, n_total)
        if images is not None:
            break
    if images is None:
        images = generate_curves(n_total, seed=seed)
        _write_cache(dirs, name, images)
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x[:N_TRAIN].clone(), x[N_TRAIN:].clone()
