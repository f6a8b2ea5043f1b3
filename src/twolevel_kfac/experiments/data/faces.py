"""FACES-like data set: 25×25 faces under random rotation, scale and shift (625-dim).

The original FACES set of the deep-autoencoder benchmarks (``newfaces_rot_single.mat``,
Olivetti faces under random rotations and scalings, 625 pixels) is not reachable offline,
so we build one of the same kind from the 100 face images of scikit-image's bundled
``skimage.data.lfw_subset()`` (200 grey images 25×25 in [0, 1], float64; the first 100
are faces from Labeled Faces in the Wild, the rest non-faces, which we do not use).

Procedure (``generate_faces``; sizes ``N_TRAIN`` = 20,000 and ``N_TEST`` = 5,000, default
seed 0; pixel (row i, column j) has its centre at (x, y) = (j, i), image centre
c = (12, 12)):

1. Split by source face, so test faces are unseen in training: faces 0–79 feed the
   training set, faces 80–99 the test set (the subset may show a person twice, so
   "unseen" means unseen images, not necessarily unseen identities).
2. Each split has its own generator, ``numpy.random.default_rng([seed, 0])`` for train and
   ``[seed, 1]`` for test, drawing ``u = rng.random((n, 5))`` at once (float64), one row
   per image, so the first k images do not depend on n. Row (u₀ … u₄) gives the source
   face ``first + ⌊u₀·count⌋``, the rotation θ = (2u₁−1)·30°, the scale
   s = 0.8 + 0.4·u₂ and the shift t = ((2u₃−1)·2, (2u₄−1)·2) pixels.
3. The output pixel p takes the source value at q = c + s⁻¹ R(−θ)(p − c − t), i.e. the
   face is rotated by θ and scaled by s about its centre, then shifted by t; the value is
   interpolated bilinearly, coordinates outside the face clamped to its border (what
   ``skimage.transform.warp(face, AffineTransform(matrix=M), order=1, mode="edge")`` does;
   we vectorise it over all images with numpy, and the tests check the two agree).
4. Images are flattened row-major to ``[n, 625]`` float32 in [0, 1].

Generating the 25,000 images takes about 1.5 s on one core (measured: 1.4 s). ``load_faces``
caches them as ``<data_dir>/faces/faces_seed{seed}.npz`` (arrays ``train``, ``test``).
scikit-image is needed only to generate (the ``faces`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from twolevel_kfac.experiments.data.cache import cache_dirs, read_npz_cache, write_npz_cache

__all__ = [
    "N_TEST",
    "N_TRAIN",
    "faces_cache_key",
    "faces_cache_path",
    "generate_faces",
    "inverse_maps",
    "load_faces",
    "source_faces",
    "warp_bilinear",
]

N_TRAIN = 20_000
N_TEST = 5_000
SIDE = 25
N_FACES = 100  # lfw_subset()[:100] are faces
TRAIN_FACES = 80  # faces 0–79 → train, 80–99 → test
MAX_ROTATION_DEG = 30.0
SCALE_RANGE = (0.8, 1.2)
MAX_SHIFT = 2.0  # pixels, per axis
CACHE_VERSION = 1  # bump when the procedure changes: old caches are regenerated
_CHUNK = 4096


def source_faces() -> np.ndarray:
    """The 100 face images of ``skimage.data.lfw_subset()``.

    Returns:
        float32 ``[100, 25, 25]`` in [0, 1].

    Raises:
        ImportError: scikit-image is not installed.
        ValueError: The bundled subset does not have the expected shape.
    """
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(
            "generating FACES needs scikit-image: pip install 'twolevel-kfac[faces]'"
        ) from exc
    images = np.asarray(data.lfw_subset())
    if images.shape != (200, SIDE, SIDE):
        raise ValueError(f"skimage lfw_subset has shape {images.shape}, expected (200, 25, 25)")
    return np.clip(images[:N_FACES], 0.0, 1.0).astype(np.float32)


def inverse_maps(u: np.ndarray) -> np.ndarray:
    """Affine maps output → source coordinates from the uniform draws (u₁ … u₄).

    Args:
        u: Draws ``[n, 5]`` in [0, 1) (column 0, the face index, is not used here).

    Returns:
        float64 ``[n, 2, 3]``: q = M[:, :2] p + M[:, 2] in (x, y) pixel coordinates.
    """
    theta = np.deg2rad((2.0 * u[:, 1] - 1.0) * MAX_ROTATION_DEG)
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * u[:, 2]
    shift = (2.0 * u[:, 3:5] - 1.0) * MAX_SHIFT  # [n, 2]
    cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
    lin = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)  # s⁻¹R(−θ)
    centre = np.full(2, (SIDE - 1) / 2.0)
    offset = centre - np.einsum("nij,nj->ni", lin, centre + shift)
    return np.concatenate([lin, offset[:, :, None]], axis=2)


def warp_bilinear(faces: np.ndarray, src: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Sample ``faces[src[k]]`` at ``maps[k]``·p for every output pixel p (edge clamping).

    Args:
        faces: Source images ``[F, 25, 25]``.
        src: Source index per output image ``[n]``.
        maps: Output → source affine maps ``[n, 2, 3]`` (see ``inverse_maps``).

    Returns:
        float32 ``[n, 625]``.
    """
    ys, xs = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(SIDE * SIDE)])  # [3, 625]
    q = np.einsum("nij,jp->nip", maps, pts)  # [n, 2, 625] source (x, y)
    qx = np.clip(q[:, 0], 0.0, SIDE - 1.0)
    qy = np.clip(q[:, 1], 0.0, SIDE - 1.0)
    x0 = np.minimum(np.floor(qx), SIDE - 2).astype(np.int64)
    y0 = np.minimum(np.floor(qy), SIDE - 2).astype(np.int64)
    fx, fy = (qx - x0).astype(np.float32), (qy - y0).astype(np.float32)
    flat = faces.reshape(len(faces), -1)
    base = src[:, None] * (SIDE * SIDE) + y0 * SIDE + x0  # [n, 625]
    v = flat.ravel()
    top = v[base] * (1 - fx) + v[base + 1] * fx
    bottom = v[base + SIDE] * (1 - fx) + v[base + SIDE + 1] * fx
    return np.clip(top * (1 - fy) + bottom * fy, 0.0, 1.0).astype(np.float32)


