"""ARCs-LSR1: adaptive regularisation with cubics on a limited-memory SR1 model (Ranganath, Singhal & Marcia,
"Symmetric Rank-One Quasi-Newton Methods for Deep Learning Using Cubic Regularization", arXiv 2502.12298).

One :meth:`ARCsLSR1.step` is one ARC iteration on one batch (the whole training set when
``batch_size`` is null, otherwise a fresh mini-batch — the paper's stochastic variant):

1. ``f = f(θ)`` and ``g = ∇f(θ)`` on the batch (in full-batch mode reused from the previous step);
2. the L-SR1 matrix ``B = γ I + P_∥ Λ̂ P_∥ᵀ`` of the last ``history_size`` pairs (:mod:`ksd.optim.lsr1`);
3. the trial step ``s`` minimising the cubic model in the shape-changing norm (closed form, below);
4. ``f(θ + s)`` and ``∇f(θ + s)`` on the *same* batch; ``ρ = (f(θ) − f(θ + s)) / (−m(s))``;
5. accept ``θ ← θ + s`` when ``ρ ≥ η₁``; update σ from ρ;
6. store the pair ``(s, y = ∇f(θ + s) − ∇f(θ))`` — both gradients on the same batch, so ``y`` measures
   curvature, not sampling noise — if it passes the SR1 skip rule; re-choose γ and refactorise.

Faults (docs/faults.md): a non-finite loss or gradient at θ raises :class:`~ksd.optim.base.Diverged`; a
non-finite ``f(θ + s)`` rejects the step (σ grows); a pair whose ``|sᵀ(y − Bs)|`` fails the skip rule
(NaN included) is not stored; the middle matrix is kept well conditioned by dropping old pairs.

**Cubic model** (the regulariser is the shape-changing norm of the paper: a 3-norm on the eigen-coordinates
``P_∥ᵀ s``, a 2-norm on the orthogonal complement)::

    m(s) = gᵀs + ½ sᵀBs + (σ/3) (‖P_∥ᵀ s‖₃³ + ‖(I − P_∥P_∥ᵀ) s‖₂³).

It separates into k one-dimensional problems ``g_i t + ½ λ_i t² + (σ/3)|t|³`` with ``g_∥ = P_∥ᵀ g`` and one
problem along ``−g_⊥``, ``g_⊥ = g − P_∥ g_∥``, with curvature γ. Each has the closed-form global minimiser
``t = −sgn(g_i) τ(|g_i|, λ_i)``, ``τ`` the positive root of ``σ τ² + λ τ − |g_i| = 0``::

    τ = 2|g_i| / (λ + √(λ² + 4σ|g_i|))   (λ > 0),    τ = (√(λ² + 4σ|g_i|) − λ) / (2σ)   (λ ≤ 0),

the two forms being equal, each free of cancellation on its side. For λ_i < 0 and g_i = 0 (the hard case)
this gives ``t = λ_i/σ`` (sgn(0) := 1): a step of length ``−λ_i/σ`` along the negative-curvature
eigenvector, where either sign is a minimiser. Negative λ_i are fine: the cubic term bounds every
direction. Then ``s = P_∥ v − τ_⊥ g_⊥/‖g_⊥‖``, with no n × n matrix and no inner iteration. (If ``g_⊥``
is exactly zero the complement block takes no step; with γ < 0 any vector of length −γ/σ there would also
be a minimiser — that needs ``g`` exactly inside the span of the stored pairs, which floating point does
not produce when n ≫ m.)

**σ update** — the mid-points of the Cartis–Gould–Toint (2011) intervals::

    ρ > η₂: σ/2,    η₁ ≤ ρ ≤ η₂: σ (1 + γ₁)/2,    ρ < η₁ (rejected): σ (γ₁ + γ₂)/2,

then ``max(σ, sigma_min)``.

**Sources.** The paper's body text was not available. Its abstract (arxiv.org/html/2502.12298v1) fixes the
L-SR1 model, the modified ARC framework whose cubic subproblems have closed-form solutions through a
shape-changing norm, and the stochastic variant. A third-party summary (arxivlens) names the extra cost, the
eigendecomposition of the m × m matrix R M Rᵀ; a third-party catalogue page
(junaidaliop.github.io/zij/math/sr1cubicquasinewton) writes the model with ``Φ(s) = ‖Uᵀs‖₃``, the test
``ρ ≥ η₁`` and the three-way σ update above with γ₁, γ₂ > 1. The first author's public research code (not
the paper's release: github.com/aranganath/Adam-boosting ``ARCLSR1.py``, github.com/aranganath/pytorch-trpo
``RL_ARCLSR1.py``) settles the rest, and we follow it: R from the Gram matrix ΨᵀΨ (Cholesky-QR), the
eigendecomposition of R M Rᵀ, the closed form with the 3-norm on the k eigen-coordinates and the 2-norm on
the complement, ρ from the loss on the same batch, the σ update with its ½ factors, acceptance without
a line search, pairs from accepted steps only, ``y`` from the gradient at the new point on the same batch,
and the γ rule of :func:`ksd.optim.lsr1.eigen_scaling`. Under that rule M ≻ 0, so ``B ⪰ γI``: B is
indefinite exactly when γ < 0 (then the whole complement has curvature γ); ``gamma_rule: fixed`` gives an
indefinite middle matrix and negative λ_i instead.

Deliberate departures from that code: B's eigenvalues on ``P_∥`` are ``γ + λ̂`` (the code uses ``λ̂``, the
eigenvalues of R M Rᵀ, in the step and in m(s), i.e. it models ``B − γI`` on ``P_∥``); the factorisation is
rank-revealing instead of a Cholesky that fails on dependent pairs; the SR1 skip rule
``|sᵀr| ≥ ε‖s‖‖r‖``, ``r = y − Bs`` (Nocedal & Wright 2006, §6.2) and a condition-number guard on the middle
matrix keep M well defined (the code has neither); the first step is the cubic step with ``B₀ = γ₀ I``
instead of an unregularised ``−g`` step.

**Constants** (each with its source in ``conf/optimizer/arcs_lsr1.yaml``). The code's scripts use
(η₁, η₂, γ₁, γ₂, σ₀) = (0.15, 0.25, 1, 10, 100) with m = 10 and batches of 1000 on MNIST (a grid over
batches 256-2048 and m = 5-100 elsewhere). Our defaults come from sweeps on one GPU (MNIST 784-1000-500-250-30
autoencoder, 10 epochs; CIFAR-10 3c3d on 10 000 images, 20 epochs; train loss at the end, seeds 0 and 1):
(0.1, 0.75, 2, 3) — ALGORITHMS.md §7's proposal, near Cartis–Gould–Toint's — accepted 91-98 % of the steps;
at m = 20 it ended at 176.5/178.4 (autoencoder) and 1.14/1.31 (CNN) against 178.8/209.0 and 1.54/1.60 with the
code's (0.15, 0.25, 1, 10), at m = 10 (our default) at 184.8/187.7 and 1.19/1.25 (code's constants, seed 0:
185.3 and 1.57). Batches of 1000 left the autoencoder on its 207 plateau for 10 epochs whatever the
constants (as L-BFGS and SGD, not Adam); batches of 128-256 left it after 4-7 epochs. σ₀ = 1 or 100 made no
difference; storing pairs of rejected steps hurt (209 vs 185, 1.69 vs 1.57).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ksd.errors import require
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.optim.lsr1 import (
    CompactEigen,
    PairMemory,
    compact_eigendecomposition,
    eigen_scaling,
    middle_inverse,
    smallest_generalized_eigenvalue,
)
from ksd.problem import Problem


def cubic_step_length(gradient: Tensor, curvature: Tensor, sigma: float) -> Tensor:
    """Elementwise ``τ ≥ 0`` minimising ``−|g| τ + ½ λ τ² + (σ/3) τ³``, the root of ``στ² + λτ = |g|``."""
    magnitude = gradient.abs()
    root = torch.sqrt(curvature * curvature + 4 * sigma * magnitude)
    return torch.where(curvature > 0, 2 * magnitude / (curvature + root), (root - curvature) / (2 * sigma))


def solve_cubic_subproblem(
    g_parallel: Tensor, g_perp_norm: Tensor | None, eigenvalues: Tensor, gamma: float, sigma: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form minimiser of the cubic model in the shape-changing norm, in eigen-coordinates.

    Args:
        g_parallel: ``P_∥ᵀ g`` (k,).
        g_perp_norm: ``‖g_⊥‖`` (0-dim), or None when the complement of ``P_∥`` is empty (k = n).
        eigenvalues: eigenvalues ``λ_i`` of B on the columns of ``P_∥`` (k,).
        gamma: the eigenvalue of B on the complement.
        sigma: the cubic regularisation weight σ > 0.

    Returns:
        ``v = P_∥ᵀ s`` (k,), ``τ = ‖s_⊥‖`` (the complement step is ``−τ g_⊥/‖g_⊥‖``) and the model value
        ``m(s) = gᵀs + ½ sᵀBs + (σ/3)(‖v‖₃³ + τ³)`` (≤ 0, the predicted change of f).
    """
    sign = torch.where(g_parallel < 0, -1.0, 1.0).to(g_parallel.dtype)  # sgn(0) = +1: the hard case
    v = -sign * cubic_step_length(g_parallel, eigenvalues, sigma)
    model = (g_parallel * v + 0.5 * eigenvalues * v * v + sigma / 3 * v.abs() ** 3).sum()
    if g_perp_norm is None:
        return v, torch.zeros_like(model), model
    tau = cubic_step_length(g_perp_norm, torch.full_like(g_perp_norm, gamma), sigma)
    model = model - g_perp_norm * tau + 0.5 * gamma * tau * tau + sigma / 3 * tau**3
    return v, tau, model


