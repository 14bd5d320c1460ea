"""Limited-memory BFGS (Nocedal & Wright §7.2) on the flat parameter vector.

One :meth:`LBFGS.step` is one quasi-Newton iteration:

1. gradient ``g_k`` on the batch (the whole training set by default, reused from the previous
   line search when full-batch);
2. direction ``d = −H_k g_k`` by the two-loop recursion over the last ``history_size`` pairs with
   ``H₀ = γ I``, ``γ = sᵀy / yᵀy`` of the newest pair (``d = −g`` before the first pair);
3. step length by a strong-Wolfe line search (first trial ``lr``; ``min(1, 1/‖g‖₁)·lr`` on the very
   first iteration, as ``torch.optim.LBFGS``) or the fixed step ``lr``;
4. the pair ``s = t d``, ``y = g(θ + s) − g(θ)`` — both gradients on the *same* batch, so in
   mini-batch mode the difference measures curvature rather than sampling noise — is stored when
   ``sᵀy > curvature_eps``.

Faults (docs/faults.md): a non-finite loss or gradient at θ raises :class:`~ksd.optim.base.Diverged`;
a line search that finds no decrease (non-finite trial points count as +∞) returns ``t = 0``: the step
is rejected (θ unchanged, ``step_size = 0``, no pair stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ksd.errors import require
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.optim.linalg import LineSearchResult, strong_wolfe, two_loop_recursion
from ksd.problem import Batch, Problem


def search_along(
    optimizer: Optimizer,
    batch: Batch,
    direction: Tensor,
    loss: Tensor,
    grad: Tensor,
    step: float,
    slope: float,
) -> LineSearchResult:
    """:func:`~ksd.optim.linalg.strong_wolfe` on the regularised objective of ``batch`` along ``direction``
    from θ, first trial ``step``, with the optimizer's ``c1``, ``c2``, ``tolerance_change`` and
    ``max_evaluations`` (L-BFGS and nonlinear CG share it)."""
    c, theta = optimizer.config, optimizer.problem.theta

    def evaluate(t: float) -> tuple[float, Tensor]:
        f, g = optimizer.objective_and_grad(batch, theta + t * direction)
        return f.item(), g

    return strong_wolfe(
        evaluate,
        direction,
        loss.item(),
        grad,
        step,
        c1=c.c1,
        c2=c.c2,
        tolerance=c.tolerance_change,
        max_evaluations=c.max_evaluations,
        slope=slope,
    )


class LBFGS(Optimizer):
    step_scale_applies_to = "lr, the first trial step of the line search (or the fixed step)"

    @dataclass
    class Config(OptimizerConfig):
        name: str = "lbfgs"
        batch_size: int | None = None  # None: full batch
        lr: float = 1.0  # first trial step of the line search, or the fixed step
        history_size: int = 10  # pairs kept (m)
        line_search: str = "strong_wolfe"  # strong_wolfe | none
        c1: float = 1e-4  # sufficient decrease
        c2: float = 0.9  # curvature condition
        max_evaluations: int = 25  # line-search trials per step
        curvature_eps: float = 1e-10  # store a pair only when sᵀy exceeds this
        tolerance_change: float = 1e-9  # no step when the directional derivative is above −this

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr", "max_evaluations")
            require(self.history_size >= 1, f"optimizer.history_size must be >= 1, got {self.history_size}.")
            require(
                self.line_search in ("strong_wolfe", "none"),
                f"optimizer.line_search must be strong_wolfe or none, got {self.line_search!r}.",
            )
            require(0 < self.c1 < self.c2 < 1, "optimizer.c1 and c2 must satisfy 0 < c1 < c2 < 1.")

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        self.state.update(steps=[], grad_diffs=[], rhos=[], gamma=1.0, iteration=0, cached=None)

    def step(self) -> Stats:
        c, st, theta = self.config, self.state, self.problem.theta
        batch, loss, grad, full_batch = self.batch_and_gradient()
        self.check_finite(f"loss or gradient at L-BFGS iteration {st['iteration']}", loss, grad)
        if st["steps"]:
            direction = two_loop_recursion(
                grad, st["steps"], st["grad_diffs"], st["rhos"], st["gamma"]
            ).neg_()
        else:
            direction = grad.neg()
        slope = grad.dot(direction).item()
        if slope > -c.tolerance_change:
            return {"loss": loss, "step_size": 0.0, "evaluations": 0}
        lr = c.lr * self.step_scale
        t = min(1.0, 1.0 / grad.abs().sum().item()) * lr if st["iteration"] == 0 else lr
        if c.line_search == "strong_wolfe":
            result = search_along(self, batch, direction, loss, grad, t, slope)
            t, new_loss, new_grad, evaluations = result.step, result.loss, result.grad, result.evaluations
        else:
            new_loss, new_grad = self.objective_and_grad(batch, theta + t * direction)
            evaluations = 1
        step = direction.mul_(t)
        theta.add_(step)
        self._remember(step, new_grad - grad)
        st["iteration"] += 1
        if full_batch:  # new_loss is a float after the line search, a tensor without it
            st["cached"] = (torch.as_tensor(new_loss, dtype=theta.dtype, device=theta.device), new_grad)
        else:
            st["cached"] = None
        return {"loss": loss, "step_size": t, "evaluations": evaluations}

    def _remember(self, step: torch.Tensor, grad_diff: torch.Tensor) -> None:
        """Store the pair if ``sᵀy > curvature_eps`` (keeps H positive definite; a NaN ``sᵀy`` fails the
        test too), dropping the oldest. A rejected step (``s = 0``) is never stored."""
        st = self.state
        sy = step.dot(grad_diff).item()
        if not sy > self.config.curvature_eps:
            return
        if len(st["steps"]) == self.config.history_size:
            for key in ("steps", "grad_diffs", "rhos"):
                st[key].pop(0)
        st["steps"].append(step)
        st["grad_diffs"].append(grad_diff)
        st["rhos"].append(1.0 / sy)
        st["gamma"] = sy / grad_diff.dot(grad_diff).item()
