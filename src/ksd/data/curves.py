"""CURVES: Hinton & Salakhutdinov's (2006) 28x28 curve images, read from a .mat file or generated.

Real data
    If one of ``<root>/curves/digs3pts_1.mat``, ``<root>/curves/curves.mat`` or ``<root>/digs3pts_1.mat``
    exists (first match wins), it is read with ``scipy.io.loadmat``: ``bdata`` (20000 x 784, training) and
    ``bdatatest`` (10000 x 784, test), values in [0, 1] (uint8 0..255 is also accepted and scaled). Rows
    are reshaped row-major to (1, 28, 28), i.e. as stored; MATLAB's column-major view is the transpose,
    which does not matter for the fully connected autoencoder. MATLAB v7.3 (HDF5) files would need h5py,
    which the project does not use: re-save with ``save -v7`` or convert to v7.
    A broken file is an error, never a silent switch to the synthetic set.

Synthetic stand-in (used when no .mat file exists; the README of shared/data explains that no copy of the
original could be found)
    A procedural re-creation of the published recipe "each image is a curve through three random 2-D
    points" (6 degrees of freedom). Recipe, version ``RECIPE_VERSION``:

    1. ``rng = numpy.random.default_rng(0)`` (seed fixed at ``GENERATOR_SEED`` = 0, independent of the
       run seed). Candidate triples of points are drawn in blocks of ``_BLOCK`` triples with
       ``rng.uniform(2, 25, (_BLOCK, 3, 2))`` in pixel coordinates (pixel (row r, col c) has its centre at
       x = c, y = r, so 0..27 spans the frame). A triple is kept if its path length
       ``|P1 - P0| + |P2 - P1|`` is at least ``MIN_PATH`` = 12 px (drops the rare near-dot images); kept
       triples are used in draw order, so the first k images never depend on how many are generated.
    2. The curve is the parabola through P0, P1, P2: the quadratic Lagrange interpolant with P0 at t = 0,
       P2 at t = 1 and P1 at the chord-length parameter s = |P1-P0| / (|P1-P0| + |P2-P1|) clamped to
       [0.1, 0.9]; it is evaluated (NumPy float64) at the ``SEGMENTS`` + 1 = 65 parameters t = i / 64,
       giving a 64-segment polyline. Parts that leave the frame are simply clipped by it.
    3. Each pixel's intensity is ``clip(w / 2 + 0.5 - d, 0, 1)`` with stroke width ``w`` = 1.5 px and
       ``d`` the distance (NumPy float64) from the pixel centre to the polyline: an anti-aliased 1.5 px
       stroke (solid within 0.25 px of the curve, fading linearly to 0 at 1.25 px).
    4. Intensities are quantised to uint8 as ``round(255 * I)`` (like 8-bit images); values returned are
       those uint8 / 255, whether freshly generated or read from the cache.
    5. Images 0..19999 are the training set, 20000..29999 the test set.

    Everything is NumPy float64 with elementwise operations only (no library reductions, linspace or
    norm), so the images are the same on every machine: a last-bit difference between builds (seen with
    torch float32 kernels, 2.11 vs 2.13, which flipped some uint8 values) reaches the uint8 rounding in
    float64 only in astronomically rare cases. The distance computation is vectorised over chunks of
    ``_CHUNK`` images (a Python loop over the 64 segments only) and the chunks run in a thread pool, one
    thread per core (NumPy releases the GIL; no torch thread settings are touched): roughly 5-10 s for
    all 30000 images on 2 CPU cores, once. The uint8 result (30000, 28, 28) is cached as
    ``curves-synthetic-v{RECIPE_VERSION}-seed0-20000+10000.npz`` in the cache folder (``$KSD_CACHE`` or
    ``~/.cache/ksd``). About 5 % of the pixels are above 0.5 on average. The data set has no labels.
    Numbers obtained on it are not comparable with published CURVES results.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import _cache
from .splits import DataError, RawData

N_TRAIN, N_TEST = 20000, 10000
SIZE = 28
GENERATOR_SEED = 0
RECIPE_VERSION = 2  # 1: float32 torch distances (machine-dependent rounding), superseded
STROKE_WIDTH = 1.5
SEGMENTS = 64
MIN_PATH = 12.0
_LOW, _HIGH = 2.0, SIZE - 3.0
_BLOCK = 4096
_CHUNK = 128  # images per work item of the distance computation
MAT_CANDIDATES = ("curves/digs3pts_1.mat", "curves/curves.mat", "digs3pts_1.mat")


def _length(v: np.ndarray) -> np.ndarray:
    """Euclidean length over the last axis (size 2), written out so every platform rounds alike."""
    return np.sqrt(v[..., 0] * v[..., 0] + v[..., 1] * v[..., 1])


def _draw_points(n: int, seed: int) -> np.ndarray:
    """``n`` accepted triples of 2-D points, float64 (n, 3, 2), drawn block-wise (see step 1)."""
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    count = 0
    while count < n:
        cand = rng.uniform(_LOW, _HIGH, size=(_BLOCK, 3, 2))
        path = _length(cand[:, 1] - cand[:, 0]) + _length(cand[:, 2] - cand[:, 1])
        good = cand[path >= MIN_PATH]
        kept.append(good)
        count += len(good)
    return np.concatenate(kept)[:n] if kept else np.zeros((0, 3, 2))


def _polylines(points: np.ndarray, segments: int) -> np.ndarray:
    """Sample the parabola through each triple (float64 (n, 3, 2)) at ``segments + 1`` points: (n, K, 2).

    Only elementwise IEEE operations in NumPy float64 (no library reductions), so the result is
    bit-identical on every machine.
    """
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    d01 = _length(p1 - p0)
    d12 = _length(p2 - p1)
    s = np.clip(d01 / np.maximum(d01 + d12, 1e-9), 0.1, 0.9)[:, None]
    t = (np.arange(segments + 1, dtype=np.float64) / segments)[None, :]
    basis0 = (t - s) * (t - 1.0) / s
    basis1 = t * (t - 1.0) / (s * (s - 1.0))
    basis2 = t * (t - s) / (1.0 - s)
    return basis0[..., None] * p0[:, None] + basis1[..., None] * p1[:, None] + basis2[..., None] * p2[:, None]


def _distance_chunk(lines: np.ndarray, size: int) -> np.ndarray:
    """Distance (float64 (n, size*size)) from every pixel centre to each image's polyline (n, K, 2)."""
    coords = np.arange(size, dtype=np.float64)
    px = np.tile(coords, size)[None, :]  # x = column
    py = np.repeat(coords, size)[None, :]  # y = row
    n = lines.shape[0]
    start, vec = lines[:, :-1], lines[:, 1:] - lines[:, :-1]
    inv_len2 = 1.0 / np.maximum(vec[..., 0] * vec[..., 0] + vec[..., 1] * vec[..., 1], 1e-12)
    best = np.full((n, size * size), np.inf)
    dx, dy, t, tmp = (np.empty((n, size * size)) for _ in range(4))
    for k in range(start.shape[1]):  # distance to segment k, in place: projection clamped to the segment
        ux, uy = vec[:, k, 0:1], vec[:, k, 1:2]
        np.subtract(px, start[:, k, 0:1], out=dx)
        np.subtract(py, start[:, k, 1:2], out=dy)
        np.multiply(dx, ux, out=t)
        np.multiply(dy, uy, out=tmp)
        t += tmp
        t *= inv_len2[:, k : k + 1]
        np.maximum(t, 0.0, out=t)
        np.minimum(t, 1.0, out=t)
        np.multiply(t, ux, out=tmp)
        dx -= tmp
        np.multiply(t, uy, out=tmp)
        dy -= tmp
        np.multiply(dx, dx, out=dx)
        np.multiply(dy, dy, out=dy)
        dx += dy
        np.minimum(best, dx, out=best)
    return np.sqrt(best, out=best)


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def generate_curves(n: int, seed: int = GENERATOR_SEED) -> np.ndarray:
    """The first ``n`` synthetic CURVES images (recipe in the module docstring) as uint8 (n, 28, 28)."""
    lines = _polylines(_draw_points(n, seed), SEGMENTS)
    chunks = [lines[i : i + _CHUNK] for i in range(0, n, _CHUNK)]
    with ThreadPoolExecutor(max_workers=_workers()) as pool:  # NumPy releases the GIL in its loops
        dist = list(pool.map(lambda part: _distance_chunk(part, SIZE), chunks))
    if not dist:
        return np.zeros((0, SIZE, SIZE), dtype=np.uint8)
    intensity = np.clip(STROKE_WIDTH / 2 + 0.5 - np.concatenate(dist), 0.0, 1.0)
    return np.rint(intensity * 255.0).astype(np.uint8).reshape(n, SIZE, SIZE)


