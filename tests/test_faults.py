"""Numerical faults injected into every optimizer (docs/faults.md).

Each fault is either absorbed by the method's own safeguard (checked against what that safeguard must
leave behind: θ unchanged, a pair not stored, a basis cut short) or ends the run as ``diverged`` with
the reason, never as an unhandled exception.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_config
from torch import nn

import ksd.optim.hf
import ksd.optim.ksd
import ksd.optim.tron
from ksd.config import RunConfig
from ksd.curvature import ggn_operator
from ksd.data import DataSpec, Split, Splits
from ksd.engine import RunOutcome, Trainer
from ksd.losses import build_loss
from ksd.optim import OPTIMIZERS, optimizer_class
from ksd.optim.arcs_lsr1 import ARCsLSR1
from ksd.optim.base import Optimizer
from ksd.optim.hf import HessianFree
from ksd.optim.kbfgs import KBFGS, KBFGSL, accept_pair, bfgs_inverse_update_, double_damping
from ksd.optim.ksd import KrylovSubspaceDescent
from ksd.optim.linalg import LineSearchResult, strong_wolfe
from ksd.problem import Problem
from ksd.runner import execute

#: Settings that keep every optimizer's steps cheap on the toy problem (applied where the field exists).
SMALL = {
    "batch_size": 32,
    "krylov_dim": 4,
    "curvature_size": 32,
    "bfgs_size": 32,
    "bfgs_max_iterations": 5,
    "max_cg_iterations": 10,
    "history_size": 5,
}

#: Optimizers that read host scalars in every step and therefore stop at the faulty step itself; the
#: others never synchronise inside a step and leave a non-finite loss to the engine's next evaluation.
CHECKED_AT_ONCE = {"lbfgs", "ncg", "hf", "ksd", "arcs_lsr1", "tron"}


class Fault(nn.Module):
    """Identity until armed. ``"output"``: NaN outputs (so NaN loss and gradient); ``"gradient"``: finite
    outputs whose gradient is NaN (a backward hook), the fault a loss check alone cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "output":
            return x * math.nan
        if self.mode == "gradient" and x.requires_grad:
            x = x.clone()
            x.register_hook(lambda g: torch.full_like(g, math.nan))
        return x


def toy_problem() -> tuple[Problem, Fault]:
    """16-8-16 sigmoid autoencoder on 128 random 4×4 images, with a :class:`Fault` after the last layer."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 1, 4, 4, generator=g)
    torch.manual_seed(0)
    fault = Fault()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 16), fault)
    splits = Splits(
        Split(x, None), Split(x[:0], None), Split(x[:32], None), DataSpec("toy", (1, 4, 4), None, "toy")
    )
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=True, seed=0), fault


def make(name: str, **overrides) -> tuple[Problem, Optimizer, Fault]:
    problem, fault = toy_problem()
    cls = optimizer_class(name)
    fields = cls.Config.__dataclass_fields__
    settings = {k: v for k, v in SMALL.items() if k in fields} | overrides
    return problem, cls(problem, cls.Config(**settings)), fault


def train(problem: Problem, optimizer: Optimizer, steps: int = 12) -> RunOutcome:
    cfg = RunConfig(
        max_steps=steps, max_epochs=None, eval_every=2, eval_train_size=None, plot=False, checkpoint_every=0
    )
    return Trainer(problem, optimizer, cfg, on_row=lambda row: None).run()


def least_squares_problem(x: torch.Tensor, targets: torch.Tensor) -> Problem:
    """Linear model under ½‖Wx + b − t‖² (mean over examples), float64: its Gauss-Newton matrix is the
    Hessian, ``G = mean ā āᵀ ⊗ I`` with ``ā = [x; 1]``."""
    torch.manual_seed(0)
    splits = Splits(
        Split(x, targets), Split(x[:0], targets[:0]), Split(x[:4], targets[:4]),
        DataSpec("least_squares", tuple(x.shape[1:]), None, "synthetic"),
    )
    model = nn.Linear(x.shape[1], targets.shape[1]).double()
    return Problem(model, build_loss("squared_error"), splits, autoencoder=False)


def random_least_squares(n: int = 64) -> Problem:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return least_squares_problem(x, torch.randn(n, 2, generator=g, dtype=torch.float64))


def non_finite_away_from_theta(problem: Problem, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every loss (and gradient) evaluated at a point other than the current θ is NaN: the network
    overflows as soon as it leaves θ, so no trial point of any search can decrease f."""
    loss, loss_and_grad = problem.loss, problem.loss_and_grad

    def away(theta: torch.Tensor | None) -> bool:
        return theta is not None and not torch.equal(theta, problem.theta)

    def poisoned_loss(batch, theta=None):
        value = loss(batch, theta)
        return value * math.nan if away(theta) else value

    def poisoned_loss_and_grad(batch, theta=None):
        value, grad = loss_and_grad(batch, theta)
        return (value * math.nan, grad * math.nan) if away(theta) else (value, grad)

    monkeypatch.setattr(problem, "loss", poisoned_loss)
    monkeypatch.setattr(problem, "loss_and_grad", poisoned_loss_and_grad)


