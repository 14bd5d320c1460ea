"""Helpers shared by the benchmark scripts: the MNIST autoencoder problem, device sync and printing."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from ksd.config import ModelConfig
from ksd.data import DataSpec, Split, Splits, load_dataset
from ksd.models import build_model
from ksd.problem import Problem


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=8)
def mnist_splits(device: torch.device, train_size: int) -> Splits:
    """Real MNIST when $KSD_DATA has it, else uniform random images of the same shape."""
    root = os.environ.get("KSD_DATA")
    if root and (Path(root) / "MNIST" / "raw").is_dir():
        return load_dataset("mnist", root, val_size=0, train_size=train_size, test_size=1000, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(train_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (train_size,), generator=g).to(device)
    return Splits(
        Split(x, y),
        Split(x[:0], y[:0]),
        Split(x[:1000], y[:1000]),
        DataSpec("mnist", (1, 28, 28), 10, "random stand-in for MNIST"),
    )


def mnist_autoencoder_problem(
    device: torch.device,
    train_size: int,
    seed: int = 0,
    activation: str = "sigmoid",
    widths: list[int] | None = None,
) -> Problem:
    """The papers' 784-1000-500-250-30 autoencoder (2.8 M parameters) on MNIST, or other ``widths``."""
    splits = mnist_splits(device, train_size)
    torch.manual_seed(seed)
    built = build_model(ModelConfig(activation=activation, widths=widths), splits.spec)
    return Problem(built.network.to(device), built.loss, splits, autoencoder=True, seed=seed)


def state_bytes(obj) -> int:
    """Bytes of all tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        target = f" (target ≤ {row['target']})" if row.get("target") is not None else ""
        value = f"{row['ratio']:.3f}" if isinstance(row.get("ratio"), float) else str(row.get("ratio"))
        print(f"{row['name']}: {value}{target}  [{row.get('detail', '')}]")
