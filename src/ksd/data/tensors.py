"""Your own data as arrays in one file (``dataset=tensors dataset.path=FILE``).

FILE is a NumPy archive (``.npz``, written by ``np.savez``) or a ``torch.save`` file (``.pt``/``.pth``) of a
dict of tensors, with the keys

- ``inputs``: the training inputs, shape (N, ...): feature vectors (N, D), images (N, C, H, W) or any
  other shape the model takes; floating point (used as they are) or uint8 (divided by 255, as the
  built-in image readers do);
- ``targets`` (optional): integer class labels 0 … K−1, shape (N,): a classification data set with K =
  the largest label + 1 classes. Without them the data set is unlabelled and the models reconstruct their
  inputs (autoencoders, or ``model=custom`` with a reconstruction loss);
- ``test_inputs`` and ``test_targets`` (optional; targets exactly when the training set has them): a test
  split of the same kind. Without one, runs report no test metrics.

Relative paths are taken under ``dataset.root``, as for ``dataset=text``. The validation set is carved
from the training set by ``dataset.val_size`` as for every data set. Anything else — a missing file, another
format, a missing or unknown key, shapes or types that do not fit, non-finite inputs, negative labels — is
a :class:`DataError` naming the file and what is wrong. ``.pt`` files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never code (NumPy arrays: ``.npz``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ksd.errors import one_line

from .splits import DataError, RawData

KEYS = ("inputs", "targets", "test_inputs", "test_targets")
NEEDS_PATH = "dataset=tensors needs dataset.path: a .npz or .pt file of inputs (and targets)."
_EXPECTED = "inputs, and optionally targets, test_inputs, test_targets"


def read_tensors(root: Path, path: str | None) -> RawData:
    """The training and test arrays of the file ``path`` (relative: under ``root``), checked."""
    if path is None:
        raise DataError(NEEDS_PATH)
    file = Path(path).expanduser()
    file = file if file.is_absolute() else root / file
    arrays = _load(file)
    unknown = sorted(set(arrays) - set(KEYS))
    if unknown or "inputs" not in arrays:
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else "no key 'inputs'"
        raise DataError(f"{file} has {what}; expected the keys {_EXPECTED}.")
    train_x = _inputs(arrays["inputs"], "inputs", file)
    train_y = _labels(arrays.get("targets"), "targets", len(train_x), file)
    if "test_inputs" not in arrays:
        if "test_targets" in arrays:
            raise DataError(f"{file} has test_targets but no test_inputs.")
        test_x, test_y = train_x[:0], None if train_y is None else train_y[:0]
    else:
        test_x = _inputs(arrays["test_inputs"], "test_inputs", file)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise DataError(
                f"{file}: test_inputs have shape {test_x.shape[1:]} per example, inputs {train_x.shape[1:]}."
            )
        test_y = _labels(arrays.get("test_targets"), "test_targets", len(test_x), file)
        if (train_y is None) != (test_y is None):
            raise DataError(f"{file}: give targets and test_targets together, or neither (unlabelled data).")
    raw = RawData(train_x, train_y, test_x, test_y, source=f"tensors file {file}")
    classes = label_classes(raw)
    raw.notes.append(
        f"tensors file {file}: {len(train_x)} training and {len(test_x)} test examples of shape "
        f"{tuple(train_x.shape[1:])}, {'unlabelled' if classes is None else f'{classes} classes'}"
    )
    return raw


def label_classes(raw: RawData) -> int | None:
    """Classes of labelled data read from a file: the largest label of both splits + 1 (None: unlabelled)."""
    if raw.train_y is None:
        return None
    return int(max(raw.train_y.max(), raw.test_y.max(initial=0) if raw.test_y is not None else 0)) + 1


def _load(file: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` archive or of a ``torch.save`` dict, by key."""
    if not file.is_file():
        raise DataError(
            f"dataset.path {file} is not a file: point it at a .npz or .pt file "
            "(relative paths are under dataset.root)."
        )
    suffix = file.suffix.lower()
    if suffix not in (".npz", ".pt", ".pth"):
        raise DataError(f"dataset.path must be a .npz or .pt file, got {file}.")
    try:
        if suffix == ".npz":
            with np.load(file, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated archives, pickled objects, files of another format ...
        kind = "a NumPy .npz archive" if suffix == ".npz" else "a torch.save file of tensors"
        raise DataError(f"Could not read {file} as {kind}: {one_line(err)}") from None
    if not isinstance(content, dict):
        kind = type(content).__name__
        raise DataError(f"{file} holds a {kind}; expected a dict with the keys {_EXPECTED}.")
    return {str(key): _array(value, str(key), file) for key, value in content.items()}


def _array(value: Any, key: str, file: Path) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    raise DataError(f"{file}: {key} is a {type(value).__name__}, not a tensor.")


def _inputs(array: np.ndarray, key: str, file: Path) -> np.ndarray:
    """uint8 kept (the loader divides by 255), other real numbers as float32; at least one example."""
    if array.ndim < 2 or len(array) == 0:
        raise DataError(f"{file}: {key} must have shape (N, ...) with N >= 1 examples, got {array.shape}.")
    if array.dtype == np.uint8:
        return array
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"{file}: {key} must hold real numbers, got dtype {array.dtype}.")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{file}: {key} contain NaN or infinite values.")
    return array


def _labels(array: np.ndarray | None, key: str, count: int, file: Path) -> np.ndarray | None:
    """Integer class labels >= 0, one per example, as int64 (None when the file has none)."""
    if array is None:
        return None
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{file}: {key} must be integer class labels, got dtype {array.dtype} "
            "(leave targets out for reconstruction: the inputs are then the targets)."
        )
    if array.shape != (count,):
        raise DataError(
            f"{file}: {key} must have shape ({count},), one label per example, got {array.shape}."
        )
    if array.min() < 0:
        raise DataError(f"{file}: {key} must be class indices >= 0, got {array.min()}.")
    return array.astype(np.int64)
