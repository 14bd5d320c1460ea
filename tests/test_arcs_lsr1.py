"""ARCs-LSR1 against explicit computations: the dense SR1 recursion, dense eigenvalues, the cubic model
minimised by scipy, the σ rules on a real trajectory, and convergence to known minimisers (Rosenbrock,
logistic regression)."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
import yaml
from conftest import CONF, compose_config
from scipy.optimize import minimize
from torch import nn

from ksd.data import DataSpec, Split, Splits
from ksd.errors import ConfigError
from ksd.losses import build_loss
from ksd.optim.arcs_lsr1 import ARCsLSR1, next_sigma, solve_cubic_subproblem
from ksd.optim.lsr1 import PairMemory, compact_eigendecomposition, middle_inverse
from ksd.problem import Problem
from ksd.runner import execute

# ---------------------------------------------------------------------------------------------- helpers


def dense_sr1(steps: np.ndarray, grad_diffs: np.ndarray, gamma: float) -> np.ndarray:
    """The SR1 recursion B ← B + r rᵀ / (rᵀ s), r = y − B s, from B₀ = γ I over the pairs (columns, oldest
    first)."""
    b = gamma * np.eye(steps.shape[0])
    for s, y in zip(steps.T, grad_diffs.T):
        r = y - b @ s
        b = b + np.outer(r, r) / (r @ s)
    return b


def random_pairs(n: int, m: int, definite: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps and gradient differences y = H s (+ a little non-quadratic noise), H definite or indefinite."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = rng.uniform(0.5, 3.0, n) * (1 if definite else rng.choice([-1.0, 1.0], n))
    if not definite:
        spectrum[0] = -abs(spectrum[0])
    h = (q * spectrum) @ q.T
    s = rng.standard_normal((n, m))
    return s, h @ s + 0.05 * rng.standard_normal((n, m))


def filled_memory(steps: np.ndarray, grad_diffs: np.ndarray, capacity: int) -> PairMemory:
    """A PairMemory holding the pairs, its Gram matrix built from device products as the optimizer does."""
    memory = PairMemory(steps.shape[0], capacity, dtype=torch.float64, device=torch.device("cpu"))
    for s, y in zip(torch.from_numpy(steps.T), torch.from_numpy(grad_diffs.T)):
        products = memory.products(torch.stack([s, y], 1)).numpy()
        memory.append(s, y, products, (s @ s, s @ y, y @ y))
    return memory


def parallel_basis(memory: PairMemory, gamma: float, rank_tolerance: float = 1e-12):
    """P_∥ (dense, n × k) and B's eigenvalues on it, through the optimizer's compact route."""
    eigen = compact_eigendecomposition(*memory.blocks(), gamma, rank_tolerance)
    coefficients = torch.from_numpy(memory.row_coefficients(eigen))
    return memory.combine(coefficients).numpy(), eigen.eigenvalues


def shape_changing_model(b: np.ndarray, p_par: np.ndarray, g: np.ndarray, sigma: float):
    """m(s) = gᵀs + ½ sᵀBs + (σ/3)(‖P_∥ᵀs‖₃³ + ‖(I − P_∥P_∥ᵀ)s‖₂³) and its gradient, densely."""

    def value_and_grad(s):
        v = p_par.T @ s
        perp = s - p_par @ v
        norm = np.linalg.norm(perp)
        value = g @ s + 0.5 * s @ b @ s + sigma / 3 * (np.sum(np.abs(v) ** 3) + norm**3)
        grad = g + b @ s + sigma * (p_par @ (np.abs(v) * v) + norm * perp)
        return value, grad

    return value_and_grad


def closed_form_step(p_par, eigenvalues, gamma, g, sigma) -> np.ndarray:
    """s = P_∥ v − τ g_⊥/‖g_⊥‖ from :func:`solve_cubic_subproblem`."""
    g_par = p_par.T @ g
    g_perp = g - p_par @ g_par
    norm = np.linalg.norm(g_perp)
    v, tau, _ = solve_cubic_subproblem(
        torch.from_numpy(g_par), torch.tensor(norm), torch.from_numpy(eigenvalues), gamma, sigma
    )
    return p_par @ v.numpy() - float(tau) * g_perp / norm


def scipy_minimum(model, n: int, starts: int, seed: int) -> np.ndarray:
    """The best local minimiser of ``model`` found by BFGS from many random starts."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        result = minimize(model, rng.standard_normal(n) * 2, jac=True, method="BFGS",
                          options={"gtol": 1e-13, "maxiter": 10_000})
        if best is None or result.fun < best.fun:
            best = result
    return best.x


