"""Run pbrakel/ksd-theano's ``krylov_descent`` on a small fixed problem and record what it computes.

The reference (``pbrakel/ksd-theano``) is not part of this project and is never imported by it: this
script runs in a virtual environment of its own, beside a checkout of it (docs/ksd_vs_reference.md):

    python3 -m venv REF/.venv && REF/.venv/bin/pip install pytensor==3.0.7
    cd REF && python3 -m lib2to3 -w -n *.py                  # Python 2 → 3
    sed -i "s/dtype='float32'/dtype=theano.config.floatX/" optimizer.py   # lift its float32 casts
    REF/shim/theano/{__init__,tensor}.py                     # the two-file theano → pytensor shim
    OMP_NUM_THREADS=1 PYTHONPATH=REF/shim:REF REF/.venv/bin/python scripts/ksd_reference.py record \
        --reference REF --out tests/data/ksd_reference_trajectory.json [--full FULL.npz]

``record`` builds the problem (below), calls the reference's ``optimizer.krylov_descent`` unchanged and
captures, by wrapping the functions it calls (``get_subspace``, ``floor_matrix``,
``scipy.optimize.fmin_bfgs``), each iteration's gradient, Krylov basis, reduced matrix, BFGS result and
step; ``--full`` also keeps the bases and gradients (for ``scripts/compare_ksd_reference.py``).
``time`` prints the seconds of each reference iteration on a given problem size as JSON (used by
``scripts/bench_ksd_reference.py``).

Problem: a 20-10-4-10-20 autoencoder (logistic hidden units, linear code layer, logistic outputs), loss
the sigmoid cross-entropy summed over the 20 outputs and averaged over the examples (ksd-run's
``sigmoid_cross_entropy``; the reference's CURVES script sums over its batch of 1000 instead, which
changes only the scale, but scipy's BFGS is not scale invariant, so both codes get the same mean);
200 deterministic "curves" ``x_ij = 0.5 + 0.4 sin(2π (f_i t_j + p_i))``; initial weights N(0, 1/fan_in),
biases 0 (NumPy seed 0); the gradient on all 200 examples and, per iteration, a curvature and a BFGS
subset of 50 drawn by index (independently, so they may overlap, as the reference's ``Dataset`` does).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTHS = [20, 10, 4, 10, 20]
N_EXAMPLES, SUBSET, ITERATIONS = 200, 50, 8
SPACE_SIZE = 9  # the reference's K: its basis has K + 1 = 10 Krylov vectors (no previous step)
MAXITER = 30  # the reference's maxfun (scipy's maxiter), its CURVES setting
RUNS = {"martens": "martens", "none": None}  # the reference's preconditioning argument


def layer_types(widths: list[int]) -> list[str]:
    """Logistic units but the linear code layer (the middle width); the last entry is the output layer,
    whose logits the loss takes."""
    return ["linear" if i == len(widths) // 2 - 1 else "logistic" for i in range(len(widths) - 1)]


def curves(n: int, d: int) -> np.ndarray:
    """``n`` deterministic curves of ``d`` points in (0.1, 0.9): no random generator involved."""
    i, t = np.arange(n)[:, None], np.linspace(0.0, 1.0, d)[None, :]
    frequency, phase = 0.5 + 1.5 * np.modf(i * 0.6180339887)[0], np.modf(i * 0.4142135624)[0]
    return 0.5 + 0.4 * np.sin(2 * np.pi * (frequency * t + phase))


def problem(
    widths: list[int] = WIDTHS,
    n: int = N_EXAMPLES,
    subset: int = SUBSET,
    iterations: int = ITERATIONS,
    seed: int = 0,
) -> dict:
    """Initial weights (torch layout: ``W`` is out × in), data and the subsets of every iteration."""
    rng = np.random.default_rng(seed)
    layers = [
        {"weight": rng.normal(0, 1 / np.sqrt(m), (k, m)).tolist(), "bias": [0.0] * k}
        for m, k in itertools.pairwise(widths)
    ]
    subsets = {
        "curvature": [sorted(rng.choice(n, subset, replace=False).tolist()) for _ in range(iterations)],
        "bfgs": [sorted(rng.choice(n, subset, replace=False).tolist()) for _ in range(iterations)],
    }
    return {"widths": widths, "n_examples": n, "layers": layers, "subsets": subsets}


class FixedSubsets:
    """The reference's ``Dataset`` interface (``iterate``, ``update``, ``number_batches``) over subsets fixed
    by index: ``update()`` moves to the next iteration's subset (``krylov_descent`` calls it at the start
    of every iteration), ``iterate`` yields it as one batch."""

    def __init__(self, data: np.ndarray, indices: list[list[int]] | None):
        self.data, self.indices, self.position, self.number_batches = data, indices, -1, 1

    def update(self) -> None:
        self.position += 1

    def iterate(self, update: bool = True):
        yield [self.data if self.indices is None else self.data[self.indices[self.position]]]
        if update:
            self.update()


def build_reference_model(reference, spec: dict, floatx: str = "float64"):
    """The reference's ``optimizer.Model`` on our architecture and initial weights (its ``DAE`` draws its
    own float32 weights, so the same network is written here with its ``DAE.t_forward`` and
    ``t_stable_ce``)."""
    import theano
    import theano.tensor as T
    from autoencoder import DAE

    network = DAE.__new__(DAE)
    network.layer_types = layer_types(spec["widths"])
    network.weights = [
        theano.shared(np.asarray(layer["weight"], floatx).T.copy()) for layer in spec["layers"]
    ]
    network.biases = [theano.shared(np.asarray(layer["bias"], floatx)) for layer in spec["layers"]]
    network.parameters = network.weights + network.biases
    x = T.matrix("x", dtype=floatx)
    _, s = network.t_forward(x, return_linear=True)
    cost = network.t_stable_ce(s, x).sum(axis=1).mean()
    return reference.Model(network.parameters, [x], s, [cost]), network


def to_torch_order(network, flat: np.ndarray) -> np.ndarray:
    """A vector in the reference's order (all W (in × out), then all b) in ksd-run's (W (out × in), b per
    layer)."""
    parts, position = {}, 0
    for kind, params in (("W", network.weights), ("b", network.biases)):
        for i, p in enumerate(params):
            shape = p.get_value().shape
            size = int(np.prod(shape))
            parts[kind, i] = flat[position : position + size].reshape(shape)
            position += size
    return np.concatenate(
        [
            np.concatenate([parts["W", i].T.ravel(), parts["b", i].ravel()])
            for i in range(len(network.weights))
        ]
    )


def run_reference(reference_path: Path, spec: dict, preconditioning, iterations: int, capture: bool = True):
    """Run ``krylov_descent`` for ``iterations`` iterations; return the captured records (or the
    iteration times when ``capture`` is False)."""
    sys.path.insert(0, str(reference_path))
    import optimizer as reference
    import scipy.optimize

    data = curves(spec["n_examples"], spec["widths"][0])
    model, network = build_reference_model(reference, spec)
    flat = lambda: np.concatenate([p.get_value().ravel() for p in model.p])  # noqa: E731
    records: list[dict] = []
    stamps: list[float] = []
    originals = reference.get_subspace, reference.floor_matrix, scipy.optimize.fmin_bfgs

    def get_subspace(matvec, b, K, precon, d_prev):
        stamps.append(time.perf_counter())
        P, H = originals[0](matvec, b, K, precon, d_prev)
        if capture:
            records.append({"theta": flat(), "gradient": -b, "basis": P.T.copy(), "reduced": H.copy()})
        return P, H

    def floor_matrix(H, eps):
        floored = originals[1](H, eps)
        if capture:
            records[-1]["floored"] = floored.copy()
        return floored

    def fmin_bfgs(f, x0, fprime, **kwargs):
        calls = {"f": 0}

        def counted(a):
            calls["f"] += 1
            return f(a)

        result = originals[2](counted, x0, fprime, **kwargs)
        if capture:
            records[-1].update(phi_before=f(x0), bfgs=result, calls=calls["f"])
        return result

    reference.get_subspace, reference.floor_matrix, scipy.optimize.fmin_bfgs = (
        get_subspace,
        floor_matrix,
        fmin_bfgs,
    )
    gradient_set = FixedSubsets(data, None)
    curvature_set = FixedSubsets(data, spec["subsets"]["curvature"])
    bfgs_set = FixedSubsets(data, spec["subsets"]["bfgs"])
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        reference.krylov_descent(
            model,
            gradient_set,
            curvature_set,
            bfgs_set,
            iterations=iterations,
            space_size=SPACE_SIZE,
            matrix_type="G",
            preconditioning=preconditioning,
            maxfun=MAXITER,
        )
    stamps.append(time.perf_counter())
    final = flat()
    reference.get_subspace, reference.floor_matrix, scipy.optimize.fmin_bfgs = originals
    if not capture:
        return np.diff(stamps[:-1]).tolist()  # iteration n: from its basis to the next one's
    loss = lambda theta: model.f_cost(data)[0]  # noqa: E731  (at the current parameters)
    out = []
    for n, record in enumerate(records):
        theta_after = records[n + 1]["theta"] if n + 1 < len(records) else final
        step = theta_after - record["theta"]
        b_opt, phi_after, g_opt, _, function_calls, gradient_calls, warnflag = record["bfgs"]
        L = np.linalg.cholesky(record["floored"])
        out.append(
            {
                **{k: record[k] for k in ("theta", "gradient", "basis", "reduced", "floored", "phi_before")},
                "coefficients": np.linalg.solve(L.T, b_opt),  # a* in the basis P: step = Pᵀ… = P L⁻ᵀ b*
                "phi_after": float(phi_after),
                "gradient_norm_whitened": float(np.linalg.norm(g_opt)),
                "bfgs_function_calls": int(function_calls),
                "bfgs_gradient_calls": int(gradient_calls),
                "bfgs_warnflag": int(warnflag),
                "step": step,
            }
        )
    for p, value in zip(model.p, model.flat_to_list(final)):
        p.set_value(value)
    final_loss = float(loss(None))
    for record in out:
        for k in ("theta", "gradient", "step"):
            record[k] = to_torch_order(network, record[k])
        record["basis"] = np.stack([to_torch_order(network, v) for v in record["basis"]])
    for n, record in enumerate(out):
        for p, value in zip(model.p, model.flat_to_list(records[n]["theta"])):
            p.set_value(value)
        record["loss"] = float(loss(None))
    return out, final_loss


def record(args: argparse.Namespace) -> None:
    spec = problem()

    def git(*words: str) -> str:
        return subprocess.run(
            ["git", "-C", str(args.reference), *words], capture_output=True, text=True
        ).stdout.strip()

    # the upstream commit the converted checkout started from (the conversion may be local commits on it)
    commit = git("rev-parse", "--short", "origin/HEAD") or git("rev-parse", "--short", "HEAD")
    import pytensor
    import scipy

    doc = {
        "produced_by": (
            f"scripts/ksd_reference.py record: pbrakel/ksd-theano at {commit} (optimizer.krylov_descent, "
            "get_subspace, floor_matrix; converted by lib2to3, its float32 casts lifted to floatX) "
            f"on PyTensor "
            f"{pytensor.__version__}, NumPy {np.__version__}, SciPy {scipy.__version__}, float64, through a "
            "two-file theano shim"
        ),
        "settings": {
            "space_size": SPACE_SIZE,
            "matrix_type": "G",
            "maxfun": MAXITER,
            "ours": {"krylov_dim": SPACE_SIZE + 1, "previous_step": False, "bfgs_max_iterations": MAXITER},
        },
        "problem": {
            **spec,
            "data": "x_ij = 0.5 + 0.4 sin(2π (f_i t_j + p_i)), t_j = j/19, "
            "f_i = 0.5 + 1.5 frac(0.6180339887 i), "
            "p_i = frac(0.4142135624 i), i < 200, j < 20 (scripts/ksd_reference.py curves)",
            "loss": (
                "sigmoid cross-entropy on the output logits, summed over the 20 outputs, mean over examples"
            ),
            "activations": layer_types(WIDTHS),
        },
        "runs": {},
    }
    full = {}
    for name, preconditioning in RUNS.items():
        out, final_loss = run_reference(args.reference, spec, preconditioning, ITERATIONS)
        doc["runs"][name] = {
            "preconditioning": preconditioning,
            "loss": [r["loss"] for r in out] + [final_loss],
            "gradient_norm": [float(np.linalg.norm(r["gradient"])) for r in out],
            "first_gradient": out[0]["gradient"].tolist(),
            "reduced_eigenvalues": [np.linalg.eigvalsh(r["reduced"]).tolist() for r in out],
            "phi_before": [float(r["phi_before"]) for r in out],
            "phi_after": [r["phi_after"] for r in out],
            "step_norm": [float(np.linalg.norm(r["step"])) for r in out],
            "bfgs_function_calls": [r["bfgs_function_calls"] for r in out],
            "bfgs_gradient_calls": [r["bfgs_gradient_calls"] for r in out],
            "bfgs_warnflag": [r["bfgs_warnflag"] for r in out],
            "thetas": [r["theta"].tolist() for r in out[1:]],  # θ_1 … θ_{N−1} (θ_0 is the initial weights)
            "final_theta": (out[-1]["theta"] + out[-1]["step"]).tolist(),
        }
        for k in ("theta", "gradient", "basis", "reduced", "floored", "coefficients", "step"):
            full[f"{name}/{k}"] = np.stack([r[k] for r in out])
        print(name, "loss", " ".join(f"{v:.6f}" for v in doc["runs"][name]["loss"]))
    text = json.dumps(doc, indent=1)  # then every list of numbers on one line
    text = re.sub(r"\[[-0-9.eE,\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    Path(args.out).write_text(text + "\n")
    if args.full:
        np.savez(args.full, **full)


def timing(args: argparse.Namespace) -> None:
    spec = problem(
        widths=[int(w) for w in args.widths.split(",")],
        n=args.examples,
        subset=args.subset,
        iterations=args.iterations,
    )
    times = run_reference(args.reference, spec, RUNS[args.preconditioning], args.iterations, capture=False)
    print(json.dumps({"seconds": times}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument(
        "--reference", type=Path, required=True, help="checkout of pbrakel/ksd-theano (converted)"
    )
    rec.add_argument("--out", default="tests/data/ksd_reference_trajectory.json")
    rec.add_argument("--full", help="also write bases, gradients and steps to this .npz")
    tim = sub.add_parser("time")
    tim.add_argument("--reference", type=Path, required=True)
    tim.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    tim.add_argument("--examples", type=int, default=N_EXAMPLES)
    tim.add_argument("--subset", type=int, default=SUBSET)
    tim.add_argument("--iterations", type=int, default=4)
    tim.add_argument("--preconditioning", default="martens", choices=list(RUNS))
    args = parser.parse_args()
    record(args) if args.command == "record" else timing(args)


if __name__ == "__main__":
    main()
