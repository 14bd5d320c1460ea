"""Hessian-free (Martens 2010) against known minimisers, deliberate damping situations and SGD."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from conftest import CONF, compose_config
from torch import nn

from ksd.config import ModelConfig
from ksd.data import DataSpec, Split, Splits, load_dataset
from ksd.errors import ConfigError
from ksd.losses import build_loss
from ksd.models import build_model
from ksd.optim.first_order import SGD
from ksd.optim.hf import HessianFree
from ksd.problem import Problem

Config = HessianFree.Config


def least_squares_problem(n_examples: int = 40, d_in: int = 5, d_out: int = 3) -> Problem:
    """``f(W, b) = (1/N) Σ ½‖W x_i + b − t_i‖²``: a strictly convex quadratic whose Gauss-Newton matrix is
    its Hessian (the model is linear in θ), in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_examples, d_in, generator=g, dtype=torch.float64)
    t = torch.randn(n_examples, d_out, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    splits = Splits(Split(x, t), Split(x[:0], t[:0]), Split(x, t), DataSpec("toy", (d_in,), None, "toy"))
    return Problem(nn.Linear(d_in, d_out).double(), build_loss("squared_error"), splits, autoencoder=False)


def least_squares_solution(problem: Problem) -> torch.Tensor:
    x, t = problem.splits.train.inputs, problem.splits.train.labels
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, t).solution  # (d_in + 1, d_out): rows = weights, last = bias
    return torch.cat([solution[:-1].T.reshape(-1), solution[-1]])  # θ = [W (d_out × d_in), b]


def test_reaches_the_minimiser_of_a_convex_quadratic_in_one_iteration():
    problem = least_squares_problem()
    config = Config(weight_decay=0.0, initial_damping=1e-12, num_chunks=1, min_cg_iterations=problem.n_params,
                    max_cg_iterations=3 * problem.n_params)
    stats = HessianFree(problem, config).step()
    solution = least_squares_solution(problem)
    # CG backtracking may pick an earlier saved iterate whose f ties with the last one's in float64, so
    # f agrees to rounding (~1e-16 relative) and θ to about sqrt(1e-16 · condition number) ≈ 1e-8.
    torch.testing.assert_close(problem.loss(problem.full_batch), problem.loss(problem.full_batch, solution),
                               rtol=1e-13, atol=0)
    torch.testing.assert_close(problem.theta, solution, rtol=1e-6, atol=1e-7)
    assert stats["step_size"] == 1.0
    assert stats["rho"] == pytest.approx(1.0, abs=1e-6)  # the quadratic model is exact


def test_damping_falls_after_a_good_step():
    # On the quadratic, ρ = 1 whatever λ: the undamped model predicts the change of f exactly.
    problem = least_squares_problem()
    optimizer = HessianFree(problem, Config(weight_decay=1e-3, initial_damping=10.0, num_chunks=1))
    before = problem.loss(problem.full_batch).item()
    stats = optimizer.step()
    assert stats["rho"] == pytest.approx(1.0, abs=1e-9)
    assert stats["damping"] == 10.0
    assert optimizer.state["damping"] == pytest.approx(10.0 / 1.5)
    assert problem.loss(problem.full_batch).item() < before


def saturated_logistic_problem() -> Problem:
    """Logistic outputs with targets ½ started deep in saturation (z ≈ −10): the Gauss-Newton model has
    curvature σ(z)(1 − σ(z)) ≈ 4.5·10⁻⁵ but slope ≈ −½, so the undamped GN step overshoots to z ≈ 10⁴
    where the loss is ~10³ times larger."""
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.randn(20, 4, generator=g, dtype=torch.float64)
    t = torch.full((20, 2), 0.5, dtype=torch.float64)
    model = nn.Linear(4, 2).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(-10.0)
    splits = Splits(Split(x, t), Split(x[:0], t[:0]), Split(x, t), DataSpec("toy", (4,), None, "toy"))
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=False)


