"""The run loop shared by every optimizer.

::

    evaluate(step 0)
    while budget left (steps, epochs of gradient examples, training seconds):
        stats = optimizer.step()
        every run.eval_every steps: evaluate, write a metrics row
    evaluate at the end

Training wall time excludes evaluation and is read with the device synchronised at evaluation
points only; nothing inside a step forces a host synchronisation. A non-finite loss, or an
optimizer raising :class:`Diverged`, ends the run with ``status = "diverged"`` and the reason.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ksd.config import RunConfig
from ksd.optim.base import Diverged, Optimizer
from ksd.problem import Problem


@dataclass
class RunOutcome:
    status: str  # completed | diverged
    reason: str
    steps: int
    epochs: float
    wall_time: float
    rows: list[dict[str, Any]] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Training wall time: accumulates only while running, synchronising the device on pause."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self._started: float | None = None

    def start(self) -> None:
        self._started = time.perf_counter()

    def pause(self) -> None:
        synchronize(self.device)
        self.elapsed += time.perf_counter() - self._started
        self._started = None

    @property
    def running(self) -> bool:
        return self._started is not None

    def now(self) -> float:
        """Elapsed training time so far (without a device synchronisation)."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self.elapsed + running


def evaluate(problem: Problem, eval_train_size: int | None) -> dict[str, float]:
    """Loss and error on a fixed training subset, the validation split and the test split."""
    metrics: dict[str, float] = {}
    splits = problem.splits
    for name, split, limit in (
        ("train", splits.train, eval_train_size),
        ("val", splits.val, None),
        ("test", splits.test, None),
    ):
        if len(split) == 0:
            continue
        values = problem.evaluate(split, limit)
        metrics[f"{name}_loss"] = values["loss"]
        metrics[f"{name}_error"] = values["error"]
        if problem.loss_fn.classification:
            metrics[f"{name}_accuracy"] = 1.0 - values["error"]
    return metrics


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


def train(
    problem: Problem,
    optimizer: Optimizer,
    cfg: RunConfig,
    on_row: Callable[[dict[str, Any]], None],
    *,
    progress: bool = False,
) -> RunOutcome:
    """Run ``optimizer`` on ``problem`` within the budget of ``cfg``; ``on_row`` receives each metrics row."""
    clock = Clock(problem.device)
    outcome = RunOutcome("completed", "budget reached", 0, 0.0, 0.0)
    stats: dict[str, Any] = {}
    finite = torch.ones((), dtype=torch.bool, device=problem.device)
    bar = _progress_bar(cfg, progress)

    def record() -> bool:
        """Evaluate and write a row; False when the run has diverged."""
        row: dict[str, Any] = {
            "step": outcome.steps,
            "epoch": problem.epoch,
            "passes": (problem.counts.gradient + problem.counts.forward + problem.counts.curvature)
            / problem.n_train,
            "wall_time": clock.elapsed,
            **evaluate(problem, cfg.eval_train_size),
        }
        row.update({k: _scalar(v) for k, v in stats.items() if k != "loss"})
        outcome.rows.append(row)
        on_row(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['train_loss']:.4g}", refresh=False)
        if not bool(finite) or not math.isfinite(row["train_loss"]):
            outcome.status, outcome.reason = "diverged", f"non-finite training loss by step {outcome.steps}"
            return False
        return True

    def budget_left() -> bool:
        return not (
            (cfg.max_steps is not None and outcome.steps >= cfg.max_steps)
            or (cfg.max_epochs is not None and problem.epoch >= cfg.max_epochs)
            or (cfg.max_seconds is not None and clock.now() >= cfg.max_seconds)
        )

    ok = record()
    last_recorded = 0
    clock.start()
    while ok and budget_left():
        try:
            stats = optimizer.step()
        except Diverged as err:
            clock.pause()
            outcome.status, outcome.reason = "diverged", str(err)
            outcome.epochs, outcome.wall_time = problem.epoch, clock.elapsed
            record()
            return _finish(outcome, bar)
        if "loss" in stats:
            finite &= torch.isfinite(torch.as_tensor(stats["loss"], device=problem.device))
        outcome.steps += 1
        if bar is not None:
            bar.update(_progress_units(cfg, problem, clock, outcome.steps) - bar.n)
        if outcome.steps % cfg.eval_every == 0:
            clock.pause()
            ok = record()
            last_recorded = outcome.steps
            clock.start()
    if clock.running:
        clock.pause()
    if ok and last_recorded != outcome.steps:
        record()
    outcome.epochs, outcome.wall_time = problem.epoch, clock.elapsed
    return _finish(outcome, bar)


def _finish(outcome: RunOutcome, bar: Any) -> RunOutcome:
    if bar is not None:
        bar.close()
    return outcome


def _progress_bar(cfg: RunConfig, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    if cfg.max_steps is not None:
        total, unit = cfg.max_steps, "step"
    elif cfg.max_epochs is not None:
        total, unit = cfg.max_epochs, "epoch"
    else:
        total, unit = cfg.max_seconds, "s"
    return tqdm(
        total=total,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
        bar_format="{l_bar}{bar}| {n:.4g}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]",
    )


def _progress_units(cfg: RunConfig, problem: Problem, clock: Clock, steps: int) -> float:
    if cfg.max_steps is not None:
        return steps
    if cfg.max_epochs is not None:
        return min(problem.epoch, cfg.max_epochs)
    return min(clock.now(), cfg.max_seconds)
