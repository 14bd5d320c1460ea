"""TRON (trust-region Newton-CG) against SciPy's ``trust-ncg``, its LIBLINEAR rules, and Steihaug CG alone."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import yaml
from conftest import CONF
from scipy.optimize import _trustregion_ncg
from torch import nn

from ksd.data import DataSpec, Split, Splits
from ksd.errors import ConfigError
from ksd.losses import build_loss
from ksd.optim.linalg import boundary_roots, steihaug_cg
from ksd.optim.tron import TRON
from ksd.problem import Problem

Config = TRON.Config

#: TRON's settings that make it SciPy's trust-ncg (scipy/optimize/_trustregion.py defaults and
#: _trustregion_ncg.py's CG tolerance min(0.5, √‖g‖)‖g‖), with the exact Hessian on all data, M = I.
SCIPY_TRUST_NCG = dict(
    weight_decay=0.0, curvature="hessian", num_chunks=1, radius_rule="nocedal_wright", initial_radius=1.0,
    max_radius=1000.0, eta0=0.15, cg_tolerance=0.5, cg_forcing="sqrt", max_cg_iterations=10_000,
    preconditioner=False,
)


# ---------------------------------------------------------------------------------------------- problems
class ExtendedRosenbrock(nn.Module):
    """Moré, Garbow & Hillstrom's extended Rosenbrock function as a "network" of one parameter vector x:
    outputs ``√2 r(x)`` with ``r_{2i} = 10 (x_{2i+1} − x_{2i}²)``, ``r_{2i+1} = 1 − x_{2i}``, so that the
    squared-error loss ``½‖√2 r‖²`` is ``f(x) = Σ_i 100 (x_{2i+1} − x_{2i}²)² + (1 − x_{2i})²``."""

    def __init__(self, x0: np.ndarray) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        even, odd = self.x[0::2], self.x[1::2]
        r = torch.stack([10 * (odd - even**2), 1 - even], dim=1).reshape(-1)
        return math.sqrt(2) * r.expand(len(inputs), -1)


def rosenbrock(x: np.ndarray) -> float:
    even, odd = x[0::2], x[1::2]
    return float(np.sum(100 * (odd - even**2) ** 2 + (1 - even) ** 2))


def rosenbrock_grad(x: np.ndarray) -> np.ndarray:
    even, odd = x[0::2], x[1::2]
    g = np.empty_like(x)
    g[0::2] = -400 * even * (odd - even**2) - 2 * (1 - even)
    g[1::2] = 200 * (odd - even**2)
    return g


def rosenbrock_hessp(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    even, odd = x[0::2], x[1::2]
    pe, po = p[0::2], p[1::2]
    hp = np.empty_like(x)
    hp[0::2] = (1200 * even**2 - 400 * odd + 2) * pe - 400 * even * po
    hp[1::2] = -400 * even * pe + 200 * po
    return hp


def rosenbrock_problem(x0: np.ndarray) -> Problem:
    inputs, targets = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, len(x0), dtype=torch.float64)
    splits = Splits(Split(inputs, targets), Split(inputs[:0], targets[:0]), Split(inputs, targets),
                    DataSpec("rosenbrock", (1,), None, "synthetic"))
    return Problem(ExtendedRosenbrock(x0), build_loss("squared_error"), splits, autoencoder=False)


#: L2 weight of the logistic regression (on weights and bias alike, as ``weight_decay``).
TAU = 1e-2


def logistic_data(n: int = 200, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.rand(n, generator=g, dtype=torch.float64)
    y = (torch.sigmoid(x @ w + 0.5) > noise).to(torch.float64).unsqueeze(1)
    return x, y


def logistic_problem() -> Problem:
    """``f(w, b) = (1/N) Σ softplus(z_i) − y_i z_i + τ/2 (‖w‖² + b²)``, ``z = Xw + b``: a one-layer network
    (``nn.Linear(d, 1)``) under ``sigmoid_cross_entropy``; θ = [w, b], started from w = 0, b = 0."""
    x, y = logistic_data()
    model = nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    spec = DataSpec("logistic", (x.shape[1],), None, "toy")
    splits = Splits(Split(x, y), Split(x[:0], y[:0]), Split(x, y), spec)
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=False)


def logistic_numpy():
    """The same objective, gradient and Hessian-vector product in NumPy, for SciPy."""
    x, y = (t.numpy() for t in logistic_data())
    a = np.hstack([x, np.ones((len(x), 1))])  # θ = [w, b], as nn.Linear's flattened parameters
    t = y[:, 0]

    def fun(theta):
        z = a @ theta
        return float(np.mean(np.logaddexp(0, z) - t * z) + 0.5 * TAU * theta @ theta)

    def jac(theta):
        s = 1 / (1 + np.exp(-(a @ theta)))
        return a.T @ (s - t) / len(a) + TAU * theta

    def hessp(theta, p):
        s = 1 / (1 + np.exp(-(a @ theta)))
        return a.T @ (s * (1 - s) * (a @ p)) / len(a) + TAU * p

    return fun, jac, hessp


def scipy_trust_ncg(monkeypatch, fun, jac, hessp, x0, gtol):
    """SciPy's iterates (one per iteration, accepted or not) and the trust radius each iteration used (read
    from the argument of its Steihaug subproblem's ``solve``)."""
    radii, iterates = [], []
    solve = _trustregion_ncg.CGSteihaugSubproblem.solve

    def recording_solve(self, trust_radius):
        radii.append(trust_radius)
        return solve(self, trust_radius)

    monkeypatch.setattr(_trustregion_ncg.CGSteihaugSubproblem, "solve", recording_solve)

    def callback(intermediate_result):
        iterates.append(np.copy(intermediate_result.x))

    result = scipy.optimize.minimize(
        fun, x0, method="trust-ncg", jac=jac, hessp=hessp, options={"gtol": gtol}, callback=callback
    )
    assert result.success, result.message
    return result, radii, np.array(iterates)


