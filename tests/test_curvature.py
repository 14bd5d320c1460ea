"""Curvature products against explicitly built matrices, in float64.

References are independent of the code under test: the dense Jacobian ``J`` of the outputs from
``torch.autograd.functional.jacobian``, the output Hessian of each example's loss from
``torch.autograd.functional.hessian`` (not the closed forms in ``ksd.losses``), the dense Hessian of
the mean loss from ``torch.autograd.functional.hessian``, and per-example gradients from a Python loop.
Tolerances: everything is float64 on matrices of ~100 entries per row, so products agree to ~1e-14
relative; ``1e-10`` leaves room for summation order without hiding a wrong factor or a missing term.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.autograd.functional import hessian, jacobian

from ksd import curvature
from ksd.curvature import (
    ggn_operator,
    ggn_vector_product,
    hessian_operator,
    hessian_vector_product,
    per_example_squared_gradients,
)
from ksd.data import DataSpec, Split, Splits
from ksd.losses import build_loss
from ksd.problem import Problem

N_EXAMPLES, N_OUT = 7, 3
TOL = {"rtol": 1e-10, "atol": 1e-12}


def mlp(activation: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(8, 6), activation(), nn.Linear(6, 5), activation(), nn.Linear(5, N_OUT)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1), nn.Sigmoid(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, N_OUT),
    )


class SharedLayer(nn.Module):
    """One Linear layer applied twice: its per-example gradient is a sum of two outer products."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.out = nn.Linear(8, N_OUT)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x.flatten(1))))))


MODELS = {
    "mlp-sigmoid": (lambda: mlp(nn.Sigmoid), (8,)),
    "mlp-tanh": (lambda: mlp(nn.Tanh), (8,)),
    "mlp-relu": (lambda: mlp(nn.ReLU), (8,)),
    "cnn": (cnn, (2, 6, 6)),
    "shared-linear": (SharedLayer, (8,)),
}
LOSSES = ("sigmoid_cross_entropy", "softmax_cross_entropy", "squared_error")