class Rosenbrock(nn.Module):
    """Outputs the residuals (10 (x₂ − x₁²), 1 − x₁): with ½‖·‖² the loss is half the Rosenbrock function."""

    def __init__(self, start: tuple[float, float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.x
        return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]]).expand(inputs.shape[0], 2)


def rosenbrock_problem(start=(-1.2, 1.0)) -> Problem:
    x = torch.zeros(1, 1, dtype=torch.float64)
    spec = DataSpec("rosenbrock", (1,), None, "toy")
    splits = Splits(Split(x, None), Split(x[:0], None), Split(x, None), spec)
    problem = Problem(Rosenbrock(start), build_loss("squared_error"), splits, autoencoder=True)
    problem.full_batch.targets = torch.zeros(1, 2, dtype=torch.float64)
    return problem


def logistic_problem(n: int = 300, d: int = 5, classes: int = 3) -> Problem:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, classes, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=2 * x @ w).sample()
    torch.manual_seed(0)
    model = nn.Linear(d, classes).double()
    spec = DataSpec("toy", (d,), classes, "toy")
    splits = Splits(Split(x, y), Split(x[:0], y[:0]), Split(x[:10], y[:10]), spec)
    return Problem(model, build_loss("softmax_cross_entropy"), splits, autoencoder=False, seed=0)


# ---------------------------------------------------------------------------------------------- compact form


@pytest.mark.parametrize("definite", [True, False])
def test_compact_form_equals_dense_sr1_recursion(definite):
    """Seven pairs through a memory of five (the ring wraps): γI + ΨMΨᵀ and γI + P_∥Λ̂P_∥ᵀ equal the
    recursion over the last five pairs. Float64 throughout; the recursion's denominators are O(1), so 1e-9
    is rounding."""
    steps, grad_diffs = random_pairs(n=9, m=7, definite=definite, seed=1)
    memory = filled_memory(steps, grad_diffs, capacity=5)
    s, y = steps[:, 2:], grad_diffs[:, 2:]
    ss, sy, yy = memory.blocks()
    np.testing.assert_allclose(ss, s.T @ s, rtol=1e-12)
    np.testing.assert_allclose(sy, s.T @ y, rtol=1e-12)
    np.testing.assert_allclose(yy, y.T @ y, rtol=1e-12)
    gamma = 0.7
    expected = dense_sr1(s, y, gamma)
    psi = y - gamma * s
    compact = gamma * np.eye(9) + psi @ np.linalg.solve(middle_inverse(ss, sy, gamma), psi.T)
    np.testing.assert_allclose(compact, expected, rtol=1e-9, atol=1e-9)
    p_par, eigenvalues = parallel_basis(memory, gamma)
    np.testing.assert_allclose(p_par.T @ p_par, np.eye(p_par.shape[1]), atol=1e-10)
    from_eigen = gamma * np.eye(9) + (p_par * (eigenvalues - gamma)) @ p_par.T
    np.testing.assert_allclose(from_eigen, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("definite", "gamma"), [(True, 0.4), (False, 0.4), (False, -0.8)])
def test_eigenvalues_from_the_qr_route_equal_dense_eigvalsh(definite, gamma):
    """k eigenvalues from the m × m problem plus γ with multiplicity n − k are the spectrum of the dense B."""
    steps, grad_diffs = random_pairs(n=10, m=4, definite=definite, seed=2)
    memory = filled_memory(steps, grad_diffs, capacity=4)
    _, eigenvalues = parallel_basis(memory, gamma)
    assert len(eigenvalues) == 4
    spectrum = np.sort(np.concatenate([eigenvalues, np.full(10 - len(eigenvalues), gamma)]))
    dense = np.linalg.eigvalsh(dense_sr1(steps, grad_diffs, gamma))
    np.testing.assert_allclose(spectrum, dense, rtol=1e-9, atol=1e-9)
    assert (dense.min() < 0) == (not definite or gamma < 0)


