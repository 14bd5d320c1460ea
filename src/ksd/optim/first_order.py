"""First-order baselines: SGD with momentum, Adam, RMSprop and AdaGrad, as thin wrappers of ``torch.optim``.

They act on ``problem.model.parameters()``, which are views of ``problem.theta``, so a step costs
exactly what the same ``torch.optim`` step costs in a hand-written loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ksd.errors import require
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.problem import Problem


class _TorchOptimizer(Optimizer):
    """Shared step of the ``torch.optim`` wrappers: one mini-batch gradient, one update."""

    def __init__(self, problem: Problem, config: OptimizerConfig | None = None) -> None:
        super().__init__(problem, config)
        self.torch_optimizer = self._make(list(problem.model.parameters()))

    def _make(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        raise NotImplementedError

    def step(self) -> Stats:
        for group in self.torch_optimizer.param_groups:  # a restored state_dict brings its own lr
            group["lr"] = self.config.lr * self.step_scale
        self.torch_optimizer.zero_grad(set_to_none=True)
        loss = self.problem.backward(self.next_batch())
        self.torch_optimizer.step()
        return {"loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "torch": self.torch_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.torch_optimizer.load_state_dict(state_dict["torch"])


class SGD(_TorchOptimizer):
    """Stochastic gradient descent with (Nesterov) momentum, ``torch.optim.SGD``.

    ``dampening = momentum`` gives the exponential-moving-average momentum of the K-BFGS code,
    ``m ← ρ m + (1 − ρ) g``; the default ``dampening = 0`` is PyTorch's ``m ← ρ m + g``.
    """

    @dataclass
    class Config(OptimizerConfig):
        name: str = "sgd"
        batch_size: int | None = 100
        lr: float = 0.01
        momentum: float = 0.9
        dampening: float = 0.0
        nesterov: bool = False

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr")
            require(0 <= self.momentum < 1, f"optimizer.momentum must be in [0, 1), got {self.momentum}.")
            require(0 <= self.dampening <= 1, f"optimizer.dampening must be in [0, 1], got {self.dampening}.")
            require(
                not self.nesterov or (self.momentum > 0 and self.dampening == 0),
                "optimizer.nesterov needs momentum > 0 and dampening = 0.",
            )

    def _make(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.SGD(
            params,
            lr=c.lr,
            momentum=c.momentum,
            dampening=c.dampening,
            nesterov=c.nesterov,
            weight_decay=c.weight_decay,
        )


class Adam(_TorchOptimizer):
    """Adam (Kingma & Ba), ``torch.optim.Adam`` with L2 weight decay added to the gradient.

    ``kbfgs_variant = true``: the Adam of the K-BFGS authors' code (``first_order_methods.py``), whose
    second moment averages the squared *bias-corrected momentum* ``m̂²`` instead of ``g²``
    (:class:`KBFGSCodeAdam`); their settings are ``beta2 = 0.9`` and ``eps = 1e-4``.
    """

    @dataclass
    class Config(OptimizerConfig):
        name: str = "adam"
        batch_size: int | None = 100
        lr: float = 1e-3
        beta1: float = 0.9
        beta2: float = 0.999
        eps: float = 1e-8
        kbfgs_variant: bool = False  # second moment from the bias-corrected momentum (K-BFGS code)

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr", "eps")
            for key in ("beta1", "beta2"):
                value = getattr(self, key)
                require(0 <= value < 1, f"optimizer.{key} must be in [0, 1), got {value}.")

    def _make(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        adam = KBFGSCodeAdam if c.kbfgs_variant else torch.optim.Adam
        return adam(params, lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps, weight_decay=c.weight_decay)


class KBFGSCodeAdam(torch.optim.Optimizer):
    """``m ← β₁ m + (1 − β₁) g``, ``m̂ = m/(1 − β₁ᵗ)``, ``v ← β₂ v + (1 − β₂) m̂²``, ``v̂ = v/(1 − β₂ᵗ)``,
    ``θ ← θ − lr · m̂ / (√v̂ + ε)``; ``g`` includes ``weight_decay · θ`` (K-BFGS code, ``RMSprop_update``)."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            (beta1, beta2), params = group["betas"], [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state["m"].lerp_(grad, 1 - beta1)
                m_hat = state["m"] / (1 - beta1**t)
                state["v"].mul_(beta2).addcmul_(m_hat, m_hat, value=1 - beta2)
                denominator = (state["v"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_(m_hat, denominator, value=-group["lr"])


class RMSprop(_TorchOptimizer):
    """RMSprop (Tieleman & Hinton 2012), ``torch.optim.RMSprop``: ``v ← α v + (1 − α) g²``,
    ``θ ← θ − lr · g / (√v + ε)`` (with ``momentum``, a heavy-ball buffer of that step).

    ``kbfgs_variant = true``: the RMSprop of the K-BFGS authors' code (``first_order_methods.py``,
    :class:`KBFGSCodeRMSprop`): the gradient is first averaged, ``m ← ρ m + (1 − ρ) g`` with
    ``ρ = momentum``, the second moment averages ``m²`` without bias correction, and it starts from the
    mean of ``g²`` over one pass of the training set in mini-batches (their ``train_initialization``).
    Their settings: ``alpha = 0.9``, ``eps = 1e-4``, ``momentum = 0.9``.
    """

    @dataclass
    class Config(OptimizerConfig):
        name: str = "rmsprop"
        batch_size: int | None = 100
        lr: float = 1e-3
        alpha: float = 0.99
        eps: float = 1e-8
        momentum: float = 0.0
        centered: bool = False
        kbfgs_variant: bool = False  # averaged gradient, second moment from it, data-pass start (K-BFGS code)

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr", "eps")
            for key in ("alpha", "momentum"):
                value = getattr(self, key)
                require(0 <= value < 1, f"optimizer.{key} must be in [0, 1), got {value}.")
            require(
                not (self.kbfgs_variant and self.centered),
                "optimizer.centered is not part of the K-BFGS code's RMSprop (kbfgs_variant=true).",
            )

    def _make(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        if c.kbfgs_variant:
            return KBFGSCodeRMSprop(params, c.lr, c.alpha, c.eps, c.momentum, c.weight_decay)
        return torch.optim.RMSprop(
            params,
            lr=c.lr,
            alpha=c.alpha,
            eps=c.eps,
            momentum=c.momentum,
            centered=c.centered,
            weight_decay=c.weight_decay,
        )

    def step(self) -> Stats:
        if self.config.kbfgs_variant and not self.torch_optimizer.started:
            self.torch_optimizer.start_from_data_pass(
                self.problem, self.config.batch_size or self.problem.n_train
            )
        return super().step()


class KBFGSCodeRMSprop(torch.optim.Optimizer):
    """``m ← ρ m + (1 − ρ) g``, ``v ← α v + (1 − α) m²``, ``θ ← θ − lr · m / (√v + ε)``; ``g`` includes
    ``weight_decay · θ`` and ``v`` starts from the data-pass mean of ``g²`` (K-BFGS code, ``RMSprop_update``
    and ``train_initialization``)."""

    def __init__(self, params, lr: float, alpha: float, eps: float, momentum: float, weight_decay: float):
        super().__init__(
            params, {"lr": lr, "alpha": alpha, "eps": eps, "momentum": momentum, "weight_decay": weight_decay}
        )

    @property
    def started(self) -> bool:
        return any(self.state[p] for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def start_from_data_pass(self, problem: Problem, batch_size: int) -> None:
        """``v`` = mean of ``g²`` over the full mini-batches of one pass of the training set in file order
        (the authors' pass stops at the last full batch; with one batch of everything it is skipped)."""
        params = [p for group in self.param_groups for p in group["params"]]
        for p in params:
            self.state[p].update(m=torch.zeros_like(p), v=torch.zeros_like(p))
        if batch_size >= problem.n_train:
            return
        for j, chunk in enumerate(problem.full_batch.chunks(batch_size)):
            if len(chunk) < batch_size:
                break
            for p in params:
                p.grad = None
            with torch.enable_grad():
                problem.backward(chunk)
            for group in self.param_groups:
                for p in group["params"]:
                    grad = p.grad.add(p, alpha=group["weight_decay"])
                    self.state[p]["v"].lerp_(grad.square_(), 1 / (j + 1))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(m=torch.zeros_like(p), v=torch.zeros_like(p))
                grad = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                state["m"].lerp_(grad, 1 - group["momentum"])
                state["v"].mul_(group["alpha"]).addcmul_(state["m"], state["m"], value=1 - group["alpha"])
                p.addcdiv_(state["m"], state["v"].sqrt().add_(group["eps"]), value=-group["lr"])


class AdaGrad(_TorchOptimizer):
    """AdaGrad (Duchi, Hazan & Singer 2011), ``torch.optim.Adagrad``: ``v ← v + g²``,
    ``θ ← θ − lr_t · g / (√v + ε)`` with ``lr_t = lr / (1 + (t − 1) lr_decay)``."""

    @dataclass
    class Config(OptimizerConfig):
        name: str = "adagrad"
        batch_size: int | None = 100
        lr: float = 0.01
        lr_decay: float = 0.0
        initial_accumulator_value: float = 0.0
        eps: float = 1e-10

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr", "eps")
            for key in ("lr_decay", "initial_accumulator_value"):
                value = getattr(self, key)
                require(value >= 0, f"optimizer.{key} must be >= 0, got {value}.")

    def _make(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.Adagrad(
            params,
            lr=c.lr,
            lr_decay=c.lr_decay,
            initial_accumulator_value=c.initial_accumulator_value,
            eps=c.eps,
            weight_decay=c.weight_decay,
        )