def find_mat(root: Path) -> Path | None:
    """The first existing CURVES .mat file under ``root``, or None."""
    for name in MAT_CANDIDATES:
        if (root / name).is_file():
            return root / name
    return None


def _mat_images(path: Path, mat: dict, key: str) -> np.ndarray:
    if key not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"CURVES file {path} has no variable '{key}' (found: {', '.join(found) or 'none'}).")
    array = np.asarray(mat[key])
    if array.ndim == 2 and array.shape[1] != SIZE * SIZE and array.shape[0] == SIZE * SIZE:
        array = array.T
    if array.ndim != 2 or array.shape[1] != SIZE * SIZE:
        raise DataError(f"CURVES file {path}: '{key}' has shape {array.shape}, expected (N, 784).")
    if array.dtype == np.uint8:
        return array.reshape(-1, 1, SIZE, SIZE)
    array = array.astype(np.float32)
    if array.size and (not np.isfinite(array).all() or array.min() < -1e-6 or array.max() > 1 + 1e-6):
        raise DataError(f"CURVES file {path}: '{key}' has values outside [0, 1].")
    return np.clip(array, 0.0, 1.0).reshape(-1, 1, SIZE, SIZE)


def read_mat(path: Path) -> RawData:
    """Read ``bdata``/``bdatatest`` from a MATLAB (v4-v7) file."""
    import scipy.io  # lazy: only needed for the real file

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["bdata", "bdatatest"])
    except NotImplementedError as exc:
        raise DataError(
            f"CURVES file {path} is a MATLAB v7.3 (HDF5) file, which needs h5py (not installed here); "
            f"re-save it in MATLAB/Octave with `save -v7` ({exc})."
        ) from exc
    except Exception as exc:  # scipy raises a variety of errors for bad files
        raise DataError(
            f"Could not read CURVES file {path} as a MATLAB file ({type(exc).__name__}: {exc})."
        ) from exc
    return RawData(
        train_x=_mat_images(path, mat, "bdata"),
        train_y=None,
        test_x=_mat_images(path, mat, "bdatatest"),
        test_y=None,
        source=f"CURVES from {path}",
    )