def _split(faces: np.ndarray, n: int, seed: int, split: int) -> np.ndarray:
    """``n`` images of one split (0: train, faces 0–79; 1: test, faces 80–99)."""
    first, count = (0, TRAIN_FACES) if split == 0 else (TRAIN_FACES, N_FACES - TRAIN_FACES)
    u = np.random.default_rng([seed, split]).random((n, 5))
    src = first + np.minimum((u[:, 0] * count).astype(np.int64), count - 1)
    out = np.empty((n, SIDE * SIDE), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        out[part] = warp_bilinear(faces, src[part], inverse_maps(u[part]))
    return out


def generate_faces(
    n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate the FACES-like set by the procedure of the module docstring.

    Args:
        n_train: Training images (from faces 0–79).
        n_test: Test images (from faces 80–99).
        seed: Seed of the two generators (``[seed, 0]`` and ``[seed, 1]``).

    Returns:
        ``(train [n_train, 625], test [n_test, 625])``, float32 in [0, 1].
    """
    faces = source_faces()
    return _split(faces, n_train, seed, 0), _split(faces, n_test, seed, 1)


def faces_cache_key() -> str:
    """Identifies the procedure and its constants; a cache with another key is stale.

    Returns:
        The key string.
    """
    return (
        f"v{CACHE_VERSION}-rot{MAX_ROTATION_DEG}-scale{SCALE_RANGE}-shift{MAX_SHIFT}"
        f"-split{TRAIN_FACES}/{N_FACES}-{SIDE}px"
    )


def faces_cache_path(data_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Path of the cache file ``<data_dir>/faces/faces_seed{seed}.npz``.

    Args:
        data_dir: Base data directory; ``None`` means ``TLKFAC_DATA``, else ``<repo>/data``.
        seed: Generator seed.

    Returns:
        The cache path in the first candidate directory.
    """
    return cache_dirs(data_dir)[0] / "faces" / f"faces_seed{seed}.npz"


def load_faces(
    data_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """FACES-like train/test images, generated once and cached.

    The cache is looked up in (and written to the first writable of) the explicit
    ``data_dir``, else ``$TLKFAC_DATA`` and ``<repo>/data``.

    Args:
        data_dir: Base data directory (the cache lives in its ``faces/`` subfolder).
        seed: Generator seed.

    Returns:
        ``(train_x [20000, 625], test_x [5000, 625])``, float32 in [0, 1].
    """
    dirs = cache_dirs(data_dir)
    relative = f"faces/faces_seed{seed}.npz"
    shapes = {"train": (N_TRAIN, SIDE * SIDE), "test": (N_TEST, SIDE * SIDE)}
    arrays = None
    for base in dirs:
        arrays = read_npz_cache(base / relative, faces_cache_key(), shapes)
        if arrays is not None:
            break
    if arrays is None:
        train, test = generate_faces(N_TRAIN, N_TEST, seed)
        arrays = {"train": train, "test": test}
        write_npz_cache(dirs, relative, faces_cache_key(), arrays)
    return torch.from_numpy(arrays["train"]), torch.from_numpy(arrays["test"])