def test_dependent_columns_of_psi_are_dropped_not_fatal():
    """A pair repeated (scaled) makes ΨᵀΨ singular: the rank-revealing factor keeps a rank-2 basis and B still
    equals the three-pair recursion (whose update is rank 2 as well)."""
    steps, grad_diffs = random_pairs(n=6, m=2, definite=True, seed=3)
    steps = np.concatenate([steps, steps[:, :1] * 2], 1)
    grad_diffs = np.concatenate([grad_diffs, grad_diffs[:, :1] * 2], 1)
    memory = filled_memory(steps, grad_diffs, capacity=3)
    gamma = 0.5
    p_par, eigenvalues = parallel_basis(memory, gamma, rank_tolerance=1e-10)
    assert p_par.shape[1] == 2
    expected = dense_sr1(steps, grad_diffs, gamma)
    from_eigen = gamma * np.eye(6) + (p_par * (eigenvalues - gamma)) @ p_par.T
    np.testing.assert_allclose(from_eigen, expected, atol=1e-8)


# ---------------------------------------------------------------------------------------------- subproblem


@pytest.mark.parametrize(("definite", "gamma"), [(True, 0.5), (False, 0.5), (False, -0.3)])
def test_closed_form_step_is_the_global_minimiser_of_the_cubic_model(definite, gamma):
    """scipy BFGS from 30 random starts on the dense model finds no lower point, and its best point is ours
    to 1e-6 relative (the minimiser is unique for generic g; BFGS with gtol 1e-13 resolves it to ~1e-9)."""
    n, sigma = 7, 0.8
    steps, grad_diffs = random_pairs(n=n, m=3, definite=definite, seed=5)
    memory = filled_memory(steps, grad_diffs, capacity=3)
    p_par, eigenvalues = parallel_basis(memory, gamma)
    if not definite:
        assert eigenvalues.min() < 0  # negative curvature inside span(P_∥)
    b = dense_sr1(steps, grad_diffs, gamma)
    g = np.random.default_rng(6).standard_normal(n)
    model = shape_changing_model(b, p_par, g, sigma)
    ours = closed_form_step(p_par, eigenvalues, gamma, g, sigma)
    theirs = scipy_minimum(model, n, starts=30, seed=7)
    assert model(ours)[0] <= model(theirs)[0] + 1e-12
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6 * np.linalg.norm(ours))
    # the model value reported by the solver is m(s)
    g_par = p_par.T @ g
    perp_norm = torch.tensor(np.linalg.norm(g - p_par @ g_par))
    _, _, value = solve_cubic_subproblem(torch.from_numpy(g_par), perp_norm, torch.from_numpy(eigenvalues),
                                         gamma, sigma)
    assert float(value) == pytest.approx(model(ours)[0], rel=1e-12)


@pytest.mark.parametrize("curvature", [2.0, 0.0, -1.5])
@pytest.mark.parametrize("gradient", [0.7, -0.3, 1e-9, 0.0])
def test_one_dimensional_minimiser_including_the_hard_case(gradient, curvature):
    """g t + ½ λ t² + (σ/3)|t|³ against a fine grid refined by scipy; g = 0, λ < 0 is the hard case,
    |t| = −λ/σ."""
    sigma = 0.6
    v, _, value = solve_cubic_subproblem(torch.tensor([gradient], dtype=torch.float64), None,
                                         torch.tensor([curvature], dtype=torch.float64), 0.0, sigma)

    def phi(t):
        return gradient * t + 0.5 * curvature * t * t + sigma / 3 * abs(t) ** 3

    grid = np.linspace(-10, 10, 200_001)
    start = grid[np.argmin(phi(grid))]
    options = {"xatol": 1e-13, "fatol": 1e-16}
    best = minimize(lambda t: phi(t[0]), [start], method="Nelder-Mead", options=options).x[0]
    assert float(value) == pytest.approx(phi(best), abs=1e-12)
    assert abs(float(v[0])) == pytest.approx(abs(best), rel=1e-6, abs=1e-9)
    if gradient == 0 and curvature < 0:
        assert abs(float(v[0])) == pytest.approx(-curvature / sigma, rel=1e-12)


# ---------------------------------------------------------------------------------------------- ARC loop


def test_sigma_update_rule():
    c = ARCsLSR1.Config(eta1=0.1, eta2=0.75, gamma1=2.0, gamma2=3.0, sigma_min=1e-3)
    assert next_sigma(4.0, 0.9, c) == 2.0  # very successful: σ/2
    assert next_sigma(4.0, 0.5, c) == 6.0  # successful: σ(1 + γ₁)/2
    assert next_sigma(4.0, 0.0, c) == 10.0  # rejected: σ(γ₁ + γ₂)/2
    assert next_sigma(4.0, -np.inf, c) == 10.0
    assert next_sigma(1.5e-3, 0.9, c) == 1e-3  # floor


def test_sigma_rises_after_rejections_and_falls_after_very_successful_steps_on_rosenbrock():
    """On the whole trajectory: a rejected step leaves θ unchanged and multiplies σ by (γ₁ + γ₂)/2, an
    accepted one moves θ by exactly the trial step, and ρ > η₂ halves σ. Both branches must occur."""
    problem = rosenbrock_problem()
    config = ARCsLSR1.Config(batch_size=None, history_size=3, sigma0=1e-3)
    optimizer = ARCsLSR1(problem, config)
    seen = set()
    for _ in range(60):
        before, sigma = problem.theta.clone(), optimizer.state["sigma"]
        stats = optimizer.step()
        if stats["accepted"]:
            assert not torch.equal(problem.theta, before)
            assert stats["step_norm"] == pytest.approx(float((problem.theta - before).norm()), rel=1e-12)
        else:
            assert torch.equal(problem.theta, before)
            assert stats["sigma"] == pytest.approx(sigma * (config.gamma1 + config.gamma2) / 2)
            seen.add("rejected")
        if stats["rho"] > config.eta2:
            assert stats["sigma"] == pytest.approx(max(sigma / 2, config.sigma_min))
            seen.add("very successful")
    assert seen == {"rejected", "very successful"}


def test_converges_on_rosenbrock():
    """From the classical start (−1.2, 1), full batch, to the minimiser (1, 1)."""
    problem = rosenbrock_problem()
    optimizer = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=None, history_size=5))
    for _ in range(400):
        optimizer.step()
    torch.testing.assert_close(problem.theta, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def reference_logistic_minimum(problem: Problem, weight_decay: float) -> float:
    """The minimum of the (strictly convex, L2-regularised) loss by scipy L-BFGS-B on the same objective."""
    batch = problem.full_batch

    def objective(theta):
        t = torch.from_numpy(theta)
        loss, grad = problem.loss_and_grad(batch, t)
        return float(loss) + 0.5 * weight_decay * theta @ theta, (grad + weight_decay * t).numpy()

    result = minimize(objective, np.zeros(problem.n_params), jac=True, method="L-BFGS-B",
                      options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10_000})
    return result.fun


def test_converges_on_logistic_regression_full_batch():
    weight_decay = 1e-2
    problem = logistic_problem()
    optimum = reference_logistic_minimum(problem, weight_decay)
    optimizer = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=None, history_size=5, weight_decay=weight_decay))
    for _ in range(150):
        stats = optimizer.step()
    final = float(problem.loss(problem.full_batch)) + 0.5 * weight_decay * float(problem.theta.square().sum())
    assert final == pytest.approx(optimum, rel=1e-8)
    assert stats["pairs"] >= 1


def test_minibatch_variant_learns_and_takes_both_gradients_on_one_batch():
    problem = logistic_problem()
    optimizer = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=50, history_size=5))
    before = float(problem.loss(problem.full_batch))
    for _ in range(60):
        optimizer.step()
    assert float(problem.loss(problem.full_batch)) < 0.6 * before
    # 60 steps × (gradient at θ + gradient at θ + s), each on the same 50 examples
    assert problem.counts.gradient == 60 * 2 * 50


