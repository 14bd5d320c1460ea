"""Krylov Subspace Descent against explicit computations: a quadratic with a known minimiser, dense
curvature matrices, and real MNIST autoencoders."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from conftest import CONF
from torch import nn

from ksd.data import DataSpec, Split, Splits, load_dataset
from ksd.errors import ConfigError
from ksd.losses import build_loss
from ksd.models.autoencoder import autoencoder
from ksd.optim.first_order import SGD
from ksd.optim.ksd import KrylovSubspaceDescent, orthogonalize
from ksd.optim.linalg import inner_products
from ksd.problem import Batch, Problem

Config = KrylovSubspaceDescent.Config


def quadratic_problem(dtype: torch.dtype = torch.float64) -> tuple[Problem, torch.Tensor]:
    """Linear model 4 → 2 (n = 10 parameters) under ½‖Wx + b − t‖² with targets t = W*x + b*.

    The loss is a strictly convex quadratic whose Gauss-Newton matrix is its exact Hessian, and every
    subset of the data (of at least 5 examples) has the same minimiser θ* = (W*, b*), so the curvature
    and BFGS subsets cannot disagree about it. Input scales differ by 10× to make the Hessian
    ill-conditioned.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g, dtype=dtype) * torch.tensor([1.0, 3.0, 0.3, 2.0], dtype=dtype)
    weight, bias = torch.randn(2, 4, generator=g, dtype=dtype), torch.randn(2, generator=g, dtype=dtype)
    targets = x @ weight.T + bias
    torch.manual_seed(0)
    empty, test = Split(x[:0], targets[:0]), Split(x[:5], targets[:5])
    splits = Splits(Split(x, targets), empty, test, DataSpec("quadratic", (4,), None, "synthetic"))
    problem = Problem(nn.Linear(4, 2).to(dtype), build_loss("squared_error"), splits, autoencoder=False)
    return problem, torch.cat([weight.reshape(-1), bias])


@pytest.fixture(scope="module")
def mnist(data_root) -> Splits:
    return load_dataset("mnist", data_root, val_size=0, train_size=2000, test_size=10)


def mnist_autoencoder(splits: Splits) -> Problem:
    """784-64-16-64-784 sigmoid autoencoder with a linear code, on real MNIST images."""
    torch.manual_seed(0)
    model = autoencoder((1, 28, 28), [64, 16], "sigmoid")
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=True, seed=0)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("krylov_dim", [10, 16])
def test_reaches_the_minimiser_of_a_convex_quadratic_in_one_iteration(curvature, krylov_dim):
    """With K ≥ n the Krylov space holds the Newton step (Cayley-Hamilton), so one iteration lands on θ*.

    K = 16 > n also exercises the breakdown: the recursion stops once the space is invariant.
    Tolerance: BFGS on a 10-dimensional quadratic in float64 converges to rounding (≈1e-14 observed);
    1e-8 leaves room for the line search's last step.
    """
    problem, solution = quadratic_problem()
    config = Config(krylov_dim=krylov_dim, curvature=curvature, curvature_size=100, bfgs_size=100,
                    bfgs_max_iterations=100, bfgs_tolerance=0.0)
    stats = KrylovSubspaceDescent(problem, config).step()
    torch.testing.assert_close(problem.theta, solution, rtol=0, atol=1e-8)
    assert stats["basis_size"] == problem.n_params  # no previous step on the first iteration
    assert stats["krylov_breakdown"] == int(krylov_dim > problem.n_params)


@pytest.mark.slow  # torch.compile, as the compiled products of tests/test_curvature.py
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_compiled_curvature_products_reach_the_same_minimiser(curvature):
    """``run.compile_curvature``: the Krylov recursion on torch.compile'd products (no stored operator)
    lands on θ* as the eager one does; same tolerance as above."""
    problem, solution = quadratic_problem()
    problem.compile_curvature = True
    config = Config(krylov_dim=10, curvature=curvature, curvature_size=100, bfgs_size=100,
                    bfgs_max_iterations=100, bfgs_tolerance=0.0)
    KrylovSubspaceDescent(problem, config).step()
    torch.testing.assert_close(problem.theta, solution, rtol=0, atol=1e-8)


def test_basis_is_the_preconditioned_krylov_space_and_projects_the_dense_curvature():
    """Rows of V: orthonormal; v₁ ∝ D⁻¹g; D⁻¹A v_k ∈ span(v₁ … v_{k+1}); Ĥ = V A Vᵀ with the dense A."""
    problem, _ = quadratic_problem()
    optimizer = KrylovSubspaceDescent(problem, Config(krylov_dim=6, weight_decay=0.1, curvature_size=50))
    _, grad = optimizer.gradient()
    curvature_batch, _ = problem.random_batches(50, 50)
    subspace = optimizer.build_basis(grad, curvature_batch)
    V = optimizer.basis[: subspace.size]
    assert subspace.size == 6

    def loss(theta):
        return problem.loss_fn(problem.outputs(curvature_batch.inputs, theta), curvature_batch.targets)

    hessian = torch.autograd.functional.hessian(loss, problem.theta.detach())
    dense = hessian + 0.1 * torch.eye(problem.n_params, dtype=hessian.dtype)
    inverse_preconditioner = optimizer._inverse_preconditioner(curvature_batch)

    torch.testing.assert_close(V @ V.T, torch.eye(6, dtype=V.dtype), rtol=0, atol=1e-12)
    first = inverse_preconditioner * grad
    torch.testing.assert_close(V[0], first / first.norm(), rtol=0, atol=1e-12)
    for k in range(5):
        w = inverse_preconditioner * (dense @ V[k])
        residual = w - V[: k + 2].T @ (V[: k + 2] @ w)
        assert residual.norm() <= 1e-10 * w.norm(), k
    torch.testing.assert_close(subspace.curvature, V @ dense @ V.T, rtol=1e-10, atol=1e-10)


def test_preconditioner_is_the_floored_mean_squared_gradient_to_the_three_quarters():
    problem, _ = quadratic_problem()
    optimizer = KrylovSubspaceDescent(problem, Config(weight_decay=0.01))
    batch = problem.random_batches(20)[0]
    squares = torch.stack([
        problem.loss_and_grad(Batch(batch.inputs[i : i + 1], batch.targets[i : i + 1]))[1].pow(2)
        for i in range(20)
    ]).mean(0) + 0.01
    expected = squares.clamp(min=1e-4 * squares.max()).pow(-0.75)
    torch.testing.assert_close(optimizer._inverse_preconditioner(batch), expected, rtol=1e-10, atol=0)


def dominated_vector(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 orthonormal float32 rows with heavy-tailed entries (like preconditioned Krylov vectors) and a vector
    lying almost entirely along one of them, as D⁻¹A v_k lies along v_k."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(n, 8, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g).pow(6)
    basis = torch.linalg.qr(rows).Q.T.float().contiguous()
    noise = torch.randn(n, generator=g) * basis[5].abs()
    return basis, 1000 * basis[2] + 50 * basis[6] + noise / noise.norm()


def test_inner_products_are_accurate_where_float32_products_are_not():
    """Here MKL's float32 ``basis.mv(vector)`` and ``basis @ basis.T`` are off by ~4e-5 (relative); the
    chunked float64 accumulation by ~1e-7 (float32 rounding of 1024-term partial sums)."""
    basis, vector = dominated_vector(300_000)
    exact = basis.double() @ vector.double()
    ours = inner_products(basis, vector.unsqueeze(0))[:, 0]
    assert ours.dtype == torch.float64
    assert (ours - exact).abs().max() <= 1e-6 * vector.norm()
    gram = inner_products(basis, basis)
    torch.testing.assert_close(gram, basis.double() @ basis.double().T, rtol=0, atol=1e-6)


def test_orthogonalize_removes_the_span_to_working_precision_in_float32():
    basis, vector = dominated_vector(300_000)
    orthogonalize(vector, basis)
    assert (basis.double() @ vector.double()).abs().max() <= 1e-6 * vector.norm()


@pytest.mark.slow  # the full-size MNIST autoencoder; test_basis_is_orthonormal (small) stays in the fast set
def test_basis_is_orthonormal_in_float32_on_an_mnist_autoencoder(mnist):
    """After K = 20 Krylov steps (and with the previous step, 21 rows) VVᵀ = I to 1e-5 in float32."""
    problem = mnist_autoencoder(mnist)
    config = Config(curvature_size=500, bfgs_size=250, bfgs_max_iterations=3)
    optimizer = KrylovSubspaceDescent(problem, config)
    for _ in range(2):
        stats = optimizer.step()
    assert stats["basis_size"] == 21
    V = optimizer.basis.double()
    assert (V @ V.T - torch.eye(21, dtype=torch.float64)).abs().max() < 1e-5
    assert stats["orthogonality_error"] < 1e-5


def test_subspace_bfgs_decreases_the_subspace_objective(mnist):
    """φ(a*) < φ(0) on the BFGS subset, and the reported φ(a*) is f_B(θ + Vᵀa*) evaluated afresh."""
    problem = mnist_autoencoder(mnist)
    optimizer = KrylovSubspaceDescent(problem, Config(krylov_dim=8, curvature_size=300, bfgs_size=300))
    _, grad = optimizer.gradient()
    curvature_batch, bfgs_batch = problem.random_batches(300, 300)
    subspace = optimizer.build_basis(grad, curvature_batch)
    minimum = optimizer.minimize_in_subspace(subspace, bfgs_batch)
    V = optimizer.basis[: subspace.size]
    assert minimum.iterations >= 1
    assert minimum.loss_after < 0.9 * minimum.loss_before
    assert minimum.loss_before == pytest.approx(problem.loss(bfgs_batch).item(), rel=1e-6)
    moved = problem.theta + V.T @ minimum.coefficients.to(V)
    assert minimum.loss_after == pytest.approx(problem.loss(bfgs_batch, moved).item(), rel=1e-6)


@pytest.mark.slow  # real-data learning (the slowest KSD test); the fast set keeps the default CURVES run's
def test_reduces_the_training_loss_far_more_per_epoch_than_sgd(mnist):
    """Equal epochs (gradient examples / training set, BFGS evaluations included): KSD ends well below the
    best of SGD's learning rates, which stall near the mean-image plateau (≈ 205 nats per image here)."""
    epochs = 15.0
    ksd_problem = mnist_autoencoder(mnist)
    initial = ksd_problem.loss(ksd_problem.full_batch).item()
    config = Config(curvature_size=500, bfgs_size=250, bfgs_max_iterations=10)
    ksd = KrylovSubspaceDescent(ksd_problem, config)
    while ksd_problem.epoch < epochs:
        ksd.step()
    ksd_loss = ksd_problem.loss(ksd_problem.full_batch).item()
    sgd_losses = []
    for lr in (0.01, 0.1):
        problem = mnist_autoencoder(mnist)
        sgd = SGD(problem, SGD.Config(lr=lr))
        while problem.epoch < ksd_problem.epoch:
            sgd.step()
        sgd_losses.append(problem.loss(problem.full_batch).item())
    assert ksd_loss < 0.8 * min(sgd_losses) < 0.8 * initial


def test_config_lists_every_field_and_refuses_bad_values():
    listed = yaml.safe_load((CONF / "optimizer" / "ksd.yaml").read_text())
    assert {"/init@_global_": "sparse"} in listed.pop("defaults")  # Martens' sparse init by default
    assert set(listed) == {f.name for f in dataclasses.fields(Config)}
    assert Config(**listed) == Config()
    with pytest.raises(ConfigError, match="curvature"):
        Config(curvature="fisher")
    with pytest.raises(ConfigError, match="krylov_dim"):
        Config(krylov_dim=0)


def test_checkpoint_keeps_the_previous_step():
    problem, _ = quadratic_problem()
    optimizer = KrylovSubspaceDescent(problem, Config(krylov_dim=3, curvature_size=50, bfgs_size=50))
    optimizer.step()
    restored = KrylovSubspaceDescent(problem, Config(krylov_dim=3, curvature_size=50, bfgs_size=50))
    restored.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(restored.state["previous_step"], optimizer.state["previous_step"])
    assert restored.state["iteration"] == 1