# ---------------------------------------------------------------------- non-finite loss or gradient
@pytest.mark.parametrize("mode", ["output", "gradient"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_finite_loss_or_gradient_ends_the_run_as_diverged(name, mode):
    """The fault strikes at the third step. Methods that check at once stop there, θ untouched; the others
    step into NaN and the engine ends the run at the evaluation after the faulty step (step 4)."""
    problem, optimizer, fault = make(name)
    step = optimizer.step
    calls = 0

    def step_with_fault():
        nonlocal calls
        calls += 1
        if calls == 3:
            fault.mode = mode
        return step()

    optimizer.step = step_with_fault
    outcome = train(problem, optimizer)
    assert outcome.status == "diverged"
    if name in CHECKED_AT_ONCE:
        assert outcome.steps == 2 and outcome.reason.startswith("Diverged: non-finite loss or gradient")
        assert torch.isfinite(problem.theta).all()
    else:
        assert outcome.steps == 4 and outcome.reason == "non-finite training loss by step 4"
    # the last row is the evaluation where the run stopped
    assert outcome.rows[-1]["step"] == outcome.steps


def test_summary_json_records_the_optimizers_reason(tmp_path, monkeypatch, data_root):
    """Through ``ksd.runner.execute``: from the third gradient on, ``loss_and_grad`` returns a NaN gradient
    with a finite loss; L-BFGS stops and summary.json carries its reason."""
    monkeypatch.setenv("KSD_DATA", str(data_root))
    original = Problem.loss_and_grad
    calls = 0

    def nan_gradient_later(self, batch, theta=None):
        nonlocal calls
        calls += 1
        loss, grad = original(self, batch, theta)
        return (loss, grad * math.nan) if calls >= 3 else (loss, grad)

    monkeypatch.setattr(Problem, "loss_and_grad", nan_gradient_later)
    cfg = compose_config(
        "dataset=mnist", "optimizer=lbfgs", "model.widths=[16,4]", "dataset.train_size=200",
        "dataset.test_size=50", "run.max_steps=20", "run.eval_every=5", "run.max_seconds=null",
        "run.max_epochs=null", "run.plot=false",
    )
    summary = execute(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["status"] == summary["status"] == "diverged"
    assert saved["reason"].startswith("Diverged: non-finite loss or gradient at L-BFGS iteration")
    assert saved["steps"] < 20 and (tmp_path / "metrics.csv").exists()


# ---------------------------------------------------------------------- line searches that find no decrease
def test_strong_wolfe_along_an_ascent_direction_keeps_the_start():
    """f(x) = (1 + x)² from 0 along +1 (f'(0) = 2 > 0): no trial decreases f, the start is returned."""

    def evaluate(t: float) -> tuple[float, torch.Tensor]:
        return (1 + t) ** 2, torch.tensor([2 * (1 + t)], dtype=torch.float64)

    grad, direction = torch.tensor([2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    result = strong_wolfe(evaluate, direction, 1.0, grad, 1.0, max_evaluations=25)
    assert result.step == 0.0 and result.loss == 1.0
    assert 1 <= result.evaluations <= 26


def test_strong_wolfe_backs_off_from_non_finite_trial_points():
    """f(x) = (x − 1)², NaN (loss and slope) beyond x = 1.5, searched from 0 with a first trial of 4: the
    non-finite point counts as +∞, bisection brings the search back, and the strong Wolfe point it
    returns is finite with f < f(0). (Comparisons with NaN used to return the NaN point itself.)"""

    def evaluate(t: float) -> tuple[float, torch.Tensor]:
        if not t <= 1.5:
            return math.nan, torch.tensor([math.nan], dtype=torch.float64)
        return (t - 1) ** 2, torch.tensor([2 * (t - 1)], dtype=torch.float64)

    grad, direction = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    result = strong_wolfe(evaluate, direction, 1.0, grad, 4.0, c1=1e-4, c2=0.9)
    assert 0 < result.step <= 1.5
    assert result.loss == pytest.approx((result.step - 1) ** 2) and result.loss < 1.0
    assert abs(2 * (result.step - 1)) <= 0.9 * 2  # the curvature condition holds


def test_lbfgs_rejects_the_step_when_no_trial_point_decreases_f(monkeypatch):
    problem, optimizer, _ = make("lbfgs", batch_size=None)
    optimizer.step()  # one real step: a pair is stored, the next direction is quasi-Newton
    pairs, theta = len(optimizer.state["steps"]), problem.theta.clone()
    non_finite_away_from_theta(problem, monkeypatch)
    stats = optimizer.step()
    assert stats["step_size"] == 0.0 and stats["evaluations"] >= 2
    assert torch.equal(problem.theta, theta)
    assert len(optimizer.state["steps"]) == pairs  # the zero step is no pair
    assert all(torch.isfinite(t).all() for t in optimizer.state["cached"])


def test_ncg_rejects_the_step_when_no_trial_point_decreases_f_and_restarts(monkeypatch):
    problem, optimizer, _ = make("ncg", batch_size=None)
    optimizer.step()  # one real step: the next direction would use β and the previous direction
    theta = problem.theta.clone()
    non_finite_away_from_theta(problem, monkeypatch)
    stats = optimizer.step()
    assert stats["step_size"] == 0.0 and stats["evaluations"] >= 2
    assert torch.equal(problem.theta, theta)
    # the next iteration restarts with steepest descent and a fresh first trial step
    assert optimizer.state["direction"] is None and optimizer.state["decrease"] is None


def test_hf_rejects_the_step_when_no_trial_point_decreases_f(monkeypatch):
    """Every trial objective is NaN: CG backtracking, the reduction ratio and all Armijo trials see +∞, the
    step is rejected (rate 0, θ unchanged) and λ rises by the damping factor. (NaN used to pass the Armijo
    test, and θ stepped into the overflow.)"""
    problem, optimizer, _ = make("hf", batch_size=None)
    theta, damping = problem.theta.clone(), optimizer.state["damping"]
    non_finite_away_from_theta(problem, monkeypatch)
    stats = optimizer.step()
    assert stats["step_size"] == 0.0 and stats["line_search_tries"] == optimizer.config.line_search_tries
    assert stats["rho"] == -math.inf
    assert torch.equal(problem.theta, theta)
    assert optimizer.state["damping"] == damping * optimizer.config.damping_factor


@pytest.mark.parametrize("radius_rule", ["liblinear", "nocedal_wright"])
def test_tron_rejects_a_non_finite_trial_point_and_shrinks_the_radius(monkeypatch, radius_rule):
    """Every trial objective is NaN: it counts as +∞ (actred = −∞), the step is rejected (θ unchanged) and the
    radius shrinks: LIBLINEAR's Δ = min(σ₁‖s‖, σ₂Δ) (the interpolated step α is σ₁), N&W's Δ/4."""
    problem, optimizer, _ = make("tron", batch_size=None, radius_rule=radius_rule)
    optimizer.step()  # one real step: the radius is set, past LIBLINEAR's first-iteration adjustment
    theta, radius = problem.theta.clone(), optimizer.state["radius"]
    non_finite_away_from_theta(problem, monkeypatch)
    stats = optimizer.step()
    assert stats["accepted"] == 0 and stats["rho"] == -math.inf and stats["radius"] == radius
    assert torch.equal(problem.theta, theta)
    c = optimizer.config
    if radius_rule == "liblinear":
        expected = min(c.sigma1 * stats["step_norm"], c.sigma2 * radius)
    else:
        expected = radius / 4
    assert optimizer.state["radius"] == pytest.approx(expected, rel=1e-12) and expected < radius
    stats = optimizer.step()  # the next step tries the smaller region and is rejected again
    assert stats["radius"] == pytest.approx(expected, rel=1e-12) and torch.equal(problem.theta, theta)


def test_tron_stops_cg_at_a_non_finite_curvature_product_and_shrinks(monkeypatch):
    """A NaN Gauss-Newton product on the first CG iteration: CG returns p = 0, the predicted reduction is 0,
    the step is rejected and the radius shrinks by σ₁ (θ stays finite and unchanged)."""
    problem, optimizer, _ = make("tron", batch_size=None)
    theta = problem.theta.clone()
    monkeypatch.setattr(
        ksd.optim.tron, "ggn_operator", lambda problem_, batch, theta=None: lambda v: v * math.nan
    )
    optimizer.state["radius"] = 1.0
    stats = optimizer.step()
    assert stats["accepted"] == 0 and stats["cg_iterations"] == 1 and math.isnan(stats["rho"])
    assert torch.equal(problem.theta, theta)
    assert optimizer.state["radius"] == pytest.approx(optimizer.config.sigma1)


def test_ksd_keeps_theta_when_the_subspace_line_search_finds_no_decrease(monkeypatch):
    problem, optimizer, _ = make("ksd", batch_size=None)
    theta = problem.theta.clone()
    non_finite_away_from_theta(problem, monkeypatch)
    stats = optimizer.step()
    assert stats["bfgs_iterations"] == 0 and stats["bfgs_evaluations"] >= 2
    assert stats["subspace_loss_after"] == stats["subspace_loss_before"]
    assert torch.equal(problem.theta, theta)
    assert torch.count_nonzero(optimizer.state["previous_step"]) == 0


def test_arcs_lsr1_rejects_a_non_finite_trial_point(monkeypatch):
    problem, optimizer, _ = make("arcs_lsr1", batch_size=None, store_rejected=True)
    theta, sigma = problem.theta.clone(), optimizer.state["sigma"]
    non_finite_away_from_theta(problem, monkeypatch)
    stats = optimizer.step()
    assert stats["accepted"] == 0 and stats["pairs"] == 0  # not even with store_rejected
    assert torch.equal(problem.theta, theta)
    assert optimizer.state["sigma"] == sigma * (optimizer.config.gamma1 + optimizer.config.gamma2) / 2


# ---------------------------------------------------------------------- CG breakdown in HF
@pytest.mark.parametrize("fault", ["negative", "nan"])
@pytest.mark.parametrize("good_products", [0, 3])
def test_hf_continues_after_cg_meets_non_positive_curvature(monkeypatch, fault, good_products):
    """The Gauss-Newton operator is honest for ``good_products`` products, then returns negative curvature
    (−G v − 10³ v: the damped matrix is negative definite) or NaN. CG stops at that iteration with the
    iterate before it; HF takes that step if it decreases f (from 3 iterations) or a zero step (from 0)."""
    problem = random_least_squares()
    optimizer = HessianFree(problem, HessianFree.Config(num_chunks=1, initial_damping=1.0))

    def faulty_operator(problem_, batch, theta=None):
        honest = ggn_operator(problem_, batch, theta)
        calls = 0

        def product(v: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls <= good_products:
                return honest(v)
            return honest(v).neg_().sub_(v, alpha=1e3) if fault == "negative" else v * math.nan

        return product

    monkeypatch.setattr(ksd.optim.hf, "ggn_operator", faulty_operator)
    before, theta = problem.loss(problem.full_batch), problem.theta.clone()
    stats = optimizer.step()
    assert stats["cg_iterations"] == good_products
    assert torch.isfinite(problem.theta).all() and torch.isfinite(optimizer.state["previous_step"]).all()
    if good_products:
        assert stats["step_size"] > 0 and problem.loss(problem.full_batch) < before
    else:
        assert torch.equal(problem.theta, theta)
        assert optimizer.state["damping"] == 1.0 * optimizer.config.damping_factor  # ρ undefined → NaN


# ---------------------------------------------------------------------- singular Krylov basis in KSD
def test_ksd_krylov_space_of_dimension_one_stops_the_basis_and_still_solves():
    """All examples are the same (x, t): G = ā āᵀ ⊗ I and g = ā ⊗ r are such that G g = ‖ā‖² g, so the
    Krylov space is span{g} whatever K. The basis stops after one vector, and the step along g reaches the
    minimum f = 0 (the output moves by −r)."""
    x = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float64).repeat(64, 1)
    targets = torch.tensor([[0.3, -2.0]], dtype=torch.float64).repeat(64, 1)
    problem = least_squares_problem(x, targets)
    config = KrylovSubspaceDescent.Config(krylov_dim=5, preconditioner=False, curvature_size=16, bfgs_size=16)
    start = problem.loss(problem.full_batch)
    stats = KrylovSubspaceDescent(problem, config).step()
    assert stats["basis_size"] == 1 and stats["krylov_breakdown"] == 1
    assert problem.loss(problem.full_batch) <= 1e-20 * start  # float64 rounding of a 1-D quadratic


def test_ksd_with_a_zero_gradient_searches_along_the_previous_step(monkeypatch):
    """A zero gradient leaves no Krylov vector; the basis is the previous step alone (here −∇f, a descent
    direction) and the step happens along it. It used to raise Diverged."""
    problem = random_least_squares()
    config = KrylovSubspaceDescent.Config(krylov_dim=3, curvature_size=16, bfgs_size=16)
    optimizer = KrylovSubspaceDescent(problem, config)
    previous = -problem.loss_and_grad(problem.full_batch)[1]
    optimizer.state["previous_step"] = previous.clone()
    theta = problem.theta.clone()
    gradient = optimizer.gradient
    monkeypatch.setattr(optimizer, "gradient", lambda: (gradient()[0], torch.zeros_like(theta)))
    stats = optimizer.step()
    assert stats["basis_size"] == 1 and stats["krylov_breakdown"] == 1
    assert stats["subspace_loss_after"] <= stats["subspace_loss_before"]
    moved = problem.theta - theta
    assert moved.norm() > 0
    cosine = moved.dot(previous) / (moved.norm() * previous.norm())
    assert abs(cosine) == pytest.approx(1.0, abs=1e-12)


def test_ksd_at_a_stationary_point_takes_a_zero_step_and_completes():
    """Targets equal to the model's outputs: every per-example gradient is exactly zero, so the
    preconditioner (F = 0, τ = 0) is the identity, the basis is empty on the first iteration and the step
    is zero. The run completes; it used to end as diverged."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    problem = least_squares_problem(x, torch.zeros(64, 2, dtype=torch.float64))
    problem.splits.train.labels.copy_(problem.outputs(x).detach())
    assert problem.loss_and_grad(problem.full_batch)[1].count_nonzero() == 0
    theta = problem.theta.clone()
    config = KrylovSubspaceDescent.Config(krylov_dim=3, curvature_size=16, bfgs_size=16)
    outcome = train(problem, KrylovSubspaceDescent(problem, config), steps=3)
    assert outcome.status == "completed" and outcome.steps == 3
    assert outcome.rows[-1]["basis_size"] == 0
    assert torch.equal(problem.theta, theta)


# ---------------------------------------------------------------------- BFGS and SR1 denominators
def test_lbfgs_skips_pairs_without_positive_curvature():
    """sᵀy < 0, sᵀy = 0 and a NaN y are not stored (ρ = 1/sᵀy would be negative, infinite or NaN); the
    next step is finite."""
    problem, optimizer, _ = make("lbfgs", batch_size=None)
    s, orthogonal = torch.zeros(problem.n_params), torch.zeros(problem.n_params)
    s[:2], orthogonal[:2] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])  # sᵀy = 0 exactly
    for y in (-s, orthogonal, s * math.nan):
        optimizer._remember(s.clone(), y)
    assert optimizer.state["steps"] == [] and optimizer.state["gamma"] == 1.0
    stats = optimizer.step()
    assert math.isfinite(stats["loss"].item()) and stats["step_size"] > 0
    assert torch.isfinite(problem.theta).all()


@pytest.mark.parametrize("pair", ["zero", "negative", "nan", "underflow"])
def test_kbfgs_pair_without_usable_curvature_leaves_the_factor_finite(pair):
    """K-BFGS pairs that BFGS cannot use, through what the optimizer applies to them: the G side damps
    then tests (s = y = 0: damping cannot help, rejected; y = −s: damping makes sᵀy > 0, accepted with
    H y = s; NaN y: rejected); the A side tests undamped pairs (float32 s = 10⁻²⁰ s₀, y = 2s: sᵀy ≈ 10⁻³⁹
    passes the skip test but ρ = 1/sᵀy overflows, rejected by the finiteness check). H stays finite, and
    unchanged whenever the pair is rejected."""
    dtype = torch.float32 if pair == "underflow" else torch.float64
    g = torch.Generator().manual_seed(0)
    s0 = torch.randn(5, generator=g, dtype=torch.float64).to(dtype)
    s, y = {
        "zero": (0 * s0, 0 * s0), "negative": (s0, -s0), "nan": (s0, s0 * math.nan),
        "underflow": (1e-20 * s0, 2e-20 * s0),
    }[pair]
    h = torch.eye(5, dtype=dtype)
    if pair != "underflow":
        s, y = double_damping(s, y, lambda v: h @ v, 0.2, 0.3**0.5)
    accepted = bfgs_inverse_update_(h, s, y, accept_pair(s, y, torch.ones(5, dtype=dtype), 1e-4))
    assert torch.isfinite(h).all()
    if pair == "negative":
        assert accepted
        torch.testing.assert_close(h @ y, s, rtol=1e-10, atol=1e-12)
    else:
        assert not accepted
        assert torch.equal(h, torch.eye(5, dtype=dtype))
    if pair == "underflow":  # the skip test alone would have let it through
        assert accept_pair(s, y, torch.ones(5, dtype=dtype), 1e-4)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_kbfgs_step_without_movement_skips_every_output_pair(monkeypatch, cls):
    """The second pass sees exactly what the first saw (s = y = 0 in every layer): no G-side update, and
    the next (honest) step is finite."""
    problem, _ = toy_problem()
    optimizer = cls(problem, cls.Config(batch_size=None))
    forward_backward = optimizer.layers.forward_backward
    records = []

    def replayed(batch, *, gradient, **kwargs):
        if gradient:
            records.append(forward_backward(batch, gradient=gradient, **kwargs))
            return records[-1]
        return records[-1]  # the trial point's pass, replaced by the first pass

    monkeypatch.setattr(optimizer.layers, "forward_backward", replayed)
    stats = optimizer.step()
    assert stats["g_updates"] == 0
    state = optimizer.state
    factors = state["H_g"] if cls is KBFGS else state["S"] + state["Y"]
    assert all(torch.isfinite(t).all() for t in factors + state["H_a"])
    if cls is KBFGS:
        assert all(torch.equal(h, torch.eye(len(h))) for h in state["H_g"])
    else:
        assert all(count == 0 for count in state["pairs"])
    monkeypatch.undo()
    stats = optimizer.step()
    assert torch.isfinite(stats["loss"]) and torch.isfinite(problem.theta).all()


@pytest.mark.parametrize("fault", ["zero", "negative"])
def test_ksd_subspace_bfgs_skips_pairs_without_positive_curvature(monkeypatch, fault):
    """The subspace line search is made to report a gradient with y = 0 or with sᵀy < 0 (y = −c s). The
    BFGS update must be skipped, so the next direction is −H₀ g with the initial H₀ = Ĥ_floor⁻¹ (a
    skipped-not update would make H infinite/NaN for y = 0, or indefinite for sᵀy < 0)."""
    searches = []

    def lying_search(evaluate, direction, loss, grad, step, **kwargs) -> LineSearchResult:
        searches.append((direction.clone(), grad.clone()))
        result = strong_wolfe(evaluate, direction, loss, grad, step, **kwargs)
        s = result.step * direction
        lie = grad.clone() if fault == "zero" else grad - s * (2 * grad.norm() / s.norm())
        return LineSearchResult(result.step, result.loss, lie, result.evaluations)

    monkeypatch.setattr(ksd.optim.ksd, "strong_wolfe", lying_search)
    problem = random_least_squares()
    config = KrylovSubspaceDescent.Config(krylov_dim=3, curvature_size=16, bfgs_size=16, bfgs_tolerance=0.0)
    optimizer = KrylovSubspaceDescent(problem, config)
    initial = []
    initial_inverse_hessian = optimizer._initial_inverse_hessian

    def recorded(curvature: torch.Tensor) -> torch.Tensor:
        initial.append(initial_inverse_hessian(curvature))
        return initial[-1]

    monkeypatch.setattr(optimizer, "_initial_inverse_hessian", recorded)
    optimizer.step()
    assert len(searches) >= 2
    for direction, grad in searches:
        torch.testing.assert_close(direction, -(initial[0] @ grad), rtol=1e-12, atol=1e-14)
    assert torch.isfinite(problem.theta).all()


def sr1_injection(problem: Problem, monkeypatch: pytest.MonkeyPatch, orthogonal: bool) -> None:
    """At trial points the gradient is ``g + γ₀ s + r`` with s = θ_trial − θ, so ``y − B₀ s = r``: r ⟂ s
    makes the SR1 denominator sᵀ(y − Bs) vanish (to rounding) although ‖r‖ ≈ ‖γ₀ s‖."""
    loss_and_grad = problem.loss_and_grad

    def injected(batch, theta=None):
        loss, grad = loss_and_grad(batch, theta)
        if theta is None or torch.equal(theta, problem.theta):
            return loss, grad
        s = theta - problem.theta
        r = torch.roll(s, 1)
        if orthogonal:
            r = r - r.dot(s) / s.dot(s) * s
        r = r * (s.norm() / r.norm())
        current = loss_and_grad(batch)[1]
        return loss, current + s + r  # γ₀ = gamma_init = 1

    monkeypatch.setattr(problem, "loss_and_grad", injected)


@pytest.mark.parametrize("orthogonal", [True, False])
def test_arcs_lsr1_skips_a_pair_with_vanishing_sr1_denominator(monkeypatch, orthogonal):
    """|sᵀr| ≈ 1e-16 ‖s‖‖r‖ fails the skip rule (tolerance 1e-8): nothing is stored, B stays γ₀ I, even
    with ``store_rejected``. The control (r not orthogonal to s) is stored, so the rule is what decides."""
    problem = random_least_squares()
    config = ARCsLSR1.Config(batch_size=None, store_rejected=True, gamma_rule="fixed")
    optimizer = ARCsLSR1(problem, config)
    sr1_injection(problem, monkeypatch, orthogonal)
    stats = optimizer.step()
    assert stats["pairs"] == (0 if orthogonal else 1)
    assert np.isfinite(optimizer.eigen.eigenvalues).all() and np.isfinite(optimizer.eigen.basis).all()
    monkeypatch.undo()
    stats = optimizer.step()
    assert math.isfinite(stats["rho"]) and torch.isfinite(problem.theta).all()


def test_arcs_lsr1_drops_pairs_that_make_the_middle_matrix_singular():
    """Two nearly identical pairs make SᵀS (hence the middle matrix) singular to rounding: the oldest is
    dropped until the model is well defined, and the next step is finite. Two independent pairs stay."""
    problem = random_least_squares()
    g = torch.Generator().manual_seed(1)
    s1 = torch.randn(problem.n_params, generator=g, dtype=torch.float64)
    y1 = 2 * s1 + 0.1 * torch.randn(problem.n_params, generator=g, dtype=torch.float64)
    nudge = 1e-12 * torch.randn(problem.n_params, generator=g, dtype=torch.float64)
    independent = torch.randn(problem.n_params, generator=g, dtype=torch.float64)
    for s2, y2, kept in ((s1 + nudge, y1 + nudge, 1), (independent, 3 * independent, 2)):
        optimizer = ARCsLSR1(problem, ARCsLSR1.Config(batch_size=None))
        memory = optimizer.memory
        for s, y in ((s1, y1), (s2, y2)):
            products = memory.products(torch.stack([s, y], 1)).numpy()
            memory.append(s, y, products, (s.dot(s).item(), s.dot(y).item(), y.dot(y).item()))
        optimizer._refresh_model()
        assert len(memory) == kept
        assert np.isfinite(optimizer.eigen.eigenvalues).all() and math.isfinite(optimizer.state["gamma"])
        stats = optimizer.step()
        assert math.isfinite(stats["rho"]) and torch.isfinite(problem.theta).all()
