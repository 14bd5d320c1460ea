"""First-order baselines: SGD with momentum and Adam, as thin wrappers of ``torch.optim``.

They act on ``problem.model.parameters()``, which are views of ``problem.theta``, so a step costs
exactly what the same ``torch.optim`` step costs in a hand-written loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ksd.config import require
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
