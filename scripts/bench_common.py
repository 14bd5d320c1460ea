"""Helpers shared by the benchmark scripts: the MNIST autoencoder problem, device sync, timing, log-log
fits and printing."""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable
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


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one ``fn()``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def paired_step_times(
    step: Callable[[], object],
    baseline: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    block: int = 3,
) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats × block`` calls of ``step`` after ``warmup`` calls and as many ``baseline`` calls
    (e.g. an Adam step), in alternating blocks of ``block`` calls: both are measured under the same load on a
    shared machine, and each method runs consecutive steps as in training (the medians discount the first
    step of a block, which starts with the other method's data in the caches)."""
    for _ in range(warmup):
        step()
    times, baseline_times = [], []
    for _ in range(repeats):
        baseline_times += [seconds(baseline, device) for _ in range(block)]
        times += [seconds(step, device) for _ in range(block)]
    return times, baseline_times


#: Mini-batch of the warm-up steps of ``warm_up``: what makes a quasi-Newton step reach its steady cost
#: is how many steps it has taken, not the batch they were taken on.
WARMUP_BATCH = 50


def warm_up(optimizer, steps: int) -> None:
    """Take ``steps`` steps to bring ``optimizer`` to its steady-state cost, cheaply.

    A step's cost grows until the optimizer's memory is full (L-BFGS, ARCs-LSR1 and K-BFGS(L): one pair
    per step, the compact form as wide as the steps taken) or its first inversion period is over (K-FAC
    inverts every step until then), and it depends on how many steps were taken, not on their batch. So a
    mini-batch optimizer takes all but the last of them on ``WARMUP_BATCH`` examples (K-BFGS(L)'s 101
    warm-up steps at batch 1,000 were a quarter of ``make bench``), then one at its own batch, which
    brings the batch's buffers and caches back. Full-batch optimizers take their steps as configured.
    """
    size = optimizer.config.batch_size
    if size is not None and steps > 1:
        optimizer.config.batch_size = min(size, WARMUP_BATCH)
        for _ in range(steps - 1):
            optimizer.step()
        optimizer.config.batch_size = size
        steps = 1
    for _ in range(steps):
        optimizer.step()


def log_log_slope(sizes: list[float], times: list[float]) -> float:
    """Exponent ``p`` of ``time ∝ size^p``: the least-squares slope of log(time) against log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


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
