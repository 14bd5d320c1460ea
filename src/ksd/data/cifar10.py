"""CIFAR-10 reader (two on-disk forms), per-channel normalisation and batched augmentation.

Accepted layouts, tried in this order:

1. ``<root>/cifar-10-batches-py/`` -- the official "python version": pickles ``data_batch_1`` ..
   ``data_batch_5`` and ``test_batch``, each a dict with ``b"data"`` (uint8 (10000, 3072)) and
   ``b"labels"`` (list of 10000 ints). This is what ``torchvision.datasets.CIFAR10(download=True)`` writes.
2. ``<root>/cifar10/`` -- the project's shared folder: ``cifar10_data_batch_{1..5}.npz`` and
   ``cifar10_test_batch_first1000.npz`` with keys ``data`` (uint8 (N, 3072)) and ``labels`` (int64 (N,)).
   The test file holds only official test images 0-999, which the returned notes say. These archives are
   LZMA-compressed (about 7 s to decode), so the decoded arrays are cached as one uncompressed ``.npz`` in
   the cache directory (``$KSD_CACHE`` or ``~/.cache/ksd``), keyed by the source files' sizes and mtimes.

A row of ``data`` is 1024 red, 1024 green, 1024 blue values, each a 32x32 row-major channel, so
``reshape(-1, 3, 32, 32)`` gives NCHW. The reader returns uint8; ``load_dataset`` scales to [0, 1] and then
normalises every split with the per-channel mean/std of the training images it keeps (after the
validation carve and ``train_size``), see :func:`channel_stats`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import _cache
from .splits import DataError, RawData

PICKLE_DIR = "cifar-10-batches-py"
PICKLE_TRAIN = [f"data_batch_{k}" for k in range(1, 6)]
PICKLE_TEST = "test_batch"
NPZ_DIR = "cifar10"
NPZ_TRAIN = [f"cifar10_data_batch_{k}.npz" for k in range(1, 6)]
NPZ_TEST = "cifar10_test_batch_first1000.npz"
NPZ_TEST_NOTE = "CIFAR-10 test set = official test images 0-999 only (the shared .npz subset)"
_HOW_TO_GET = (
    "Point dataset.root or KSD_DATA at a folder with that layout, or run "
    "`python scripts/fetch_data.py cifar10` (needs torchvision and internet)."
)


def _check_batch(path: Path, data: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate one batch and return uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"CIFAR-10 file {path} holds data of dtype {data.dtype} and shape {data.shape}, "
            f"expected uint8 (N, 3072)."
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"CIFAR-10 file {path} holds labels of dtype {labels.dtype} and shape {labels.shape}, "
            f"expected {data.shape[0]} integer labels."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 file {path} has labels outside 0-9.")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        return _check_batch(path, batch[b"data"], batch[b"labels"])
    except DataError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(
            f"Could not read CIFAR-10 batch {path} ({type(exc).__name__}: {exc}); expected an official "
            f"python-version pickle with b'data' and b'labels'."
        ) from exc


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _check_batch(path, archive["data"], archive["labels"])
    except DataError:
        raise
    except NotImplementedError as exc:  # zipfile without the lzma module
        raise DataError(
            f"Could not decompress {path} ({exc}): these archives are LZMA-compressed and this Python "
            f"lacks the standard-library lzma module."
        ) from exc
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"Could not read CIFAR-10 archive {path} ({type(exc).__name__}: {exc}); expected an .npz "
            f"with uint8 'data' (N, 3072) and 'labels' (N,), as in shared/data/cifar10."
        ) from exc


def _stack(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_pickles(directory: Path) -> RawData:
    train_x, train_y = _stack([_read_pickle(directory / name) for name in PICKLE_TRAIN])
    test_x, test_y = _read_pickle(directory / PICKLE_TEST)
    return RawData(train_x, train_y, test_x, test_y, source=f"CIFAR-10 python pickles in {directory}")


def _read_npzs(directory: Path) -> RawData:
    paths = [directory / name for name in [*NPZ_TRAIN, NPZ_TEST]]
    cache_file = _cache.cache_dir() / f"cifar10-npz-{_cache.files_key(paths)}.npz"
    keys = ("train_x", "train_y", "test_x", "test_y")
    cached = _cache.load_arrays(cache_file, keys)
    if cached is not None:
        try:
            train_x, train_y = _check_batch(
                cache_file, cached["train_x"].reshape(-1, 3072), cached["train_y"]
            )
            test_x, test_y = _check_batch(cache_file, cached["test_x"].reshape(-1, 3072), cached["test_y"])
            source = f"CIFAR-10 .npz files in {directory} (decoded copy cached at {cache_file})"
            return RawData(train_x, train_y, test_x, test_y, source=source, notes=[NPZ_TEST_NOTE])
        except (DataError, ValueError):
            pass  # a stale or damaged cache file: decode again and overwrite it
    train_x, train_y = _stack([_read_npz(path) for path in paths[:-1]])
    test_x, test_y = _read_npz(paths[-1])
    saved = _cache.save_arrays(cache_file, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    where = f"decoded copy cached at {cache_file}" if saved else "not cached: cache folder not writable"
    source = f"CIFAR-10 .npz files in {directory} ({where})"
    return RawData(train_x, train_y, test_x, test_y, source=source, notes=[NPZ_TEST_NOTE])


def read_cifar10(root: Path) -> RawData:
    """Read CIFAR-10 from ``root`` in either layout (see the module docstring); images are uint8 NCHW."""
    pickle_dir, npz_dir = root / PICKLE_DIR, root / NPZ_DIR
    pickle_missing = [name for name in [*PICKLE_TRAIN, PICKLE_TEST] if not (pickle_dir / name).is_file()]
    if not pickle_missing:
        return _read_pickles(pickle_dir)
    npz_missing = [name for name in [*NPZ_TRAIN, NPZ_TEST] if not (npz_dir / name).is_file()]
    if not npz_missing:
        return _read_npzs(npz_dir)
    if not root.is_dir():
        why = f" (the data root {root} does not exist)"
    elif pickle_dir.is_dir():
        why = f" (missing in {pickle_dir}: {', '.join(pickle_missing)})"
    elif npz_dir.is_dir():
        why = f" (missing in {npz_dir}: {', '.join(npz_missing)})"
    else:
        why = " (neither folder exists)"
    raise DataError(
        f"CIFAR-10 not found: expected data_batch_1..5 and test_batch in {pickle_dir} (official python "
        f"version) or cifar10_data_batch_1..5.npz and {NPZ_TEST} in {npz_dir}{why}. {_HOW_TO_GET}"
    )


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of float images (N, C, H, W); both shaped (1, C, 1, 1)."""
    if images.shape[0] == 0:
        raise DataError("CIFAR-10 normalisation needs at least one training image.")
    var, mean = torch.var_mean(images, dim=(0, 2, 3), correction=0, keepdim=True)
    return mean, var.sqrt().clamp_min(1e-6)


def augment_cifar(
    x: torch.Tensor, generator: torch.Generator | None = None, *, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Random crop with ``pad``-pixel zero padding plus random horizontal flip, for a batch (N, C, H, W).

    Each image gets its own offsets (uniform in 0..2*pad per axis) and a fair coin for the flip; all draws
    come from ``generator`` (on its own device) in the order row offsets, column offsets, flips. The work is
    one gather on ``x``'s device, no loop over images. On normalised inputs zero padding means the training
    mean colour. ``pad=0`` disables the crop, ``flip=False`` the flip.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_cifar expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, height, width = x.shape
    draw_device = generator.device if generator is not None else torch.device("cpu")
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=draw_device).to(x.device)
        x = F.pad(x, (pad, pad, pad, pad))
    else:
        offsets = torch.zeros(2, n, dtype=torch.long, device=x.device)
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(width, device=x.device)  # (N, W)
    if flip:
        flipped = torch.rand(n, generator=generator, device=draw_device).lt(0.5).to(x.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
