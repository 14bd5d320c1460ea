"""The run loop shared by every optimizer.

::

    evaluate(step 0)
    while budget left (steps, epochs of gradient examples, training seconds):
        stats = optimizer.step()
        every run.eval_every steps: evaluate, write a metrics row
    evaluate at the end

A run can be checkpointed (:meth:`Trainer.state_dict`) and resumed exactly; SIGTERM and SIGUSR2 stop
it at the next step boundary with a checkpoint. Training wall time excludes evaluation and is read
with the device synchronised at evaluation points only; nothing inside a step forces a host
synchronisation. A non-finite loss, or an
optimizer raising :class:`Diverged`, ends the run with ``status = "diverged"`` and the reason.

With ``run.on_divergence = rewind`` the engine keeps, in memory, the state of the last evaluation that
looked healthy (θ, the optimizer's state, the random generators, the data position and work counts). A
divergence — the optimizer raising :class:`Diverged`, a non-finite training loss at an evaluation, or a
training loss more than ``run.rewind_loss_factor`` times the last healthy evaluation's — then restores
that state and continues with ``optimizer.step_scale`` halved (``0.5ᵏ`` after k rewinds; what it scales
is each method's ``step_scale_applies_to``). A rewind is a row of its own (``rewind``, ``step_scale``,
``rewind_reason``, ``rewound_loss``, but no ``train_loss``, so curves skip it); its wall time counts. The
divergence after ``run.max_rewinds`` rewinds ends the run as diverged. Steps, epochs and work counts
are those of the trajectory: after a rewind they continue from the restored evaluation.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
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
    signal: int | None = None  # the stop signal of an interrupted run
    rewinds: int = 0  # run.on_divergence=rewind: rewinds made


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
        if problem.loss_fn.perplexity:
            # capped so that a diverged run's loss does not overflow the exponential
            metrics[f"{name}_perplexity"] = math.exp(min(values["loss"], 700.0))
    return metrics


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, Tensor) else value


class _Signals:
    """Remembers SIGTERM / SIGUSR2 (what SLURM sends before preemption) until the next step boundary."""

    NAMES = ("SIGTERM", "SIGUSR2")

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                signum = getattr(signal, name)
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Trainer:
    """The run loop of one optimizer on one problem, resumable from :meth:`state_dict`.

    Args:
        problem, optimizer: what to train and how.
        cfg: budget, evaluation schedule and checkpoint frequency.
        on_row: receives each metrics row as it is written.
        checkpoint: called with :meth:`state_dict` every ``cfg.checkpoint_every`` evaluations and when
            SIGTERM or SIGUSR2 arrives (the run then stops at the step boundary as ``interrupted``).
        progress: show a progress bar.
    """

    def __init__(
        self,
        problem: Problem,
        optimizer: Optimizer,
        cfg: RunConfig,
        on_row: Callable[[dict[str, Any]], None],
        *,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.problem, self.optimizer, self.cfg = problem, optimizer, cfg
        self.on_row, self.checkpoint, self.progress = on_row, checkpoint, progress
        self.clock = Clock(problem.device)
        self.outcome = RunOutcome("completed", "budget reached", 0, 0.0, 0.0)
        self.stats: dict[str, Any] = {}
        self.finite = torch.ones((), dtype=torch.bool, device=problem.device)
        self.bar = None
        self._healthy: dict[str, Any] | None = None  # rewind: the state of the last healthy evaluation

    @property
    def last_recorded(self) -> int | None:
        """The step of the last metrics row (None before the first)."""
        return self.outcome.rows[-1]["step"] if self.outcome.rows else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the run is now (at a step boundary)."""
        return {
            **self._trajectory_state(),
            "elapsed": self.clock.elapsed,
            "rows": list(self.outcome.rows),
            "stats": {k: _scalar(v) for k, v in self.stats.items()},
            "finite": bool(self.finite),
            "rewinds": self.outcome.rewinds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore_trajectory(state)
        self.clock.elapsed = state["elapsed"]
        self.outcome.rows = list(state["rows"])
        self.stats = dict(state["stats"])
        self.finite.fill_(state["finite"])
        self.outcome.rewinds = state.get("rewinds", 0)
        self.optimizer.step_scale = 0.5**self.outcome.rewinds

    def _trajectory_state(self) -> dict[str, Any]:
        """Where the trajectory is: the step, θ, the optimizer's state, the data position, the generators."""
        state = {
            "steps": self.outcome.steps,
            "problem": self.problem.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.problem.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.problem.device)
        return state

    def _restore_trajectory(self, state: dict[str, Any]) -> None:
        self.outcome.steps = state["steps"]
        self.problem.load_state_dict(state["problem"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.problem.device)

    # ------------------------------------------------------------------ rewinds
    @property
    def _rewinding(self) -> bool:
        return self.cfg.on_divergence == "rewind"

    def _keep_healthy(self) -> None:
        """Remember the current state as the one to rewind to (a copy: training changes tensors in place)."""
        self._healthy = copy.deepcopy(self._trajectory_state())

    def _can_rewind(self) -> bool:
        return self._rewinding and self._healthy is not None and self.outcome.rewinds < self.cfg.max_rewinds

    def _rewind(self, reason: str, loss: float | None) -> None:
        """Write the rewind's row, restore the last healthy state and halve the step size."""
        outcome = self.outcome
        outcome.rewinds += 1
        scale = 0.5**outcome.rewinds
        row = {
            **self._position(),
            "rewind": outcome.rewinds,
            "step_scale": scale,
            "rewind_reason": reason,
            "rewound_loss": loss,
        }
        outcome.rows.append(row)
        self.on_row(row)
        self._restore_trajectory(copy.deepcopy(self._healthy))  # a second rewind may need it again
        self.optimizer.step_scale = scale
        self.finite.fill_(True)
        self.stats = {}

    def _divergence(self, train_loss: float) -> str | None:
        """Why the run looks diverged at this evaluation, or None."""
        if not bool(self.finite) or not math.isfinite(train_loss):
            return f"non-finite training loss by step {self.outcome.steps}"
        healthy = self._last_healthy_loss()
        if self._rewinding and healthy is not None and train_loss > self.cfg.rewind_loss_factor * healthy:
            return (
                f"training loss {train_loss:.4g} at step {self.outcome.steps} is more than "
                f"{self.cfg.rewind_loss_factor:g} × the last evaluation's {healthy:.4g}"
            )
        return None

    def _last_healthy_loss(self) -> float | None:
        for row in reversed(self.outcome.rows):
            if "train_loss" in row:
                return row["train_loss"]
        return None

    # ------------------------------------------------------------------ the loop
    def _position(self) -> dict[str, Any]:
        problem, counts = self.problem, self.problem.counts
        return {
            "step": self.outcome.steps,
            "epoch": problem.epoch,
            "passes": (counts.gradient + counts.forward + counts.curvature) / problem.n_train,
            "wall_time": self.clock.elapsed,
        }

    def _record(self) -> bool:
        """Evaluate and write a row (or rewind); False when the run has diverged."""
        problem, outcome = self.problem, self.outcome
        metrics = evaluate(problem, self.cfg.eval_train_size)
        reason = self._divergence(metrics["train_loss"])
        if reason is not None and self._can_rewind():
            self._rewind(reason, metrics["train_loss"])
            return True
        row: dict[str, Any] = {**self._position(), **metrics}
        row.update({k: _scalar(v) for k, v in self.stats.items() if k != "loss"})
        outcome.rows.append(row)
        self.on_row(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['train_loss']:.4g}", refresh=False)
        if reason is not None:
            outcome.status = "diverged"
            outcome.reason = reason if not outcome.rewinds else f"{reason}, after {outcome.rewinds} rewinds"
            return False
        if self._rewinding:
            self._keep_healthy()
        every = self.cfg.checkpoint_every
        if self.checkpoint is not None and every and len(outcome.rows) % every == 0:
            self.checkpoint(self.state_dict())
        return True

    def _evaluation_due(self) -> bool:
        """Every ``eval_every`` steps, or once ``eval_epochs`` epochs or ``eval_seconds`` of training time
        passed since the last row (the first two do not depend on the machine's speed, the last does)."""
        cfg = self.cfg
        if self.outcome.steps % cfg.eval_every == 0:
            return True
        last = self.outcome.rows[-1] if self.outcome.rows else {"epoch": 0.0, "wall_time": 0.0}
        if cfg.eval_epochs is not None and self.problem.epoch - last["epoch"] >= cfg.eval_epochs:
            return True
        return cfg.eval_seconds is not None and self.clock.now() - last["wall_time"] >= cfg.eval_seconds

    def _budget_left(self) -> bool:
        cfg, problem = self.cfg, self.problem
        return not (
            (cfg.max_steps is not None and self.outcome.steps >= cfg.max_steps)
            or (cfg.max_epochs is not None and problem.epoch >= cfg.max_epochs)
            or (cfg.max_seconds is not None and self.clock.now() >= cfg.max_seconds)
        )

    def run(self) -> RunOutcome:
        """Train until the budget is spent, the run diverges or a stop signal arrives."""
        outcome, problem = self.outcome, self.problem
        self.bar = _progress_bar(self.cfg, self.progress)
        ok = self._record() if self.last_recorded is None else True
        if ok and self._rewinding and self._healthy is None:  # resumed from a checkpoint
            self._keep_healthy()
        with _Signals() as signals:
            self.clock.start()
            while ok and self._budget_left():
                if signals.received is not None:
                    self.clock.pause()
                    outcome.status = "interrupted"
                    outcome.reason = f"received {signal.Signals(signals.received).name}; checkpointed"
                    outcome.signal = signals.received
                    if self.checkpoint is not None:
                        self.checkpoint(self.state_dict())
                    break
                try:
                    self.stats = self.optimizer.step()
                except (Diverged, torch.linalg.LinAlgError, FloatingPointError) as err:
                    self.clock.pause()
                    reason = f"{type(err).__name__}: {err}"
                    if self._can_rewind():
                        self._rewind(reason, None)
                        self.clock.start()
                        continue
                    self._record()  # before the reason: its own non-finite-loss reason must not replace it
                    outcome.status, outcome.reason = "diverged", reason
                    if outcome.rewinds:
                        outcome.reason += f", after {outcome.rewinds} rewinds"
                    break
                if "loss" in self.stats:
                    self.finite &= torch.isfinite(torch.as_tensor(self.stats["loss"], device=problem.device))
                outcome.steps += 1
                if self.bar is not None:
                    self.bar.update(
                        _progress_units(self.cfg, problem, self.clock, outcome.steps) - self.bar.n
                    )
                if self._evaluation_due():
                    self.clock.pause()
                    ok = self._record()
                    self.clock.start()
            if self.clock.running:
                self.clock.pause()
        if ok and outcome.status == "completed" and self.last_recorded != outcome.steps:
            self._record()
        outcome.epochs, outcome.wall_time = problem.epoch, self.clock.elapsed
        if self.bar is not None:
            self.bar.close()
        return outcome


def train(
    problem: Problem,
    optimizer: Optimizer,
    cfg: RunConfig,
    on_row: Callable[[dict[str, Any]], None],
    *,
    progress: bool = False,
) -> RunOutcome:
    """Run ``optimizer`` on ``problem`` within the budget of ``cfg`` (no checkpoints)."""
    return Trainer(problem, optimizer, cfg, on_row, progress=progress).run()


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
