"""Our KSD against pbrakel/ksd-theano's ``krylov_descent``, run on PyTensor in float64
(docs/ksd_vs_reference.md).

``data/ksd_reference_trajectory.json`` holds what the reference computed on a 20-10-4-10-20 autoencoder
(``scripts/ksd_reference.py record``; PyTensor is not needed here): 8 iterations from the recorded
weights, with the recorded curvature and BFGS subsets of each iteration (by index), once with its
"martens" preconditioner and once without. Ours runs the reference's variant: ``krylov_dim = K + 1``
Krylov vectors and ``previous_step: false`` (the reference computes the previous step but does not keep
it), its BFGS cap, BFGS run until the line search finds no decrease.

Tolerances (measured with ``scripts/compare_ksd_reference.py``): from the same θ_n the gradient, the
Krylov subspace (principal angles ≤ 1.4e-13) and the reduced matrix (≤ 9e-14 relative) agree to
rounding, so they are checked at 1e-10. The step does not: scipy's BFGS in the reference stops when
the ∞-norm of its (whitened) subspace gradient is below 1e-5, ours goes on until no decrease, so the
coefficients differ by the reference's unconverged remainder, 8e-7 … 3.3e-5 relative (checked at 2e-4),
and our φ(a*) is never above the reference's by more than rounding (ours − ref ∈ [−1.5e-10, −2e-12]).
Along our own trajectory those remainders compound, about 2.5× per iteration: after 8 iterations the
training loss differs by at most 1e-5 (1e-6 relative), checked at 1e-5 relative; keeping the previous
step in the basis (ksd-run's default, the paper's) departs by 1.4e-2 in the loss at the second
iteration and by ≥ 1e-2 at every later one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ksd.data import DataSpec, Split, Splits
from ksd.losses import build_loss
from ksd.models.autoencoder import autoencoder
from ksd.optim.ksd import KrylovSubspaceDescent
from ksd.problem import Problem

REFERENCE = json.loads((Path(__file__).parent / "data" / "ksd_reference_trajectory.json").read_text())
RUNS = {"martens": True, "none": False}  # the reference's preconditioning → ours `preconditioner`


def as_tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def curves(n: int, d: int) -> np.ndarray:
    """The recorded problem's data (scripts/ksd_reference.py: a formula, no random generator)."""
    i, t = np.arange(n)[:, None], np.linspace(0.0, 1.0, d)[None, :]
    frequency, phase = 0.5 + 1.5 * np.modf(i * 0.6180339887)[0], np.modf(i * 0.4142135624)[0]
    return 0.5 + 0.4 * np.sin(2 * np.pi * (frequency * t + phase))


