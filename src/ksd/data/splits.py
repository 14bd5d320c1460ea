"""Containers for loaded data sets, size checks and the train/validation carve.

Every reader (``mnist``, ``cifar10``, ``curves``) returns a :class:`RawData`: the full training and test
sets as NumPy arrays in NCHW layout, either ``uint8`` (0..255) or ``float32`` already in [0, 1].
:func:`carve_indices` then picks which training rows become validation and which stay for training, and
``ksd.data.load_dataset`` turns the selected rows into float32/int64 torch tensors (:class:`Split`).

The carve: ``torch.randperm(N)`` with a ``torch.Generator`` seeded by ``seed``; its first ``val_size``
entries are the validation rows, the rest are the training rows. Both index sets are then sorted, so the
kept training examples are in file order, and ``train_size`` keeps the first ``train_size`` of them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch


class DataError(Exception):
    """One clear, user-facing sentence: path, expected files, how to get them."""


@dataclass
class Split:
    """One part (train, validation or test) of a data set, as tensors on the requested device."""

    inputs: torch.Tensor  # float32 (N, C, H, W)
    labels: torch.Tensor | None  # int64 (N,), None for CURVES

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True)
class DataSpec:
    """What a data set is: its name, the shape of one input, the number of classes and where it came from."""

    name: str  # "mnist" | "curves" | "cifar10" | "text"
    input_shape: tuple[int, ...]  # (1, 28, 28), (3, 32, 32) or (seq_len,) for text
    num_classes: int | None  # 10, or None for CURVES
    source: str  # human-readable provenance


@dataclass
class Splits:
    """The three splits of a loaded data set plus its spec and the lines a run should log."""

    train: Split
    val: Split
    test: Split
    spec: DataSpec
    notes: list[str] = field(default_factory=list)

    def to_float(self, dtype: torch.dtype) -> Splits:
        """These splits with floating-point inputs in ``dtype`` (labels and character indices unchanged)."""

        def cast(split: Split) -> Split:
            floating = split.inputs.is_floating_point()
            return Split(split.inputs.to(dtype) if floating else split.inputs, split.labels)

        return Splits(cast(self.train), cast(self.val), cast(self.test), self.spec, self.notes)


@dataclass
class RawData:
    """What a reader returns: full training and test sets as NumPy arrays (internal)."""

    train_x: np.ndarray  # (N, C, H, W) uint8 in 0..255 or float32 in [0, 1]
    train_y: np.ndarray | None  # int64 (N,) or None
    test_x: np.ndarray
    test_y: np.ndarray | None
    source: str
    notes: list[str] = field(default_factory=list)


def check_size(value: object, what: str, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int (or None where allowed); raise :class:`DataError` for anything else."""
    if value is None:
        if allow_none:
            return None
        raise DataError(f"{what} must be an integer >= {minimum}, got None.")
    if isinstance(value, bool):
        raise DataError(f"{what} must be an integer >= {minimum}, got the boolean {value!r}.")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}.") from None
    if number < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {number}.")
    return number


def carve_indices(
    n_train_full: int, *, val_size: int, train_size: int | None, seed: int, dataset: str = "the data set"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n_train_full)`` into sorted (train, validation) int64 index tensors.

    ``val_size`` rows are drawn with ``torch.randperm`` under a generator seeded by ``seed``; of the
    remaining rows (in file order) the first ``train_size`` are kept (None = all).
    """
    if val_size >= n_train_full:
        raise DataError(
            f"val_size={val_size} leaves no training examples: the {dataset} training set has only "
            f"{n_train_full} examples, so choose val_size < {n_train_full}."
        )
    generator = torch.Generator()
    try:
        generator.manual_seed(int(seed))
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise DataError(
            f"seed must be an integer usable by torch.Generator.manual_seed, got {seed!r}: {exc}."
        ) from exc
    perm = torch.randperm(n_train_full, generator=generator)
    val_idx = perm[:val_size].sort().values
    train_idx = perm[val_size:].sort().values
    if train_size is not None:
        if train_size > train_idx.numel():
            raise DataError(
                f"train_size={train_size} is larger than the {train_idx.numel()} {dataset} training examples "
                f"left after carving val_size={val_size} validation examples from {n_train_full}; "
                f"use train_size <= {train_idx.numel()} or null for all."
            )
        train_idx = train_idx[:train_size]
    return train_idx, val_idx
