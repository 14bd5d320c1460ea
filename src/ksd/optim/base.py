"""The interface every ksd optimizer implements."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ksd.errors import require
from ksd.problem import Batch, Problem

Stats = dict[str, Tensor | float | int]


class Diverged(ArithmeticError):
    """Raised by an optimizer whose safeguards cannot continue; the message is the reason."""


@dataclass
class OptimizerConfig:
    """Fields every optimizer has; subclasses add their own hyperparameters."""

    name: str = ""
    batch_size: int | None = None  # examples per gradient; None = the whole training set
    weight_decay: float = 0.0  # L2 coefficient τ: the objective is f(θ) + τ/2 ‖θ‖²

    def __post_init__(self) -> None:
        require(
            self.batch_size is None or self.batch_size >= 1,
            f"optimizer.batch_size must be >= 1 or null, got {self.batch_size}.",
        )
        require(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}.")

    def positive(self, *keys: str) -> None:
        """Refuse non-positive values of the given fields."""
        for key in keys:
            value = getattr(self, key)
            require(value > 0, f"optimizer.{key} must be > 0, got {value}.")


class Optimizer(ABC):
    """One optimizer bound to one :class:`~ksd.problem.Problem`.

    Like ``torch.optim``: constructor takes what it optimizes and its hyperparameters, ``step``
    performs one update and ``state_dict``/``load_state_dict`` capture everything needed to resume.
    ``step`` returns statistics of the update (tensors are fine: the engine reads them only at
    evaluation time, so no host synchronisation is forced inside a step).

    ``step_scale`` multiplies the method's step size; it is 1 (the configured method) unless the engine
    rewinds a diverging run (``run.on_divergence=rewind``), which halves it per rewind. Each method
    applies it to its own step-size parameter, named in :attr:`step_scale_applies_to`. It is not part of
    :meth:`state_dict`: the engine owns it and sets it again after every restore.
    """

    #: what ``step_scale`` multiplies (divides, for a damping or regularisation weight), for the docs
    step_scale_applies_to: ClassVar[str] = "lr"

    Config: ClassVar[type[OptimizerConfig]] = OptimizerConfig

    def __init__(self, problem: Problem, config: OptimizerConfig | None = None) -> None:
        self.problem = problem
        self.config = config if config is not None else self.Config(name=type(self).__name__.lower())
        self.state: dict[str, Any] = {}
        self.step_scale = 1.0

    @abstractmethod
    def step(self) -> Stats:
        """Perform one update of ``problem.theta``; return statistics, including ``loss``."""

    def next_batch(self):
        """The configured gradient batch: a mini-batch of ``batch_size`` or the whole training set."""
        size = self.config.batch_size
        return self.problem.full_batch if size is None else self.problem.next_batch(size)

    def regularized(self, loss: Tensor, grad: Tensor | None = None, theta: Tensor | None = None):
        """Add the L2 term ``τ/2 ‖θ‖²`` to a loss (and ``τ θ`` to its gradient, in place)."""
        tau = self.config.weight_decay
        if tau == 0:
            return loss if grad is None else (loss, grad)
        theta = self.problem.theta if theta is None else theta
        loss = loss + 0.5 * tau * theta.dot(theta)
        return loss if grad is None else (loss, grad.add_(theta, alpha=tau))

    def objective_and_grad(self, batch: Batch, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The regularised objective ``f_B(θ) + τ/2 ‖θ‖²`` on ``batch`` and its gradient, at ``theta``."""
        theta = self.problem.theta if theta is None else theta
        return self.regularized(*self.problem.loss_and_grad(batch, theta), theta=theta)

    @staticmethod
    def check_finite(what: str, *values: Tensor | float) -> None:
        """Raise :class:`Diverged` ``"non-finite {what}"`` unless every entry of ``values`` is finite.

        Host floats are checked for free; tensors cost one host synchronisation together, so the
        optimizers whose step reads host scalars anyway call this at the current point. The others
        (SGD, Adam, K-FAC, K-BFGS) never wait for the host inside a step: a non-finite loss reaches
        the engine, which ends the run as diverged at the next evaluation.
        """
        finite = all(math.isfinite(v) for v in values if not isinstance(v, Tensor))
        tensors = [torch.isfinite(v).all() for v in values if isinstance(v, Tensor)]
        if finite and tensors:
            finite = bool(torch.stack(tensors).all())
        if not finite:
            raise Diverged(f"non-finite {what}")

    def batch_and_gradient(self) -> tuple[Batch, Tensor, Tensor, bool]:
        """The step's batch, the objective and its gradient at θ on it, and whether it is the full batch.

        Full-batch methods that evaluated their accepted point at the end of the previous step keep
        ``(loss, grad)`` in ``state["cached"]``; it is reused instead of being computed again.
        """
        c = self.config
        full_batch = c.batch_size is None or c.batch_size >= self.problem.n_train
        batch = self.next_batch()
        if full_batch and self.state.get("cached") is not None:
            loss, grad = self.state["cached"]
        else:
            loss, grad = self.objective_and_grad(batch)
        return batch, loss, grad, full_batch

    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "state": _to_cpu(self.state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        device = self.problem.device
        self.state = _to_device(state_dict["state"], device)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj
