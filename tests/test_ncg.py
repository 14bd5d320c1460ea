"""Nonlinear CG: linear CG's finite termination on a quadratic, scipy's CG on Rosenbrock, the β rules."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from ksd.data import DataSpec, Split, Splits
from ksd.errors import ConfigError
from ksd.losses import build_loss
from ksd.optim.ncg import NonlinearCG
from ksd.problem import Problem


def regression_problem(inputs: torch.Tensor, targets: torch.Tensor, model: nn.Module) -> Problem:
    """``mean_i ½‖model(x_i) − t_i‖²`` on the given rows (no validation rows, one test row)."""
    spec = DataSpec("q", tuple(inputs.shape[1:]), None, "q")
    splits = Splits(Split(inputs, None), Split(inputs[:0], None), Split(inputs[:1], None), spec)
    problem = Problem(model, build_loss("squared_error"), splits, autoencoder=True)
    problem.full_batch.targets = targets  # regression targets instead of reconstructing inputs
    return problem


def least_squares(n: int = 8) -> tuple[Problem, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    # columns scaled over a decade: condition number of XᵀX about 100, so steepest descent is slow
    x = torch.randn(100, n, generator=g, dtype=torch.float64) * torch.logspace(0, 1, n, dtype=torch.float64)
    t = torch.randn(100, 1, generator=g, dtype=torch.float64)
    problem = regression_problem(x, t, nn.Linear(n, 1, bias=False).double())
    return problem, torch.linalg.lstsq(x, t).solution.reshape(-1)


class Rosenbrock(nn.Module):
    """Residuals ``(1 − a, 10 (b − a²))``: half their squared norm is half the Rosenbrock function."""

    def __init__(self) -> None:
        super().__init__()
        self.point = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        a, b = self.point
        return torch.stack([1 - a, 10 * (b - a * a)]).expand(inputs.shape[0], 2)


@pytest.mark.parametrize("variant", ["polak_ribiere", "fletcher_reeves"])
def test_reaches_the_minimiser_of_a_quadratic_in_n_iterations(variant):
    """With an exact line search both variants are linear CG: at most n = 8 iterations (N&W Thm 5.2).

    ``c2 = 1e-10`` (c1 below it) makes the strong-Wolfe search exact: along a line the quadratic is the cubic
    interpolant, so the search lands on the minimiser; 1e-8 leaves room for rounding over 8 steps.
    """
    problem, solution = least_squares()
    optimizer = NonlinearCG(
        problem, NonlinearCG.Config(variant=variant, c1=1e-12, c2=1e-10, tolerance_change=1e-30)
    )
    for _ in range(8):
        optimizer.step()
    torch.testing.assert_close(problem.theta, solution, rtol=1e-8, atol=1e-8)


def test_steepest_descent_does_not_finish_in_n_iterations():
    """The same 8 iterations with every step restarted (β = 0) stay far from the minimiser, so the test
    above measures conjugacy and not the line search."""
    problem, solution = least_squares()
    config = NonlinearCG.Config(restart_every=1, c1=1e-12, c2=1e-10, tolerance_change=1e-30)
    optimizer = NonlinearCG(problem, config)
    for _ in range(8):
        optimizer.step()
    distance = (problem.theta - solution).norm() / solution.norm()
    assert distance > 1e-2, distance


def test_rosenbrock_like_scipy_cg():
    """From (−1.2, 1), Polak–Ribière+ reaches (1, 1) like scipy's CG (also PR+ with a strong-Wolfe search,
    c2 = 0.4), in an iteration count of the same order (scipy: 30 or so)."""
    x0 = [-1.2, 1.0]

    def half_rosenbrock(p):
        return 0.5 * ((1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2)

    def gradient(p):
        return [-(1 - p[0]) - 200 * p[0] * (p[1] - p[0] ** 2), 100 * (p[1] - p[0] ** 2)]

    reference = minimize(half_rosenbrock, x0, jac=gradient, method="CG", options={"gtol": 1e-8})
    assert reference.success
    problem = regression_problem(
        torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64), Rosenbrock()
    )
    optimizer = NonlinearCG(problem, NonlinearCG.Config(c2=0.4, tolerance_change=1e-30))
    iterations = 0
    while problem.loss(problem.full_batch).item() > 1e-16 and iterations < 10 * reference.nit:
        optimizer.step()
        iterations += 1
    torch.testing.assert_close(
        problem.theta, torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(problem.theta, torch.as_tensor(reference.x), atol=1e-6, rtol=0)
    assert iterations <= 2 * reference.nit, (iterations, reference.nit)


def test_polak_ribiere_plus_restarts_when_beta_would_be_negative():
    problem, _ = least_squares()
    optimizer = NonlinearCG(problem)
    optimizer.state.update(grad=torch.ones(8, dtype=torch.float64), grad_norm2=8.0)
    # gᵀ(g − g_prev) = 8·(0.5² − 0.5) < 0 → PR's β is negative, PR+ takes 0
    assert optimizer.beta(torch.full((8,), 0.5, dtype=torch.float64)) == 0.0
    # gᵀ(g − g_prev) = 8·(2² − 2) = 16 → β = 16 / 8
    assert optimizer.beta(torch.full((8,), 2.0, dtype=torch.float64)) == pytest.approx(2.0)
    fletcher = NonlinearCG(problem, NonlinearCG.Config(variant="fletcher_reeves"))
    fletcher.state.update(grad=torch.ones(8, dtype=torch.float64), grad_norm2=8.0)
    assert fletcher.beta(torch.full((8,), 0.5, dtype=torch.float64)) == pytest.approx(0.25)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"variant must be one of polak_ribiere, fletcher_reeves"):
        NonlinearCG.Config(variant="hestenes")
    with pytest.raises(ConfigError, match="c1 and c2"):
        NonlinearCG.Config(c2=1e-5)
