"""The Problem's flat-parameter view, gradients and batching against direct autograd computations."""

from __future__ import annotations

import torch
from torch import nn

from ksd.data import DataSpec, Split, Splits
from ksd.losses import build_loss
from ksd.problem import Problem


def make_problem(n: int = 64, max_chunk: int = 10_000, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    splits = Splits(Split(x, y), Split(x[:0], y[:0]), Split(x[:16], y[:16]), DataSpec("toy", (5,), 3, "toy"))
    return Problem(model, build_loss("softmax_cross_entropy"), splits, autoencoder=False, max_chunk=max_chunk)


def test_parameters_are_views_of_theta():
    problem = make_problem()
    x = problem.splits.train.inputs[:4]
    before = problem.model(x)
    problem.theta.mul_(2.0)
    assert not torch.allclose(problem.model(x), before)
    assert torch.equal(problem.outputs(x), problem.outputs(x, problem.theta))
    first = next(problem.model.parameters())
    assert first.data_ptr() == problem.theta.data_ptr()


def test_loss_and_grad_matches_module_autograd():
    problem = make_problem()
    batch = problem.full_batch
    loss, grad = problem.loss_and_grad(batch)
    problem.model.zero_grad()
    reference = nn.functional.cross_entropy(problem.model(batch.inputs), batch.targets)
    reference.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in problem.model.parameters()])
    torch.testing.assert_close(loss, reference.detach())
    torch.testing.assert_close(grad, expected)


def test_chunked_evaluation_equals_single_pass():
    whole, chunked = make_problem(max_chunk=1000), make_problem(max_chunk=10)
    l1, g1 = whole.loss_and_grad(whole.full_batch)
    l2, g2 = chunked.loss_and_grad(chunked.full_batch)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(whole.loss(whole.full_batch), chunked.loss(chunked.full_batch))


def test_loss_at_other_point_does_not_move_parameters():
    problem = make_problem()
    theta0 = problem.theta.clone()
    other = theta0 + 0.1
    assert not torch.allclose(problem.loss(problem.full_batch, other), problem.loss(problem.full_batch))
    assert torch.equal(problem.theta, theta0)


def test_minibatches_cover_each_epoch_once_and_count_work():
    problem = make_problem(n=60)
    first = [problem.next_batch(20) for _ in range(3)]
    assert torch.cat([b.targets for b in first]).shape == (60,)
    seen = torch.unique(torch.cat([b.inputs for b in first]), dim=0)
    # the first epoch is a permutation too: its 60 distinct rows are the training set's 60 rows
    assert torch.equal(seen, torch.unique(problem.splits.train.inputs, dim=0))
    batches = [problem.next_batch(20) for _ in range(3)]
    rows = torch.cat([b.inputs for b in batches])
    assert torch.unique(rows, dim=0).shape[0] == 60  # a permutation: every example exactly once
    problem.loss_and_grad(batches[0])
    assert problem.epoch == 20 / 60


def test_random_batches_are_disjoint():
    problem = make_problem(n=50)
    a, b = problem.random_batches(20, 25)
    rows_a = {tuple(r.tolist()) for r in a.inputs}
    rows_b = {tuple(r.tolist()) for r in b.inputs}
    assert len(rows_a) == 20 and len(rows_b) == 25 and not rows_a & rows_b