def reference_problem() -> Problem:
    spec = REFERENCE["problem"]
    widths = spec["widths"]
    x = torch.from_numpy(curves(spec["n_examples"], widths[0]))
    model = autoencoder((widths[0],), widths[1 : len(widths) // 2 + 1], "sigmoid").double()
    with torch.no_grad():
        linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        for layer, recorded in zip(linears, spec["layers"], strict=True):
            layer.weight.copy_(torch.tensor(recorded["weight"], dtype=torch.float64))
            layer.bias.copy_(torch.tensor(recorded["bias"], dtype=torch.float64))
    empty = Split(x[:0], None)
    splits = Splits(Split(x, None), empty, empty, DataSpec("curves", (widths[0],), None, "formula"))
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=True)


def reference_ksd(problem: Problem, preconditioner: bool, **overrides) -> KrylovSubspaceDescent:
    """Ours with the reference's settings, drawing the recorded subsets of each iteration by index."""
    settings = REFERENCE["settings"]["ours"]
    config = KrylovSubspaceDescent.Config(
        **{
            **settings,
            "bfgs_tolerance": 0.0,
            "preconditioner": preconditioner,
            "curvature_size": 50,
            "bfgs_size": 50,
            **overrides,
        }
    )
    optimizer = KrylovSubspaceDescent(problem, config)
    subsets = REFERENCE["problem"]["subsets"]

    def draw_subsets():
        n = optimizer.state["iteration"]
        return tuple(
            problem.batch(problem.splits.train, torch.tensor(subsets[k][n])) for k in ("curvature", "bfgs")
        )

    optimizer.draw_subsets = draw_subsets
    return optimizer


def captured_step(optimizer: KrylovSubspaceDescent) -> dict:
    """One ``step()``, with the gradient, the reduced matrix and φ of the subspace BFGS it computed."""
    record, build, minimize = {}, optimizer.build_basis, optimizer.minimize_in_subspace

    def build_basis(grad, batch):
        subspace = build(grad, batch)
        record.update(gradient=grad.clone(), reduced=subspace.curvature.clone())
        return subspace

    def minimize_in_subspace(subspace, batch):
        minimum = minimize(subspace, batch)
        record.update(phi_before=minimum.loss_before, phi_after=minimum.loss_after)
        return minimum

    optimizer.build_basis, optimizer.minimize_in_subspace = build_basis, minimize_in_subspace
    try:
        record.update(optimizer.step())
    finally:
        del optimizer.build_basis, optimizer.minimize_in_subspace
    return record


@pytest.mark.parametrize("run", RUNS)
def test_each_iteration_from_the_reference_point_takes_the_reference_step(run):
    """From every recorded θ_n: the same gradient and reduced matrix (to rounding), the same step (to the
    reference's BFGS stopping remainder), and a subspace minimum at least as low."""
    reference = REFERENCE["runs"][run]
    thetas = [None, *reference["thetas"], reference["final_theta"]]
    problem = reference_problem()
    optimizer = reference_ksd(problem, RUNS[run])
    for n in range(len(reference["phi_after"])):
        if n:
            problem.theta.copy_(as_tensor(thetas[n]))
        start = problem.theta.clone()
        record = captured_step(optimizer)
        if n == 0:
            torch.testing.assert_close(
                record["gradient"], as_tensor(reference["first_gradient"]), rtol=1e-10, atol=1e-14
            )
        assert record["gradient"].norm().item() == pytest.approx(reference["gradient_norm"][n], rel=1e-10)
        eigenvalues = torch.linalg.eigvalsh(record["reduced"])
        expected = as_tensor(reference["reduced_eigenvalues"][n])
        torch.testing.assert_close(eigenvalues, expected, rtol=0, atol=1e-10 * expected.abs().max().item())
        assert record["phi_before"] == pytest.approx(reference["phi_before"][n], rel=1e-12)
        assert record["phi_after"] <= reference["phi_after"][n] + 1e-9
        step, expected_step = problem.theta - start, as_tensor(thetas[n + 1]) - start
        assert (step - expected_step).norm() <= 2e-4 * expected_step.norm(), n


@pytest.mark.parametrize("run", RUNS)
def test_follows_the_reference_trajectory(run):
    """Eight iterations on our own trajectory: the training loss before every step and after the last one
    within 1e-5 (relative) of the reference's."""
    reference = REFERENCE["runs"][run]
    problem = reference_problem()
    optimizer = reference_ksd(problem, RUNS[run])
    losses = []
    for _ in reference["phi_after"]:
        stats = optimizer.step()
        assert stats["basis_size"] == REFERENCE["settings"]["space_size"] + 1  # its K + 1 Krylov vectors
        losses.append(stats["loss"].item())
    losses.append(problem.loss(problem.full_batch).item())
    np.testing.assert_allclose(losses, reference["loss"], rtol=1e-5, atol=0)


def test_keeping_the_previous_step_departs_from_the_reference():
    """ksd-run's default basis (the previous step as the last row; the reference discards it): the first
    iteration, which has no previous step, is the reference's; every later loss is ≥ 1e-3 away."""
    reference = REFERENCE["runs"]["martens"]
    problem = reference_problem()
    optimizer = reference_ksd(problem, True, previous_step=True)
    losses = []
    for _ in reference["phi_after"]:
        losses.append(optimizer.step()["loss"].item())
    losses.append(problem.loss(problem.full_batch).item())
    assert losses[1] == pytest.approx(reference["loss"][1], rel=1e-5)
    departures = np.abs(np.array(losses[2:]) / np.array(reference["loss"][2:]) - 1)
    assert departures.min() > 1e-3, departures


@pytest.mark.parametrize("subsets", ["disjoint", "independent"])
def test_subsets_are_disjoint_or_drawn_independently_as_the_reference_does(subsets):
    """``subsets: independent`` draws the curvature and BFGS subsets each on its own, so they overlap at
    times (the reference reshuffles its two data sets independently); ``disjoint`` never overlaps."""
    problem = reference_problem()
    problem.splits.train.inputs[:, 0] = torch.arange(
        problem.n_train, dtype=torch.float64
    )  # an id per example
    optimizer = KrylovSubspaceDescent(
        problem, KrylovSubspaceDescent.Config(curvature_size=50, bfgs_size=50, subsets=subsets)
    )
    overlaps = []
    for _ in range(20):
        curvature, bfgs = optimizer.draw_subsets()
        assert len(curvature) == len(bfgs) == 50
        ids = [set(batch.inputs[:, 0].tolist()) for batch in (curvature, bfgs)]
        assert all(len(i) == 50 for i in ids)
        overlaps.append(len(ids[0] & ids[1]))
    assert (max(overlaps) > 0) == (subsets == "independent")  # 50 of 200: ≈ 12.5 shared examples expected