class ARCsLSR1(Optimizer):
    step_scale_applies_to = "1 / σ (the cubic weight is divided by it)"

    @dataclass
    class Config(OptimizerConfig):
        name: str = "arcs_lsr1"
        batch_size: int | None = 256  # None: full batch (deterministic ARC); N: the stochastic variant
        history_size: int = 10  # pairs kept (m)
        sigma0: float = 1.0  # initial cubic weight σ₀
        sigma_min: float = 1e-6  # floor of σ
        eta1: float = 0.1  # accept when ρ ≥ η₁
        eta2: float = 0.75  # very successful when ρ > η₂
        gamma1: float = 2.0  # σ(1 + γ₁)/2 after a successful step
        gamma2: float = 3.0  # σ(γ₁ + γ₂)/2 after a rejected step
        gamma_rule: str = "eigen"  # eigen (authors' λ_min rule, may be negative) | fixed (γ = gamma_init)
        gamma_init: float = 1.0  # γ₀ of B₀ = γ₀ I before the first pair; γ itself under gamma_rule=fixed
        gamma_floor: float = 1e-6  # |γ| ≥ this under the eigen rule
        store_rejected: bool = False  # also learn pairs from rejected trial steps
        skip_tolerance: float = 1e-8  # SR1 skip rule: store only if |sᵀr| ≥ this · ‖s‖‖r‖, r = y − Bs
        max_condition: float = 1e8  # drop oldest pairs while cond(D + L + Lᵀ − γSᵀS) exceeds this
        rank_tolerance: float = 100.0  # drop directions of ΨᵀΨ below this · machine eps · largest eigenvalue

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("sigma0", "sigma_min", "gamma_floor", "max_condition")
            require(self.history_size >= 1, f"optimizer.history_size must be >= 1, got {self.history_size}.")
            require(0 < self.eta1 <= self.eta2 < 1,
                    f"optimizer.eta1, eta2 must satisfy 0 < eta1 <= eta2 < 1, got {self.eta1}, {self.eta2}.")
            require(1 <= self.gamma1 <= self.gamma2 and self.gamma2 > 1,
                    f"optimizer.gamma1 and gamma2 must satisfy 1 <= gamma1 <= gamma2, gamma2 > 1, "
                    f"got {self.gamma1}, {self.gamma2}.")
            require(self.gamma_rule in ("eigen", "fixed"),
                    f"optimizer.gamma_rule must be eigen or fixed, got {self.gamma_rule!r}.")
            require(self.gamma_init != 0, "optimizer.gamma_init must be non-zero.")
            require(0 <= self.skip_tolerance < 1,
                    f"optimizer.skip_tolerance must be in [0, 1), got {self.skip_tolerance}.")
            self.positive("rank_tolerance")

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        theta = problem.theta
        self.memory = PairMemory(
            problem.n_params, self.config.history_size, dtype=theta.dtype, device=theta.device
        )
        self.state.update(sigma=self.config.sigma0, gamma=self.config.gamma_init, cached=None)
        self._refresh_model()

    # ------------------------------------------------------------------ the L-SR1 model
    def _scaling(self, ss: np.ndarray, sy: np.ndarray) -> float | None:
        """γ for the stored pairs; None when the pairs cannot define it (the oldest must go)."""
        c = self.config
        if len(ss) == 0 or c.gamma_rule == "fixed":
            return c.gamma_init
        lambda_min = smallest_generalized_eigenvalue(ss, sy)
        return None if lambda_min is None else eigen_scaling(lambda_min, c.gamma_floor)

    def _refresh_model(self) -> None:
        """Choose γ, drop the oldest pairs while the middle matrix is ill-conditioned, factorise B."""
        memory = self.memory
        while True:
            ss, sy, yy = memory.blocks()
            gamma = self._scaling(ss, sy)
            if gamma is not None and (
                len(memory) == 0 or _condition(middle_inverse(ss, sy, gamma)) <= self.config.max_condition
            ):
                break
            memory.drop_oldest()
        self.state["gamma"] = gamma
        tolerance = self.config.rank_tolerance * torch.finfo(self.problem.theta.dtype).eps
        self.eigen: CompactEigen = compact_eigendecomposition(ss, sy, yy, gamma, tolerance)
        device = self.problem.device
        self._eigenvalues = torch.from_numpy(self.eigen.eigenvalues).to(device)
        self._coefficients = torch.from_numpy(memory.row_coefficients(self.eigen)).to(device)

    # ------------------------------------------------------------------ one ARC iteration
    def step(self) -> Stats:
        c, st, theta, memory = self.config, self.state, self.problem.theta, self.memory
        batch, loss, grad, full_batch = self.batch_and_gradient()
        sigma, gamma = st["sigma"] / self.step_scale, st["gamma"]
        f64 = torch.float64
        k = len(self.eigen.eigenvalues)

        # g_∥ = P_∥ᵀ g and g_⊥ = g − P_∥ g_∥ with P_∥ = rowsᵀ C
        coefficients = self._coefficients
        if k:
            g_parallel = coefficients.T @ memory.products(grad[:, None])[:, 0].to(f64)
            g_perp = grad - memory.combine(coefficients @ g_parallel[:, None])[:, 0]
        else:
            g_parallel, g_perp = grad.new_zeros(0, dtype=f64), grad
        complement = k < self.problem.n_params
        g_perp_norm = g_perp.norm().to(f64) if complement else None
        v, tau, model_value = solve_cubic_subproblem(g_parallel, g_perp_norm, self._eigenvalues, gamma, sigma)

        # s = P_∥ v − τ g_⊥/‖g_⊥‖ and B s = γ s + P_∥ (λ − γ) v
        if complement:
            step = g_perp * torch.where(g_perp_norm > 0, -tau / g_perp_norm, 0.0).to(theta.dtype)
        else:
            step = torch.zeros_like(theta)
        curvature_step = gamma * step
        if k:
            parallel = memory.combine(coefficients @ torch.stack([v, (self._eigenvalues - gamma) * v], 1))
            step += parallel[:, 0]
            curvature_step += gamma * parallel[:, 0] + parallel[:, 1]

        trial_loss, trial_grad = self.objective_and_grad(batch, theta + step)
        grad_diff = trial_grad - grad
        residual = grad_diff - curvature_step
        scalars = torch.stack([
            loss, trial_loss, model_value, step.dot(step), step.dot(grad_diff), grad_diff.dot(grad_diff),
            step.dot(residual), residual.dot(residual), grad.dot(grad),
        ]).to(f64)
        if len(memory):
            pair_products = memory.products(torch.stack([step, grad_diff], 1))
            scalars = torch.cat([scalars, pair_products.to(f64).flatten()])
        host = scalars.cpu().numpy()  # the one host synchronisation of the step
        f, f_trial, model_value, ss, sy, yy, sr, rr, gg = host[:9]
        products = host[9:].reshape(-1, 2) if len(memory) else np.zeros((2 * c.history_size, 2))

        self.check_finite("loss or gradient at the current point", f, gg)
        rho = (f - f_trial) / -model_value if model_value < 0 else -math.inf
        accepted = math.isfinite(f_trial) and rho >= c.eta1
        st["sigma"] = next_sigma(st["sigma"], rho, c)
        if accepted:
            theta.add_(step)
        sr1_defined = math.isfinite(sr) and ss > 0 and abs(sr) >= c.skip_tolerance * math.sqrt(ss * rr)
        if sr1_defined and (accepted or c.store_rejected):
            memory.append(step, grad_diff, products, (ss, sy, yy))
            self._refresh_model()
        if full_batch:
            st["cached"] = (trial_loss, trial_grad) if accepted else (loss, grad)
        lowest = min([*self.eigen.eigenvalues, st["gamma"]]) if complement else min(self.eigen.eigenvalues)
        return {
            "loss": loss, "rho": float(rho), "accepted": int(accepted), "sigma": st["sigma"],
            "gamma": st["gamma"], "pairs": len(memory), "step_norm": math.sqrt(ss), "min_eigenvalue": lowest,
            # Rayleigh quotients along the trial step: measured sᵀy/sᵀs and modelled sᵀBs/sᵀs
            "curvature": sy / ss if ss > 0 else math.nan,
            "model_curvature": (sy - sr) / ss if ss > 0 else math.nan,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.memory.load_state_dict(state_dict["memory"])
        self._refresh_model()


def next_sigma(sigma: float, rho: float, config: ARCsLSR1.Config) -> float:
    """The σ update: mid-points of the Cartis–Gould–Toint intervals, floored at ``sigma_min``."""
    if rho > config.eta2:
        sigma = 0.5 * sigma
    elif rho >= config.eta1:
        sigma = 0.5 * (1 + config.gamma1) * sigma
    else:
        sigma = 0.5 * (config.gamma1 + config.gamma2) * sigma
    return max(sigma, config.sigma_min)


def _condition(matrix: np.ndarray) -> float:
    magnitudes = np.abs(np.linalg.eigvalsh(matrix))
    return math.inf if magnitudes.min() == 0 else float(magnitudes.max() / magnitudes.min())