def test_damping_rises_after_a_rejected_step():
    problem = saturated_logistic_problem()
    theta0 = problem.theta.clone()
    config = Config(weight_decay=0.0, initial_damping=1e-8, num_chunks=1, line_search_tries=5)
    optimizer = HessianFree(problem, config)
    stats = optimizer.step()
    assert stats["rho"] == -math.inf  # f increased on the curvature chunk
    assert stats["step_size"] == 0.0 and stats["line_search_tries"] == 5  # 0.8⁴·p still overshoots
    assert torch.equal(problem.theta, theta0)
    assert optimizer.state["damping"] == pytest.approx(1.5e-8)
    # with the default 60 trials the line search finds a small enough rate, but λ still rises (ρ = −∞)
    problem = saturated_logistic_problem()
    optimizer = HessianFree(problem, Config(weight_decay=0.0, initial_damping=1e-8, num_chunks=1))
    stats = optimizer.step()
    assert 0 < stats["step_size"] < 0.8**20
    assert problem.loss(problem.full_batch) < problem.loss(problem.full_batch, theta0)
    assert optimizer.state["damping"] == pytest.approx(1.5e-8)


def test_warm_start_and_curvature_chunks_cycle():
    problem = least_squares_problem()
    optimizer = HessianFree(problem, Config(num_chunks=4, max_cg_iterations=3))
    chunks = []
    original = problem.train_chunk
    problem.train_chunk = lambda i, n: chunks.append((i, n)) or original(i, n)
    for _ in range(5):
        optimizer.step()
    assert chunks == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # train_chunk takes i mod n
    restored = HessianFree(problem, Config(num_chunks=4))
    restored.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(restored.state["previous_step"], optimizer.state["previous_step"])
    assert restored.state["iteration"] == 5 and restored.state["damping"] == optimizer.state["damping"]


@pytest.mark.slow  # real-data learning, the longest test; the fast set checks HF's steps on small problems
def test_reduces_mnist_autoencoder_loss_far_more_per_epoch_than_sgd(data_root):
    splits = load_dataset("mnist", data_root, val_size=0, train_size=1000, test_size=10)

    def autoencoder() -> Problem:
        torch.manual_seed(0)  # same sparse initialisation for both methods
        built = build_model(ModelConfig(widths=[64, 16], init="sparse"), splits.spec)
        return Problem(built.network, built.loss, splits, autoencoder=True)

    epochs = 10
    problem = autoencoder()
    initial = problem.loss(problem.full_batch).item()
    hf = HessianFree(problem, Config(num_chunks=2, initial_damping=1.0))
    while problem.epoch < epochs:  # one full-batch gradient per HF iteration
        hf.step()
    hf_loss = problem.loss(problem.full_batch).item()
    sgd_losses = []
    for lr in (0.003, 0.01, 0.03):  # the best of a small grid around the best SGD rate for this loss scale
        problem = autoencoder()
        sgd = SGD(problem, SGD.Config(lr=lr, batch_size=100))
        while problem.epoch < epochs:
            sgd.step()
        sgd_losses.append(problem.loss(problem.full_batch).item())
    # measured: HF ≈ 131, SGD ≈ 204 (its plateau: the mean image), start ≈ 980
    assert hf_loss < 0.75 * min(sgd_losses) < 0.75 * initial


def test_config_file_lists_every_field_and_selects_sparse_init():
    listed = yaml.safe_load((CONF / "optimizer" / "hf.yaml").read_text())
    defaults = listed.pop("defaults")
    assert set(listed) == {f.name for f in dataclasses.fields(Config)}
    assert Config(**listed) == Config()
    assert {"/init@_global_": "sparse"} in defaults
    assert compose_config("optimizer=hf").model.init == "sparse"
    assert compose_config("optimizer=hf", "model.init=default").model.init == "default"
    assert compose_config("optimizer=sgd").model.init == "default"


@pytest.mark.parametrize(
    ("field", "value"),
    [("initial_damping", 0.0), ("damping_factor", 1.0), ("min_cg_iterations", 0), ("warm_start", 1.5),
     ("armijo_c", 1.0), ("backtrack_factor", 1.0), ("line_search_tries", 0), ("num_chunks", 0)],
)
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: value})