def run_tron(problem: Problem, steps: int, **settings) -> tuple[list[float], np.ndarray, list[dict]]:
    optimizer = TRON(problem, Config(**settings))
    radii, iterates, stats = [], [], []
    for _ in range(steps):
        s = optimizer.step()
        radii.append(s["radius"])
        iterates.append(problem.theta.detach().numpy().copy())
        stats.append(s)
    return radii, np.array(iterates), stats


# ---------------------------------------------------------------------------------------------- SciPy
def test_nocedal_wright_rule_follows_scipy_trust_ncg_on_extended_rosenbrock(monkeypatch):
    x0 = np.tile([-1.2, 1.0], 5)  # Moré, Garbow & Hillstrom's standard start, n = 10
    result, scipy_radii, scipy_iterates = scipy_trust_ncg(
        monkeypatch, rosenbrock, rosenbrock_grad, rosenbrock_hessp, x0, gtol=1e-8
    )
    radii, iterates, stats = run_tron(rosenbrock_problem(x0), len(scipy_radii), **SCIPY_TRUST_NCG)
    assert len(scipy_radii) == result.nit >= 20  # measured: 36 iterations, some of them rejected
    assert any(s["accepted"] == 0 for s in stats) and any(s["cg_boundary"] for s in stats)
    np.testing.assert_allclose(radii, scipy_radii, rtol=1e-12, atol=0)  # factors 1/4 and 2 of 1.0
    np.testing.assert_allclose(iterates, scipy_iterates, rtol=0, atol=1e-8)
    np.testing.assert_allclose(iterates[-1], np.ones(10), atol=1e-8)


def test_nocedal_wright_rule_follows_scipy_trust_ncg_on_logistic_regression(monkeypatch):
    fun, jac, hessp = logistic_numpy()
    problem = logistic_problem()
    x0 = problem.theta.detach().numpy().copy()
    result, scipy_radii, scipy_iterates = scipy_trust_ncg(monkeypatch, fun, jac, hessp, x0, gtol=1e-9)
    settings = SCIPY_TRUST_NCG | {"weight_decay": TAU}
    radii, iterates, _ = run_tron(problem, len(scipy_radii), **settings)
    assert len(scipy_radii) == result.nit >= 3
    np.testing.assert_allclose(radii, scipy_radii, rtol=1e-12, atol=0)
    np.testing.assert_allclose(iterates, scipy_iterates, rtol=0, atol=1e-8)
    # a linear model under a matching loss: the Gauss-Newton matrix is the Hessian, so ggn follows too
    ggn = settings | {"curvature": "ggn"}
    ggn_radii, ggn_iterates, _ = run_tron(logistic_problem(), len(scipy_radii), **ggn)
    assert ggn_radii == pytest.approx(scipy_radii, rel=1e-12)
    np.testing.assert_allclose(ggn_iterates, scipy_iterates, rtol=0, atol=1e-8)


