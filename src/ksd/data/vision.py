"""Image classification sets of ``torchvision.datasets`` (``dataset=torchvision dataset.name=FashionMNIST``).

``dataset.name`` is the class in ``torchvision.datasets`` (FashionMNIST, KMNIST, QMNIST, CIFAR100, SVHN,
USPS, STL10, ...): any set whose constructor takes ``(root, train=bool)`` or ``(root, split="train"|"test")``
and whose images all have one size. Its files are looked for under ``dataset.root`` in torchvision's own
layout and, with ``dataset.download=true``, downloaded there when missing (torchvision checks them).

torchvision is imported here only, when such a data set is read, so the package never needs it;
without it the reader says in one line how to install it. The images are read as torchvision returns
them (PIL images: uint8 H×W or H×W×C), laid out as (N, C, H, W) uint8, which ``load_dataset`` divides by
255; the labels are the class indices, and the classes are the largest label + 1.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ksd.errors import one_line

from .splits import DataError, RawData

INSTALL = "pip install torchvision (or pip install -e '.[vision]' in this checkout)."


def read_torchvision(name: str, root: Path, *, download: bool) -> RawData:
    """The train and test splits of ``torchvision.datasets.<name>`` under ``root``."""
    try:
        from torchvision import datasets
    except ImportError:
        raise DataError(f"dataset=torchvision needs torchvision, which is not installed: {INSTALL}") from None
    except Exception as err:  # installed but built for another torch: its compiled operators fail to register
        raise DataError(
            f"dataset=torchvision: torchvision is installed but cannot be imported ({one_line(err)}); "
            f"install the torchvision release built for this torch ({torch.__version__})."
        ) from None
    cls = getattr(datasets, name, None)
    if not isinstance(cls, type):
        raise DataError(
            f"torchvision.datasets has no data set {name!r}: set dataset.name to one of its classes, "
            "e.g. FashionMNIST, KMNIST, CIFAR100 or SVHN."
        )
    train_x, train_y = _arrays(_open(cls, name, root, download, "train"), name, "train")
    test_x, test_y = _arrays(_open(cls, name, root, download, "test"), name, "test")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise DataError(
            f"torchvision {name}: test images have shape {test_x.shape[1:]}, "
            f"training images {train_x.shape[1:]}."
        )
    return RawData(train_x, train_y, test_x, test_y, source=f"torchvision.datasets.{name} in {root}")


def _open(cls: type, name: str, root: Path, download: bool, part: str) -> Any:
    """One split of the data set: ``train=`` or ``split=``, whichever its constructor takes."""
    parameters = inspect.signature(cls).parameters
    if "train" in parameters:
        options: dict[str, Any] = {"train": part == "train"}
    elif "split" in parameters:
        options = {"split": part}
    else:
        raise DataError(
            f"torchvision.datasets.{name} has no train/test choice (train= or split=); "
            "export it to a .npz file and use dataset=tensors."
        )
    if "download" in parameters:
        options["download"] = download
    try:
        return cls(str(root), **options)
    except Exception as err:  # files missing or damaged, a failed download, an unknown split ...
        hint = "" if download else "; set dataset.download=true to download it, or point dataset.root at it"
        raise DataError(
            f"torchvision {name} ({part} split) could not be read under {root}: {one_line(err)}{hint}."
        ) from None


def _arrays(data: Any, name: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, C, H, W) (uint8, or float32 for other pixel types) and int64 labels from one split."""
    images, labels = [], []
    for index in range(len(data)):
        image, label = data[index]
        array = np.asarray(image)
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        labels.append(label)
    if not images:
        raise DataError(f"torchvision {name} has no {part} examples.")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(
            f"torchvision {name} ({part} split) has images of {len(shapes)} different sizes; "
            "resize them to one size, save them to a .npz file and use dataset=tensors."
        )
    try:
        targets = np.asarray(labels, dtype=np.int64)
        valid = targets.ndim == 1 and targets.min() >= 0
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DataError(f"torchvision {name} ({part} split) has labels that are not class indices.")
    stacked = np.stack(images)
    return (stacked if stacked.dtype == np.uint8 else stacked.astype(np.float32)), targets
