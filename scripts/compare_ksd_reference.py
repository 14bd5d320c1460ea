"""Our KSD beside pbrakel/ksd-theano, iteration by iteration, on the problem of scripts/ksd_reference.py.

Reads the trajectory JSON and the ``--full`` .npz that ``scripts/ksd_reference.py record`` wrote (bases,
gradients, reduced matrices, coefficients and steps of every reference iteration), runs our
``KrylovSubspaceDescent`` on the same problem in float64 with the same subsets (by index) and prints, per
iteration: the gradient's relative difference, the largest principal angle between the two bases'
spans, the reduced matrix's (after matching basis signs), the coefficients', ``φ(a*)`` of both and
the loss after the step of both. ``--isolated`` starts every iteration of ours from the reference's
``θ_n`` (so differences do not compound); by default ours runs on its own trajectory.

    python scripts/compare_ksd_reference.py --full FULL.npz [--run martens|none] [--isolated]
        [--variant reference|ours]   # reference: krylov_dim K+1, no previous step; ours: with it (K+2 rows)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from ksd.data import DataSpec, Split, Splits
from ksd.losses import build_loss
from ksd.models.autoencoder import autoencoder
from ksd.optim.ksd import KrylovSubspaceDescent
from ksd.problem import Problem

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "ksd_reference_trajectory.json"


def curves(n: int, d: int) -> np.ndarray:
    """The data of scripts/ksd_reference.py (a formula, no random generator)."""
    i, t = np.arange(n)[:, None], np.linspace(0.0, 1.0, d)[None, :]
    frequency, phase = 0.5 + 1.5 * np.modf(i * 0.6180339887)[0], np.modf(i * 0.4142135624)[0]
    return 0.5 + 0.4 * np.sin(2 * np.pi * (frequency * t + phase))


def reference_problem(spec: dict) -> Problem:
    """Our Problem on the recorded architecture, initial weights and data, in float64."""
    widths = spec["widths"]
    x = torch.from_numpy(curves(spec["n_examples"], widths[0]))
    model = autoencoder((widths[0],), widths[1 : len(widths) // 2 + 1], "sigmoid").double()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, recorded in zip(linears, spec["layers"], strict=True):
            layer.weight.copy_(torch.tensor(recorded["weight"], dtype=torch.float64))
            layer.bias.copy_(torch.tensor(recorded["bias"], dtype=torch.float64))
    empty = Split(x[:0], None)
    splits = Splits(Split(x, None), empty, empty, DataSpec("curves", (widths[0],), None, "formula"))
    return Problem(model, build_loss("sigmoid_cross_entropy"), splits, autoencoder=True)


def reference_config(settings: dict, preconditioner: bool, **overrides) -> KrylovSubspaceDescent.Config:
    """Our settings for the reference's: its K + 1 Krylov vectors and no previous step, its BFGS cap,
    subsets of the recorded size; BFGS run to convergence (the reference stops on scipy's gtol)."""
    ours = settings["ours"]
    values = dict(
        krylov_dim=ours["krylov_dim"],
        previous_step=ours["previous_step"],
        bfgs_max_iterations=ours["bfgs_max_iterations"],
        bfgs_tolerance=0.0,
        preconditioner=preconditioner,
        curvature_size=50,
        bfgs_size=50,
    )
    values.update(overrides)
    return KrylovSubspaceDescent.Config(**values)


class Recorder:
    """Wraps an optimizer's phases: fixed subsets by index; captures gradient, basis, Ĥ, BFGS result."""

    def __init__(self, optimizer: KrylovSubspaceDescent, subsets: dict):
        self.optimizer, self.subsets, self.records = optimizer, subsets, []
        problem, build, minimize = optimizer.problem, optimizer.build_basis, optimizer.minimize_in_subspace

        def draw_subsets():
            n = len(self.records)
            self.records.append({"theta": problem.theta.clone()})
            return tuple(
                problem.batch(problem.splits.train, torch.tensor(self.subsets[k][n]))
                for k in ("curvature", "bfgs")
            )

        def build_basis(grad, batch):
            subspace = build(grad, batch)
            self.records[-1].update(
                gradient=grad.clone(),
                basis=optimizer.basis[: subspace.size].clone(),
                reduced=subspace.curvature.clone(),
            )
            return subspace

        def minimize_in_subspace(subspace, batch):
            minimum = minimize(subspace, batch)
            self.records[-1].update(
                coefficients=minimum.coefficients.clone(),
                phi_before=minimum.loss_before,
                phi_after=minimum.loss_after,
                bfgs_iterations=minimum.iterations,
            )
            return minimum

        optimizer.draw_subsets = draw_subsets
        optimizer.build_basis = build_basis
        optimizer.minimize_in_subspace = minimize_in_subspace


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--full", type=Path, required=True, help=".npz of scripts/ksd_reference.py record --full"
    )
    parser.add_argument("--run", default="martens", choices=["martens", "none"])
    parser.add_argument("--isolated", action="store_true", help="every iteration from the reference's θ_n")
    parser.add_argument("--variant", default="reference", choices=["reference", "ours"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    doc, full = json.loads(args.data.read_text()), np.load(args.full)
    spec, run = doc["problem"], doc["runs"][args.run]
    ref = {k.split("/")[1]: full[k] for k in full.files if k.startswith(args.run + "/")}
    problem = reference_problem(spec)
    overrides = {} if args.variant == "reference" else {"previous_step": True}
    optimizer = KrylovSubspaceDescent(
        problem, reference_config(doc["settings"], args.run == "martens", **overrides)
    )
    recorder = Recorder(optimizer, spec["subsets"])
    print(f"run {args.run}, variant {args.variant}, {'isolated' if args.isolated else 'free'} iterations")
    print(
        " n | grad rel diff | max angle (rad) | Ĥ rel diff | a* rel diff | step rel diff "
        "| φ(a*) ours − ref | loss after: ref, ours − ref | BFGS its ours / ref f-calls"
    )
    for n in range(len(run["phi_after"])):
        if args.isolated:
            problem.theta.copy_(torch.from_numpy(ref["theta"][n]))
        optimizer.step()
        r = recorder.records[-1]
        V = r["basis"].numpy()
        P = ref["basis"][n]
        angles = scipy.linalg.subspace_angles(V.T, P.T) if V.shape == P.shape else [np.nan]
        signs = np.sign(np.sum(V[: len(P)] * P[: len(V)], axis=1)) if V.shape == P.shape else None
        rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
        H, a = r["reduced"].numpy(), r["coefficients"].numpy()
        H_diff = rel(H, signs[:, None] * ref["reduced"][n] * signs[None, :]) if signs is not None else np.nan
        a_diff = rel(a, signs * ref["coefficients"][n]) if signs is not None else np.nan
        step = (problem.theta - r["theta"]).numpy()
        loss_ref = run["loss"][n + 1]
        loss_ours = problem.loss(problem.full_batch).item()
        print(
            f"{n:2d} | {rel(r['gradient'].numpy(), ref['gradient'][n]):.1e} | {max(angles):.1e} "
            f"| {H_diff:.1e} "
            f"| {a_diff:.1e} | {rel(step, ref['step'][n]):.1e} | {r['phi_after'] - run['phi_after'][n]:+.1e} "
            f"| {loss_ref:.9f}, {loss_ours - loss_ref:+.1e} | {r['bfgs_iterations']} / "
            f"{run['bfgs_function_calls'][n]}"
        )
        if args.isolated:  # the reference's step from θ_n, for the loss after it
            problem.theta.copy_(torch.from_numpy(ref["theta"][n] + ref["step"][n]))


if __name__ == "__main__":
    main()