#: Outer iterations within which the LIBLINEAR rules must reach the minimiser to 1e-6 (see the test).
LIBLINEAR_BOUND = 15


def test_liblinear_rules_reach_the_logistic_regression_minimiser(monkeypatch):
    """The bound: from θ₀ = 0 the minimiser is at ‖θ*‖ ≤ ‖g₀‖/τ, and the liblinear rules start at
    Δ₀ = ‖g₀‖ and multiply Δ by σ₃ = 4 after every very successful boundary step, so at most
    ⌈log₄(1/τ)⌉ = 4 iterations are spent growing the region to hold θ*; a rejected step costs one iteration
    and shrinks Δ at most to σ₁Δ, which one growth step undoes. Inside the region the iteration is an inexact
    Newton method with forcing term ξ = 0.1 (Dembo, Eisenstat & Steihaug 1982; Lin, Weng & Keerthi 2008,
    Theorem 2: locally linear with rate ξ, quadratic terms aside), so ⌈log₁₀(‖θ₀ − θ*‖_H / 10⁻⁶·λ_min)⌉
    ≈ 8 iterations reduce the error from O(1) to 10⁻⁶; 4 + 8 plus 3 spare for rejections = 15."""
    fun, jac, hessp = logistic_numpy()
    problem = logistic_problem()
    x0 = problem.theta.detach().numpy().copy()
    minimiser = scipy.optimize.minimize(
        fun, x0, method="trust-ncg", jac=jac, hessp=hessp, options={"gtol": 1e-13}
    ).x
    optimizer = TRON(problem, Config(weight_decay=TAU, num_chunks=1, max_cg_iterations=100))
    reached = None
    for iteration in range(1, LIBLINEAR_BOUND + 1):
        optimizer.step()
        if np.abs(problem.theta.detach().numpy() - minimiser).max() <= 1e-6:
            reached = iteration
            break
    assert reached is not None, f"not within 1e-6 of the minimiser after {LIBLINEAR_BOUND} iterations"
    # (measured: 8 iterations, ‖θ − θ*‖_∞ = 9·10⁻⁸)
    # and it stays there: further steps are accepted or rejected, never leave the minimiser
    for _ in range(3):
        optimizer.step()
    np.testing.assert_allclose(problem.theta.detach().numpy(), minimiser, rtol=0, atol=1e-6)


def test_liblinear_first_radius_is_the_gradient_norm_then_at_most_the_first_step():
    problem = logistic_problem()
    optimizer = TRON(problem, Config(weight_decay=TAU, num_chunks=1))
    _, grad = optimizer.objective_and_grad(problem.full_batch)
    stats = optimizer.step()
    assert stats["radius"] == pytest.approx(grad.norm().item(), rel=1e-12)  # Δ₀ = ‖g₀‖
    assert stats["cg_boundary"] and stats["step_norm"] == pytest.approx(stats["radius"], rel=1e-12)
    # very successful on the boundary: Δ₁ = σ₃ · min(Δ₀, ‖s₀‖)
    assert stats["rho"] >= 0.75
    assert optimizer.state["radius"] == pytest.approx(4 * min(stats["radius"], stats["step_norm"]), rel=1e-12)


# ---------------------------------------------------------------------------------------------- Steihaug CG
def spd(n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.5, 5.0, n, dtype=torch.float64)) @ q.T