def _cache_file() -> Path:
    return (
        _cache.cache_dir() / f"curves-synthetic-v{RECIPE_VERSION}-seed{GENERATOR_SEED}-{N_TRAIN}+{N_TEST}.npz"
    )


def read_generated() -> RawData:
    """The synthetic stand-in: from the cache if present, else generated (and cached)."""
    path = _cache_file()
    cached = _cache.load_arrays(path, ["images"])
    images = cached["images"] if cached is not None else None
    if images is None or images.shape != (N_TRAIN + N_TEST, SIZE, SIZE) or images.dtype != np.uint8:
        images = generate_curves(N_TRAIN + N_TEST, GENERATOR_SEED)
        where = f"cached at {path}" if _cache.save_arrays(path, images=images) else "not cached"
    else:
        where = f"cached at {path}"
    images = images[:, None]
    note = (
        "CURVES is a synthetic stand-in generated by ksd.data.curves (curves through 3 random points, "
        "seed 0), not the original digs3pts_1.mat: results are not comparable with published CURVES numbers"
    )
    return RawData(
        train_x=images[:N_TRAIN],
        train_y=None,
        test_x=images[N_TRAIN:],
        test_y=None,
        source=f"CURVES generated (synthetic stand-in, seed {GENERATOR_SEED}) {where}",
        notes=[note],
    )


def read_curves(root: Path) -> RawData:
    """CURVES from a .mat file under ``root`` if there is one, else the cached/generated synthetic set."""
    path = find_mat(root)
    return read_mat(path) if path is not None else read_generated()
