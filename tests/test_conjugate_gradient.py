"""Preconditioned conjugate gradient of HF (Martens 2010) on small dense systems, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from ksd.optim.linalg import conjugate_gradient


def spd_system(n: int, condition: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random SPD matrix with eigenvalues log-spaced in [1, condition] and a random right-hand side."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return (q * eigenvalues) @ q.T, torch.randn(n, generator=g, dtype=torch.float64)


def quadratic(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return (0.5 * x @ a @ x - b @ x).item()


@pytest.mark.parametrize("preconditioned", [False, True])
def test_decreases_the_quadratic_monotonically_and_reaches_the_solution(preconditioned):
    a, b = spd_system(30, 1e3)
    diagonal = a.diagonal().clone() if preconditioned else None
    x0 = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = conjugate_gradient(lambda v: a @ v, b, x0, preconditioner=diagonal, max_iterations=200,
                                min_iterations=30, tolerance=1e-12)
    values = torch.tensor(result.values)
    assert values[0] == pytest.approx(quadratic(a, b, x0), rel=1e-12)
    assert (values.diff() <= 1e-12 * values.abs().max()).all()
    for x, i in zip(result.iterates, result.iterations):
        assert result.values[i] == pytest.approx(quadratic(a, b, x), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(result.iterates[-1], torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    assert result.iterations[-1] >= 30


def test_saved_iterates_at_martens_schedule_plus_the_last():
    a, b = spd_system(40, 1e4)
    result = conjugate_gradient(lambda v: a @ v, b, max_iterations=30, tolerance=0.0)
    assert result.stop == "max_iterations"
    assert result.iterations == [5, 7, 9, 11, 15, 19, 25, 30]  # ceil(5·1.3^j) < 30, then the last
    assert len(result.values) == 31
    # a run ending on a save point stores it once
    ending_on_a_save = conjugate_gradient(lambda v: a @ v, b, max_iterations=25, tolerance=0.0)
    assert ending_on_a_save.iterations[-2:] == [19, 25]


def test_relative_progress_rule_stops_at_the_first_iteration_it_holds():
    a, b = spd_system(300, 1e4, seed=2)  # CG needs ~100 iterations to plateau
    tolerance = 5e-4
    result = conjugate_gradient(lambda v: a @ v, b, max_iterations=300, tolerance=tolerance)
    assert result.stop == "progress"
    q = result.values
    last = result.iterations[-1]

    def holds(i: int) -> bool:
        k = max(10, math.ceil(0.1 * i))
        return i > k and q[i] < 0 and (q[i] - q[i - k]) / q[i] < k * tolerance

    assert 10 < last < 300
    assert holds(last) and not any(holds(i) for i in range(1, last))


def test_minimum_iterations_override_the_progress_rule():
    a, b = spd_system(300, 1e4, seed=2)
    early = conjugate_gradient(lambda v: a @ v, b, max_iterations=300)
    minimum = early.iterations[-1] + 20
    later = conjugate_gradient(lambda v: a @ v, b, max_iterations=300, min_iterations=minimum)
    assert later.iterations[-1] == early.iterations[-1] + 20
    assert later.values[-1] < early.values[-1]


def test_bails_out_on_non_positive_curvature():
    a, b = spd_system(10, 10.0)
    a[0, 0] = -100.0  # indefinite
    b = torch.zeros(10, dtype=torch.float64)
    b[0] = 1.0  # the first direction is e_0, with curvature −100
    result = conjugate_gradient(lambda v: a @ v, b)
    assert result.stop == "non_positive_curvature"
    assert result.iterations == [0]
    assert torch.equal(result.iterates[0], torch.zeros(10, dtype=torch.float64))