def test_steihaug_inside_the_region_returns_the_cg_solution():
    a = spd()
    g = torch.randn(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solution = torch.linalg.solve(a, -g)
    result = steihaug_cg(lambda v: a @ v, g, radius=10 * solution.norm().item(), tolerance=1e-12)
    assert result.stop == "residual" and not result.hits_boundary and result.iterations <= 8 + 1
    torch.testing.assert_close(result.step, solution, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.residual, a @ result.step + g, rtol=0, atol=1e-10)
    expected = (g @ solution + 0.5 * solution @ a @ solution).item()
    assert result.model_change == pytest.approx(expected, rel=1e-10)
    # with a loose tolerance it stops early, still inside, at ‖r‖ ≤ ξ‖g‖
    loose = steihaug_cg(lambda v: a @ v, g, radius=10 * solution.norm().item(), tolerance=0.3)
    assert loose.stop == "residual" and loose.iterations < result.iterations
    assert (a @ loose.step + g).norm() <= 0.3 * g.norm()


def test_steihaug_on_an_indefinite_system_stops_on_the_boundary_along_negative_curvature():
    """B = diag(1, −1), g = (1, 0): the first direction −g has curvature +1 and the CG step p₁ = (−1, 0) lies
    inside Δ = 2; the next direction d is ±e₂ with dᵀBd < 0: CG must go along it to the boundary."""
    b = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    g = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    radius = 2.0
    result = steihaug_cg(lambda v: b @ v, g, radius, tolerance=1e-10)
    assert result.stop == "negative_curvature" and result.hits_boundary
    assert result.step.norm().item() == pytest.approx(radius, rel=1e-12)
    assert result.step[1].abs().item() > 1.0  # moved along the negative-curvature direction e₂
    assert result.model_change < -0.5  # below q at the CG iterate inside (≈ −0.5)
    # a negative definite B: the very first direction has negative curvature; the boundary point along −g
    result = steihaug_cg(lambda v: -v, g, radius, tolerance=1e-10)
    assert result.stop == "negative_curvature" and result.iterations == 1
    torch.testing.assert_close(result.step, -radius * g / g.norm(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("metric", [None, "diagonal"])
def test_boundary_point_solves_the_norm_equation(metric):
    gen = torch.Generator().manual_seed(2)
    m = None if metric is None else torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    p = 0.1 * torch.randn(5, generator=gen, dtype=torch.float64)
    d = torch.randn(5, generator=gen, dtype=torch.float64)
    radius = 1.5

    def norm(v):
        return math.sqrt(v.dot(v if m is None else m * v).item())

    for direction in (d, -d):
        minus, plus = boundary_roots(p, direction, radius, m)
        assert minus <= 0 <= plus
        assert norm(p + plus * direction) == pytest.approx(radius, rel=1e-13)
        assert norm(p + minus * direction) == pytest.approx(radius, rel=1e-13)
    # and Steihaug's boundary stop lands there: an SPD system whose solution lies outside the region
    a = spd(5)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    outside = 0.5 * torch.linalg.solve(a, -g).norm().item()
    result = steihaug_cg(lambda v: a @ v, g, outside, tolerance=1e-12, preconditioner=m)
    assert result.stop == "boundary"
    assert norm(result.step) == pytest.approx(outside, rel=1e-12)
    torch.testing.assert_close(result.residual, a @ result.step + g, rtol=0, atol=1e-10)


def test_config_file_lists_every_field_and_selects_sparse_init():
    listed = yaml.safe_load((CONF / "optimizer" / "tron.yaml").read_text())
    defaults = listed.pop("defaults")
    assert set(listed) == {f.name for f in dataclasses.fields(Config)}
    assert {"/init@_global_": "sparse"} in defaults
    assert Config(**listed) == Config()


def test_step_scale_multiplies_the_radius_a_step_uses():
    """``run.on_divergence=rewind`` halves ``step_scale``: the first step's radius halves, and the stored
    radius stays in unscaled units (the scaled one divided back)."""
    first = []
    for scale in (1.0, 0.5):
        optimizer = TRON(logistic_problem(), Config(weight_decay=TAU, num_chunks=1))
        optimizer.step_scale = scale
        stats = optimizer.step()
        first.append(stats["radius"])
        assert optimizer.state["radius"] == pytest.approx(4 * stats["radius"] / scale, rel=1e-12)
    assert first[1] == pytest.approx(0.5 * first[0], rel=1e-12)


@pytest.mark.parametrize(
    ("field", "value"),
    [("eta0", 0.3), ("eta2", 1.0), ("sigma1", 0.6), ("sigma3", 1.0), ("initial_radius", 0.0),
     ("max_radius", -1.0), ("cg_tolerance", 0.0), ("num_chunks", 0), ("radius_rule", "more"),
     ("curvature", "fisher"), ("cg_forcing", "quadratic")],
)
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: value})