@pytest.mark.parametrize("gamma_rule", ["fixed", "eigen"])
def test_step_taken_by_the_optimizer_equals_the_dense_closed_form(gamma_rule):
    """After a few steps, rebuild B densely from the stored pairs by the recursion, its P_∥ by numpy eigh, and
    the minimiser of the shape-changing model by the per-eigenvector formulas: the next step moves θ by
    exactly that."""
    problem = logistic_problem()
    optimizer = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=None, history_size=4, gamma_rule=gamma_rule,
                                                  gamma_init=0.3, sigma0=0.5))
    checked = 0
    for _ in range(12):
        memory, gamma, sigma = optimizer.memory, optimizer.state["gamma"], optimizer.state["sigma"]
        slots = memory.slots
        s = memory.vectors[0, slots].T.numpy()
        y = memory.vectors[1, slots].T.numpy()
        b = dense_sr1(s, y, gamma) if slots else gamma * np.eye(problem.n_params)
        g = (problem.loss_and_grad(problem.full_batch)[1]).numpy()
        eigenvalues, vectors = np.linalg.eigh(b)
        distinct = np.abs(eigenvalues - gamma) > 1e-8
        p_par, lam = vectors[:, distinct], eigenvalues[distinct]
        expected = closed_form_step(p_par, lam, gamma, g, sigma)
        before = problem.theta.clone()
        stats = optimizer.step()
        # the residual r = y − Bs of the SR1 skip rule uses the same B: sᵀBs/sᵀs = sy/ss − sᵀr/sᵀs
        assert stats["model_curvature"] == pytest.approx(expected @ b @ expected / (expected @ expected),
                                                         rel=1e-7)
        if stats["accepted"]:
            np.testing.assert_allclose((problem.theta - before).numpy(), expected, rtol=1e-7,
                                       atol=1e-9 * np.linalg.norm(expected))
            checked += 1
    assert checked >= 6


def test_state_dict_resumes_the_same_trajectory():
    problem = logistic_problem()
    optimizer = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=None, history_size=3))
    for _ in range(5):
        optimizer.step()
    saved, theta = optimizer.state_dict(), problem.theta.clone()
    expected = [optimizer.step()["rho"] for _ in range(3)]
    problem.theta.copy_(theta)
    resumed = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=None, history_size=3))
    resumed.load_state_dict(saved)
    assert [resumed.step()["rho"] for _ in range(3)] == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------------------------------------- configuration


def test_yaml_lists_every_config_field():
    with open(CONF / "optimizer" / "arcs_lsr1.yaml") as f:
        values = yaml.safe_load(f)
    fields = {f.name: f.default for f in dataclasses.fields(ARCsLSR1.Config)}
    assert set(values) == set(fields)
    assert values == fields  # the yaml defaults are the dataclass defaults


@pytest.mark.parametrize("override", [{"eta1": 0.5, "eta2": 0.2}, {"gamma2": 1.0}, {"gamma_rule": "bb"},
                                      {"sigma0": 0.0}, {"history_size": 0}])
def test_invalid_settings_are_refused(override):
    with pytest.raises(ConfigError):
        ARCsLSR1.Config(**override)


@pytest.mark.slow  # real-data learning; test_minibatch_variant_learns_... and the unit tests stay fast
def test_ksd_run_trains_an_mnist_autoencoder(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("KSD_DATA", str(data_root))
    cfg = compose_config(
        "optimizer=arcs_lsr1", "model=autoencoder", "dataset=mnist", "dataset.train_size=1000",
        "dataset.test_size=200", "model.widths=[64,16]", "optimizer.batch_size=500", "run.max_steps=30",
        "run.eval_every=15", "run.max_seconds=null", "run.max_epochs=null",
    )
    summary = execute(cfg, tmp_path, progress=False)
    assert summary["status"] == "completed"
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["train_loss"]) < 0.7 * float(rows[0]["train_loss"])
    assert {"rho", "sigma", "gamma", "pairs"} <= set(rows[-1])
