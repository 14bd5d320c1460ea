"""Nonlinear conjugate gradient (Nocedal & Wright §5.2) on the flat parameter vector.

The "conjugate gradient descent" baseline of Vinyals & Povey (2012) and the PT+NCG row of
Martens (2010). One :meth:`NonlinearCG.step` is one iteration:

1. gradient ``g_k`` on the batch (the whole training set by default, reused from the previous line
   search when full-batch);
2. direction ``d_k = −g_k + β_k d_{k−1}`` with (N&W eq. 5.41 and 5.44–5.45)

   - Fletcher–Reeves: ``β_k = g_kᵀg_k / g_{k−1}ᵀg_{k−1}``,
   - Polak–Ribière+: ``β_k = max(0, g_kᵀ(g_k − g_{k−1}) / g_{k−1}ᵀg_{k−1})`` — the ``max`` restarts
     with steepest descent whenever PR's β turns negative;

   ``d_k = −g_k`` on the first iteration, every ``restart_every`` iterations, and whenever
   ``d_k`` is not a descent direction (``g_kᵀd_k ≥ 0``, possible with inexact line searches);
3. step length by the strong-Wolfe line search shared with L-BFGS (:func:`~ksd.optim.linalg.strong_wolfe`);
   the first trial step is ``t_{k−1} g_{k−1}ᵀd_{k−1} / g_kᵀd_k`` (N&W eq. 3.60: the first-order change of
   the previous step), ``min(1, 1/‖g‖₁)·lr`` on the first iteration and after a rejected step.
   ``c2 = 0.1`` by default: N&W §5.2 recommend ``c2 < 1/2`` for FR, which otherwise may produce ascent
   directions, and a near-exact line search is what keeps CG directions conjugate.

With an exact line search on a convex quadratic both variants are linear CG and reach the minimiser
in at most ``n`` iterations (N&W Theorem 5.2); ``tests/test_ncg.py`` checks this and compares with
``scipy.optimize.minimize(method="CG")`` on the Rosenbrock function.

In mini-batch mode (``batch_size`` set) ``g_{k−1}`` is the previous batch's gradient, as in the
large-batch NCG of the deep-learning literature; the line search uses the current batch only.

Faults (docs/faults.md): a non-finite loss or gradient at θ raises :class:`~ksd.optim.base.Diverged`;
a line search that finds no decrease returns ``t = 0``: the step is rejected and the next iteration
restarts with steepest descent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ksd.errors import require
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.optim.lbfgs import search_along
from ksd.problem import Problem

VARIANTS = ("polak_ribiere", "fletcher_reeves")


class NonlinearCG(Optimizer):
    step_scale_applies_to = "the first trial step of the line search"

    @dataclass
    class Config(OptimizerConfig):
        name: str = "ncg"
        batch_size: int | None = None  # None: full batch
        variant: str = "polak_ribiere"  # polak_ribiere (PR+, restarts when β < 0) | fletcher_reeves
        restart_every: int | None = None  # steepest-descent restart every N iterations (None: only PR+'s)
        lr: float = 1.0  # first trial step is min(1, 1/‖g‖₁)·lr on the first iteration
        c1: float = 1e-4  # sufficient decrease
        c2: float = 0.1  # curvature condition (N&W §5.2: < 1/2 for Fletcher–Reeves)
        max_evaluations: int = 25  # line-search trials per step
        tolerance_change: float = 1e-9  # no step when the directional derivative is above −this

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("lr", "max_evaluations")
            require(
                self.variant in VARIANTS,
                f"optimizer.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.",
            )
            require(
                self.restart_every is None or self.restart_every >= 1,
                f"optimizer.restart_every must be >= 1 or null, got {self.restart_every}.",
            )
            require(0 < self.c1 < self.c2 < 1, "optimizer.c1 and c2 must satisfy 0 < c1 < c2 < 1.")

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        # previous gradient and direction, ‖g_{k−1}‖², g_{k−1}ᵀd_{k−1}·t_{k−1} (for the first trial step)
        self.state.update(
            grad=None,
            direction=None,
            grad_norm2=None,
            decrease=None,
            since_restart=0,
            iteration=0,
            cached=None,
        )

    def beta(self, grad: torch.Tensor) -> float:
        """``β_k`` of the configured variant (N&W eq. 5.41a, 5.45); ``0`` means steepest descent."""
        st = self.state
        if self.config.variant == "fletcher_reeves":
            return grad.dot(grad).item() / st["grad_norm2"]
        return max(0.0, grad.dot(grad - st["grad"]).item() / st["grad_norm2"])

    def step(self) -> Stats:
        c, st, theta = self.config, self.state, self.problem.theta
        batch, loss, grad, full_batch = self.batch_and_gradient()
        self.check_finite(f"loss or gradient at NCG iteration {st['iteration']}", loss, grad)
        restart = st["direction"] is None or (
            c.restart_every is not None and st["since_restart"] >= c.restart_every
        )
        beta = 0.0 if restart else self.beta(grad)
        direction = grad.neg() if beta == 0.0 else st["direction"].mul(beta).sub_(grad)
        slope = grad.dot(direction).item()
        if beta != 0.0 and slope >= 0:  # not a descent direction: restart
            direction, slope, beta = grad.neg(), -grad.dot(grad).item(), 0.0
        st["since_restart"] = 0 if beta == 0.0 else st["since_restart"] + 1
        if slope > -c.tolerance_change:
            return {"loss": loss, "step_size": 0.0, "evaluations": 0, "beta": beta}
        if st["decrease"] is None:
            t = min(1.0, 1.0 / grad.abs().sum().item()) * c.lr * self.step_scale
        else:
            t = st["decrease"] / slope * self.step_scale
        result = search_along(self, batch, direction, loss, grad, t, slope)
        st["iteration"] += 1
        st["grad"], st["grad_norm2"] = grad, grad.dot(grad).item()
        if result.step == 0.0:  # rejected: θ unchanged, the next iteration restarts
            st["direction"], st["decrease"], st["cached"] = None, None, None
            return {"loss": loss, "step_size": 0.0, "evaluations": result.evaluations, "beta": beta}
        theta.add_(direction, alpha=result.step)
        st["direction"], st["decrease"] = direction, result.step * slope
        st["cached"] = (
            (torch.as_tensor(result.loss, dtype=theta.dtype, device=theta.device), result.grad)
            if full_batch
            else None
        )
        return {"loss": loss, "step_size": result.step, "evaluations": result.evaluations, "beta": beta}
