"""Data sets for the experiments: MNIST, CURVES and CIFAR-10 as float32/int64 torch tensors.

``load_dataset(name, root, val_size=...)`` reads the files under ``root`` (default: ``$KSD_DATA`` or
``./data``), carves a validation set from the training set, and returns :class:`Splits`. One module per
data set documents its on-disk format: :mod:`ksd.data.mnist`, :mod:`ksd.data.cifar10` (also
``augment_cifar``), :mod:`ksd.data.curves` (reads ``digs3pts_1.mat`` or generates a synthetic stand-in),
:mod:`ksd.data.text` (character windows of a text file or of the built-in corpus, int64 inputs); your own
data: :mod:`ksd.data.tensors` (arrays in a ``.npz`` or ``.pt`` file) and :mod:`ksd.data.vision` (any image
set of ``torchvision.datasets``, read with ``torchvision=True``).
Decoded CIFAR-10 ``.npz`` data and generated CURVES are cached in ``$KSD_CACHE`` (default
``~/.cache/ksd``); nothing is ever written into the data root. Nothing here needs torchvision or PIL, but
:mod:`ksd.data.vision`, which imports torchvision when it reads a data set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ksd.errors import require

from . import cifar10, curves, mnist, tensors, text, vision
from .splits import DataError, DataSpec, RawData, Split, Splits, carve_indices, check_size

__all__ = [
    "DATASETS",
    "DataError",
    "DataSpec",
    "Split",
    "Splits",
    "check_node",
    "default_root",
    "load_dataset",
]

DATASETS = ("mnist", "curves", "cifar10", "text", "tensors")


def check_node(node: Any) -> None:
    """The ``dataset`` node names a data set of this registry (``config.validate`` calls it, from the
    runner)."""
    require(
        node.torchvision or node.name in DATASETS,
        f"dataset.name must be one of {', '.join(DATASETS)}, got {node.name!r}.",
    )
    require(node.name != "tensors" or node.path is not None, tensors.NEEDS_PATH)


_READERS: dict[str, Callable[[Path], RawData]] = {
    "mnist": mnist.read_mnist,
    "curves": curves.read_curves,
    "cifar10": cifar10.read_cifar10,
}
_SHAPES = {"mnist": (1, 28, 28), "curves": (1, 28, 28), "cifar10": (3, 32, 32)}
_CLASSES = {"mnist": 10, "curves": None, "cifar10": 10}


def default_root() -> Path:
    """$KSD_DATA if set, else ./data"""
    env = os.environ.get("KSD_DATA")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def _to_tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Copy a NumPy array to ``device``; uint8 images become float32 / 255."""
    tensor = torch.from_numpy(np.require(array, requirements=["C", "W"])).to(device)
    if tensor.dtype == torch.uint8 and dtype == torch.float32:
        return tensor.to(torch.float32).div_(255.0)
    return tensor.to(dtype)


def _split(x: np.ndarray, y: np.ndarray | None, device: torch.device) -> Split:
    labels = None if y is None else _to_tensor(y, device, torch.int64)
    dtype = torch.int64 if x.dtype == np.int64 else torch.float32  # character indices stay indices
    return Split(inputs=_to_tensor(x, device, dtype), labels=labels)


def load_dataset(
    name: str,
    root: str | Path | None,
    *,
    val_size: int,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    path: str | None = None,
    seq_len: int = 64,
    torchvision: bool = False,
    download: bool = False,
) -> Splits:
    """Read the files (or generate CURVES), carve `val_size` validation examples from the full training set
    with a permutation seeded by `seed` (torch.Generator), then keep the first `train_size` of the remaining
    training examples (None = all) and the first `test_size` test examples (None = all). Everything ends on
    `device` as float32/int64. `path` and `seq_len` are the text corpus and window length of ``text``, `path`
    also the file of ``tensors``. With `torchvision`, `name` is a class of ``torchvision.datasets``, read
    under `root` and downloaded there when missing if `download`.

    The remaining training examples and the validation examples both keep file order. CIFAR-10 inputs are
    normalised per channel with the mean/std of the kept training images (listed in ``notes``).
    Raises :class:`DataError` for missing/corrupt files and impossible sizes.
    """
    key = name if torchvision else str(name).strip().lower().replace("-", "")
    if not torchvision and key not in DATASETS:
        raise DataError(f"Unknown data set {name!r}: choose one of {', '.join(DATASETS)}.")
    val_n = check_size(val_size, "val_size")
    train_n = check_size(train_size, "train_size", minimum=1, allow_none=True)
    test_n = check_size(test_size, "test_size", allow_none=True)
    assert val_n is not None
    data_root = default_root() if root is None else Path(root).expanduser()
    device = torch.device(device)

    vocabulary: list[str] = []
    if torchvision:
        raw = vision.read_torchvision(name, data_root, download=download)
    elif key == "text":
        raw, vocabulary = text.read_text(data_root, path=path, seq_len=seq_len)
    elif key == "tensors":
        raw = tensors.read_tensors(data_root, path)
    else:
        raw = _READERS[key](data_root)
    n_full = raw.train_x.shape[0]
    train_idx, val_idx = carve_indices(n_full, val_size=val_n, train_size=train_n, seed=seed, dataset=key)
    n_test_full = raw.test_x.shape[0]
    if test_n is not None and test_n > n_test_full:
        raise DataError(
            f"test_size={test_n} is larger than the {n_test_full} {key} test examples available "
            f"({raw.source}); use test_size <= {n_test_full} or null for all."
        )
    test_stop = n_test_full if test_n is None else test_n

    def rows(y: np.ndarray | None, index: np.ndarray | slice) -> np.ndarray | None:
        return None if y is None else y[index]

    tr, va = train_idx.numpy(), val_idx.numpy()
    train = _split(raw.train_x[tr], rows(raw.train_y, tr), device)
    val = _split(raw.train_x[va], rows(raw.train_y, va), device)
    test = _split(raw.test_x[:test_stop], rows(raw.test_y, slice(0, test_stop)), device)

    notes = list(raw.notes)
    if key == "cifar10":
        mean, std = cifar10.channel_stats(train.inputs)
        for part in (train, val, test):
            part.inputs.sub_(mean).div_(std)
        fmt = ", ".join
        notes.append(
            f"CIFAR-10 normalised per channel with the {len(train)} kept training images: "
            f"mean ({fmt(f'{v:.4f}' for v in mean.flatten().tolist())}), "
            f"std ({fmt(f'{v:.4f}' for v in std.flatten().tolist())})"
        )
    notes.insert(
        0,
        f"{key} splits: validation = {len(val)} of the {n_full} training examples drawn with seed {seed}; "
        f"train = the first {len(train)} of the rest (file order); test = the first {len(test)} of "
        f"{n_test_full} test examples",
    )
    if key == "text":
        spec = DataSpec(name=key, input_shape=(seq_len,), num_classes=len(vocabulary), source=raw.source)
    elif key in _SHAPES:
        spec = DataSpec(name=key, input_shape=_SHAPES[key], num_classes=_CLASSES[key], source=raw.source)
    else:  # your own data: its arrays say what it is
        shape, classes = tuple(raw.train_x.shape[1:]), tensors.label_classes(raw)
        spec = DataSpec(name=key, input_shape=shape, num_classes=classes, source=raw.source)
    shape = tuple(train.inputs.shape[1:])
    if shape != spec.input_shape:
        raise DataError(
            f"{key} inputs have shape {shape} per example, expected {spec.input_shape} ({raw.source})."
        )
    return Splits(train=train, val=val, test=test, spec=spec, notes=notes)