def make_problem(
    model_name: str, loss_name: str, max_chunk: int = 10_000, seed: int = 0, compile_curvature: bool = False
) -> Problem:
    build, input_shape = MODELS[model_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, *input_shape, generator=g, dtype=torch.float64)
    if loss_name == "softmax_cross_entropy":
        y = torch.randint(0, N_OUT, (N_EXAMPLES,), generator=g)
    elif loss_name == "sigmoid_cross_entropy":
        y = torch.rand(N_EXAMPLES, N_OUT, generator=g, dtype=torch.float64)
    else:
        y = torch.randn(N_EXAMPLES, N_OUT, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = build().double()
    splits = Splits(Split(x, y), Split(x[:0], y[:0]), Split(x, y), DataSpec("toy", input_shape, N_OUT, "toy"))
    return Problem(
        model, build_loss(loss_name), splits, autoencoder=False, max_chunk=max_chunk,
        compile_curvature=compile_curvature,
    )


def dense_ggn(problem: Problem) -> torch.Tensor:
    """``(1/B) Jᵀ blockdiag(H_ℓ,i) J`` with autograd's Jacobian and per-example output Hessians."""
    batch, theta = problem.full_batch, problem.theta.detach()
    jac = jacobian(lambda p: problem.outputs(batch.inputs, p), theta)  # (B, m, n)
    outputs = problem.outputs(batch.inputs).detach()
    ggn = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for i in range(len(batch)):
        target = batch.targets[i : i + 1]
        h_out = hessian(lambda z, t=target: problem.loss_fn.per_example(z.unsqueeze(0), t).sum(), outputs[i])
        ggn += jac[i].T @ h_out @ jac[i]
    return ggn / len(batch)


def dense_hessian(problem: Problem) -> torch.Tensor:
    batch = problem.full_batch

    def mean_loss(p: torch.Tensor) -> torch.Tensor:
        return problem.loss_fn(problem.outputs(batch.inputs, p), batch.targets)

    return hessian(mean_loss, problem.theta.detach())


# The CNN's dense matrices take longest: its classifier loss in the fast set, the other two in the slow set.
@pytest.mark.parametrize(
    ("model_name", "loss_name"),
    [
        (model, loss)
        if model != "cnn" or loss == "softmax_cross_entropy"
        else pytest.param(model, loss, marks=pytest.mark.slow)
        for model in ("mlp-sigmoid", "mlp-tanh", "mlp-relu", "cnn")
        for loss in LOSSES
    ],
)
def test_products_equal_dense_matrices(model_name, loss_name):
    problem = make_problem(model_name, loss_name)
    chunked = make_problem(model_name, loss_name, max_chunk=3)  # 7 examples in chunks of 3, 3, 1
    ggn, hess = dense_ggn(problem), dense_hessian(problem)
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(4, problem.n_params, dtype=torch.float64, generator=g)
    v = vectors[0]
    for p in (problem, chunked):
        batch = p.full_batch
        torch.testing.assert_close(ggn_vector_product(p, batch, vectors), vectors @ ggn.T, **TOL)
        torch.testing.assert_close(hessian_vector_product(p, batch, vectors), vectors @ hess.T, **TOL)
        torch.testing.assert_close(ggn_vector_product(p, batch, v), ggn @ v, **TOL)
        torch.testing.assert_close(hessian_vector_product(p, batch, v), hess @ v, **TOL)
        for operator, matrix in ((ggn_operator(p, batch), ggn), (hessian_operator(p, batch), hess)):
            torch.testing.assert_close(operator(v), matrix @ v, **TOL)
            torch.testing.assert_close(operator(vectors), vectors @ matrix.T, **TOL)
            torch.testing.assert_close(operator(v), matrix @ v, **TOL)  # reusable
    # The Gauss-Newton part differs from the Hessian unless the network is linear in θ.
    assert (ggn - hess).abs().max() > 1e-6 * hess.abs().max()


@pytest.mark.parametrize("loss_name", LOSSES)
def test_ggn_is_symmetric_positive_semidefinite(loss_name):
    problem = make_problem("mlp-tanh", loss_name)
    eye = torch.eye(problem.n_params, dtype=torch.float64)
    ggn = ggn_vector_product(problem, problem.full_batch, eye)  # rows G e_j = columns of G
    torch.testing.assert_close(ggn, ggn.T, **TOL)
    eigenvalues = torch.linalg.eigvalsh(ggn)
    assert eigenvalues.min() >= -1e-10 * eigenvalues.max()
    # rank ≤ B·(m or m−1 for softmax) < n: G is singular, so the test sees eigenvalues near zero.
    assert problem.n_params > N_EXAMPLES * N_OUT


def ggn_operator_product(problem, batch, vectors):
    return ggn_operator(problem, batch)(vectors)


def hessian_operator_product(problem, batch, vectors):
    return hessian_operator(problem, batch)(vectors)


OPERATOR_PRODUCTS = (ggn_operator_product, hessian_operator_product)


@pytest.mark.parametrize(
    "curvature_product", [ggn_vector_product, hessian_vector_product, *OPERATOR_PRODUCTS]
)
def test_batched_products_equal_loop_and_are_counted(curvature_product):
    problem = make_problem("cnn", "softmax_cross_entropy", max_chunk=4)  # groups of 1 vector per chunk
    vectors = torch.randn(3, problem.n_params, dtype=torch.float64)
    before = problem.counts.curvature
    batched = curvature_product(problem, problem.full_batch, vectors)
    built = N_EXAMPLES if curvature_product in OPERATOR_PRODUCTS else 0  # the operator's set-up
    assert problem.counts.curvature - before == 3 * N_EXAMPLES + built
    loop = torch.stack([curvature_product(problem, problem.full_batch, v) for v in vectors])
    torch.testing.assert_close(batched, loop, **TOL)


def test_products_at_another_point_leave_parameters_alone():
    problem = make_problem("mlp-tanh", "squared_error")
    theta0 = problem.theta.clone()
    other = theta0 + 0.3
    v = torch.randn_like(theta0)
    moved = ggn_vector_product(problem, problem.full_batch, v, other)
    assert torch.equal(problem.theta, theta0)
    problem.theta.copy_(other)
    torch.testing.assert_close(moved, ggn_vector_product(problem, problem.full_batch, v), **TOL)


# compiled: torch.compile for each product (slow set); the same check uncompiled stays in the fast set
@pytest.mark.parametrize("compile_curvature", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize(
    ("build", "product"), [(ggn_operator, ggn_vector_product), (hessian_operator, hessian_vector_product)]
)
def test_operator_keeps_the_point_it_was_built_at(build, product, compile_curvature):
    problem = make_problem("mlp-tanh", "squared_error", compile_curvature=compile_curvature)
    theta0 = problem.theta.clone()
    operator = build(problem, problem.full_batch)
    problem.theta.add_(0.1)
    v = torch.ones_like(theta0)
    expected = product(problem, problem.full_batch, v, theta0)
    torch.testing.assert_close(operator(v), expected, **TOL)
    assert not torch.allclose(expected, product(problem, problem.full_batch, v))


@pytest.mark.slow  # torch.compile of every product; test_products_equal_dense_matrices (uncompiled) is fast
def test_compiled_products_equal_dense_matrices():
    """``compile_curvature``: the torch.compile'd products (Hessian by forward-over-reverse) are the same
    matrices; compiled float64 kernels only reorder sums, so the float64 tolerance holds."""
    problem = make_problem("mlp-sigmoid", "sigmoid_cross_entropy", max_chunk=4, compile_curvature=True)
    ggn, hess = dense_ggn(problem), dense_hessian(problem)
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(3, problem.n_params, dtype=torch.float64, generator=g)
    v = vectors[0]
    batch = problem.full_batch
    torch._dynamo.reset()  # compile here, whatever earlier tests compiled
    counters.clear()
    for _ in range(2):  # the second round runs the cached compilations
        torch.testing.assert_close(ggn_vector_product(problem, batch, v), ggn @ v, **TOL)
        torch.testing.assert_close(ggn_operator(problem, batch)(vectors), vectors @ ggn.T, **TOL)
        torch.testing.assert_close(hessian_vector_product(problem, batch, v), hess @ v, **TOL)
        torch.testing.assert_close(hessian_operator(problem, batch)(vectors), vectors @ hess.T, **TOL)
    # G v and H v, one vector and a group of vectors, chunks of 4 and 3 examples: compiled, not eager
    assert counters["stats"]["unique_graphs"] >= 4


def squared_gradients_by_loop(problem: Problem) -> torch.Tensor:
    total = torch.zeros_like(problem.theta)
    for i in range(problem.n_train):
        example = problem.batch(problem.splits.train, slice(i, i + 1))
        total += problem.loss_and_grad(example)[1].square()  # mean over one example = its loss
    return total


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("model_name", ["mlp-sigmoid", "mlp-relu", "cnn", "shared-linear"])
def test_per_example_squared_gradients_match_loop(model_name, loss_name, monkeypatch):
    # a small budget makes the vmap route (cnn, shared-linear) work in pieces of 2 examples
    problem = make_problem(model_name, loss_name, max_chunk=5)
    monkeypatch.setattr(curvature, "PER_EXAMPLE_GRADIENT_BUDGET", 2 * problem.n_params)
    before = problem.counts.curvature
    result = per_example_squared_gradients(problem, problem.full_batch)
    assert problem.counts.curvature - before == N_EXAMPLES
    torch.testing.assert_close(result, squared_gradients_by_loop(problem), **TOL)


def test_per_layer_formula_is_used_only_where_it_holds():
    assert curvature._linear_layers(make_problem("mlp-tanh", "squared_error").model) is not None
    assert curvature._linear_layers(make_problem("cnn", "squared_error").model) is None
    problem = make_problem("shared-linear", "squared_error")
    layers = curvature._linear_layers(problem.model)
    total = torch.zeros_like(problem.theta)
    assert layers is not None
    batch = problem.full_batch
    assert curvature._add_linear_squared_gradients(problem, batch, problem.theta, layers, total) is None
    assert not total.any()


@pytest.mark.parametrize("model_name", ["mlp-sigmoid", "cnn", "shared-linear"])
def test_gradient_and_squared_gradients_in_one_pass_match_the_separate_ones(model_name):
    """HF's fused pass (per-layer formula for the MLP, separate routes for the others) returns the loss,
    gradient and squared per-example gradients of the separate functions and counts the same work."""
    problem = make_problem(model_name, "softmax_cross_entropy", max_chunk=3)  # chunks of 3, 3, 1
    batch = problem.full_batch
    before = (problem.counts.gradient, problem.counts.curvature)
    loss, grad, squares = curvature.loss_gradient_and_squared_gradients(problem, batch)
    assert (problem.counts.gradient - before[0], problem.counts.curvature - before[1]) == (7, 7)
    expected_loss, expected_grad = problem.loss_and_grad(batch)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    torch.testing.assert_close(grad, expected_grad, **TOL)
    torch.testing.assert_close(squares, squared_gradients_by_loop(problem), **TOL)
