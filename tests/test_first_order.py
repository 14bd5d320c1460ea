"""The first-order baselines beside hand-written updates: the K-BFGS code's Adam and RMSprop, AdaGrad."""

from __future__ import annotations

import pytest
import torch
from test_kbfgs import mlp_problem

from ksd.errors import ConfigError
from ksd.optim.first_order import AdaGrad, Adam, RMSprop


def test_adam_kbfgs_variant_matches_the_authors_update():
    """Adam of the K-BFGS code: v accumulates the squared bias-corrected momentum (two steps by hand)."""
    problem = mlp_problem()
    config = Adam.Config(batch_size=300, lr=0.01, beta2=0.9, eps=1e-4, weight_decay=1e-5, kbfgs_variant=True)
    opt = Adam(problem, config)
    theta, m, v = problem.theta.clone(), torch.zeros_like(problem.theta), torch.zeros_like(problem.theta)
    for t in (1, 2):
        _, g = problem.loss_and_grad(problem.full_batch, theta)
        g = g + 1e-5 * theta
        m = 0.9 * m + 0.1 * g
        m_hat = m / (1 - 0.9**t)
        v = 0.9 * v + 0.1 * m_hat**2
        theta = theta - 0.01 * m_hat / ((v / (1 - 0.9**t)).sqrt() + 1e-4)
        opt.step()
    torch.testing.assert_close(problem.theta, theta)


def kbfgs_rmsprop(problem, batch_size: int) -> RMSprop:
    config = RMSprop.Config(
        batch_size=batch_size,
        lr=0.01,
        alpha=0.9,
        eps=1e-4,
        momentum=0.9,
        weight_decay=1e-5,
        kbfgs_variant=True,
    )
    return RMSprop(problem, config)


def test_rmsprop_kbfgs_variant_matches_the_authors_update():
    """RMSprop of the K-BFGS code: m ← 0.9 m + 0.1 g, v ← 0.9 v + 0.1 m², no bias correction (two steps
    by hand; with one batch of everything their initial data pass is skipped, so v starts at 0)."""
    problem = mlp_problem()
    opt = kbfgs_rmsprop(problem, 300)
    theta, m, v = problem.theta.clone(), torch.zeros_like(problem.theta), torch.zeros_like(problem.theta)
    for _ in range(2):
        _, g = problem.loss_and_grad(problem.full_batch, theta)
        g = g + 1e-5 * theta
        m = 0.9 * m + 0.1 * g
        v = 0.9 * v + 0.1 * m**2
        theta = theta - 0.01 * m / (v.sqrt() + 1e-4)
        opt.step()
    torch.testing.assert_close(problem.theta, theta)


def test_rmsprop_kbfgs_variant_starts_from_the_mean_squared_gradient_of_a_data_pass():
    """Before step 0, v = mean over the full batches of 128 (in file order; the last 44 of 300 are left
    out, as in the authors' pass) of (g + τθ)²."""
    problem = mlp_problem()
    theta = problem.theta.clone()
    opt = kbfgs_rmsprop(problem, 128)
    opt.step()
    squares = []
    for start in (0, 128):
        _, g = problem.loss_and_grad(problem.batch(problem.splits.train, slice(start, start + 128)), theta)
        squares.append((g + 1e-5 * theta) ** 2)
    params = list(problem.model.parameters())
    # after one step: v₁ = 0.9 v₀ + 0.1 m₁², m₁ = 0.1 g₁ (g₁ on the step's own batch)
    v1 = torch.cat([opt.torch_optimizer.state[p]["v"].reshape(-1) for p in params])
    m1 = torch.cat([opt.torch_optimizer.state[p]["m"].reshape(-1) for p in params])
    torch.testing.assert_close(v1, 0.9 * torch.stack(squares).mean(0) + 0.1 * m1**2)


def test_adagrad_accumulates_squared_gradients():
    """θ₂ = θ₁ − lr g₁/(√(g₀² + g₁²) + ε) after θ₁ = θ₀ − lr g₀/(|g₀| + ε), on the full batch."""
    problem = mlp_problem()
    opt = AdaGrad(problem, AdaGrad.Config(batch_size=300, lr=0.05))
    theta, accumulator = problem.theta.clone(), torch.zeros_like(problem.theta)
    for _ in range(2):
        _, g = problem.loss_and_grad(problem.full_batch, theta)
        accumulator += g**2
        theta = theta - 0.05 * g / (accumulator.sqrt() + 1e-10)
        opt.step()
    torch.testing.assert_close(problem.theta, theta)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"optimizer\.alpha must be in"):
        RMSprop.Config(alpha=1.0)
    with pytest.raises(ConfigError, match="centered is not part"):
        RMSprop.Config(kbfgs_variant=True, centered=True)
    with pytest.raises(ConfigError, match=r"optimizer\.lr_decay must be >= 0"):
        AdaGrad.Config(lr_decay=-1.0)
