"""Run pbrakel/ksd-theano's ``krylov_descent`` on a small fixed problem and record what it computes, or
on the problem of a ksd-run configuration (CURVES, ``curves``) for a wall-time budget.

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

What was changed in the reference: nothing in what it computes. ``lib2to3`` turned its ``print``
statements into calls and its ``map(...)`` into lists (``Model.sizes``, the gradient lists, ``floor_matrix``,
``floor_vector``). The ``sed`` turns ``dtype='float32'`` into ``dtype=theano.config.floatX`` (float64 here)
in ``optimizer.py`` at: ``Model.quick_cost`` (adding the trial step to the shared parameters and removing
it), ``krylov_descent``'s ``get_grad_cost`` (the same, and its gradient accumulator ``np.zeros``),
``matvec_wrapped`` (the vector of every curvature product), the ``'jacobi'`` preconditioner's random
signs, and the parameter update at the end of an iteration. Its ``autoencoder.DAE`` draws float32 weights
and ``train_dae_curves.py`` casts the data to float32: neither is used (:func:`reference_network` fills a
``DAE`` with our weights in float64; the data are cast to float64 here).

CURVES, the ``ksd_curves`` experiment (issue 21), in two steps, because the reference's venv has no torch:

    # 1. ksd-run's venv: the start of `ksd-run -m +experiment=ksd_curves scale=cpu_long optimizer=ksd seed=0`
    OMP_NUM_THREADS=1 .venv/bin/python scripts/ksd_reference.py curves-start --out START.npz [OVERRIDES]
    # 2. the reference's venv: its krylov_descent from there, 720 s (run.max_seconds) of training
    OMP_NUM_THREADS=1 PYTHONPATH=REF/shim:REF REF/.venv/bin/python scripts/ksd_reference.py curves \
        --reference REF --start START.npz --out results/ksd_reference_ksd_curves_cpu_long.csv

``curves-start`` composes the configuration as ``ksd-run -m`` composes the job (the experiment's grid for
the optimizer included: at ``cpu_long`` subsets of 2,500 and ``run.eval_every=1``) and builds it with
``ksd.runner.prepare``, so the .npz holds exactly the initial weights ``ksd-run`` starts from (the sparse
initialisation for that seed, in its float32, stored as float64), the training split after the validation
carve (19,000 cases), the validation and test splits as ksd-run evaluates them, and the settings.

``curves`` builds the same network (logistic units, linear code layer, logistic outputs) in float64 with
the cost ksd-run trains on (the cross-entropy summed over pixels, mean over cases; ``--cost-scale 1000``
gives the scale of the reference's own CURVES script, which sums over its batches of 1000; scipy's BFGS
stop ``gtol = 1e-5`` and first step depend on it) and calls ``krylov_descent`` unchanged with our
settings mapped to its arguments: ``space_size = krylov_dim − 1`` (its basis is ``space_size + 1`` Krylov
vectors and drops the previous step: the same 20 Krylov vectors as ours, which adds the previous step),
``matrix_type 'G'`` for ``curvature: ggn``, ``preconditioning 'martens'`` for ``preconditioner: true``
(exponent 0.75 and floor 1e-4 are its fixed values), ``maxfun = bfgs_max_iterations`` (40, scipy's
``maxiter``). The gradient set is all training cases in batches of ``--batch-size`` (1000); the curvature
and BFGS sets are the reference's ``Dataset``: ``--subset-batches`` (5) batches of a fresh permutation of
the training set each, redrawn independently every iteration (so they may overlap; NumPy generator
``--seed``). The gradient set's ``iterate`` is called once per iteration, first thing: there the clock is
paused, the parameters are evaluated (outside the clock) and the budget is checked (``--seconds``,
default ``run.max_seconds``; ``--iterations``), as ksd-run's engine does between steps. One CSV row per
iteration boundary: ``method`` (the figure label, so ``make figures`` draws it dashed beside our KSD in
the ``ksd_curves_cpu_long`` figure), ``source``, ``iteration``, ``wall_time`` (training seconds),
``train_loss``/``train_error`` on the first ``run.eval_train_size`` training cases, ``val_*`` and ``test_*``
(ksd-run's metrics: cross-entropy, and squared reconstruction error ``Σ_j (σ(z_j) − x_j)²``, both summed
over pixels and averaged over cases), and scipy's counts, ``warnflag`` and final ``φ`` of the iteration's
BFGS. ``--train-size`` and ``--subset-size`` shrink the problem for smoke tests.
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


def reference_network(spec: dict, floatx: str = "float64"):
    """The reference's ``autoencoder.DAE`` with our architecture and initial weights (its constructor draws
    its own float32 weights, so the object is filled in here; its ``t_forward`` and ``t_stable_ce`` are
    used as they are). ``spec["layers"]`` holds each layer's ``weight`` (torch layout, out × in) and
    ``bias``; ``spec["layer_types"]`` overrides the types :func:`layer_types` derives from the widths."""
    import theano
    from autoencoder import DAE

    network = DAE.__new__(DAE)
    network.layer_types = spec.get("layer_types") or layer_types(spec["widths"])
    network.weights = [
        theano.shared(np.asarray(layer["weight"], floatx).T.copy()) for layer in spec["layers"]
    ]
    network.biases = [theano.shared(np.asarray(layer["bias"], floatx)) for layer in spec["layers"]]
    network.parameters = network.weights + network.biases
    return network


def build_reference_model(reference, spec: dict, floatx: str = "float64"):
    """The reference's ``optimizer.Model`` on our architecture and initial weights
    (:func:`reference_network`), loss ksd-run's mean over examples of the summed cross-entropy."""
    import theano.tensor as T

    network = reference_network(spec, floatx)
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


# ---------------------------------------------------------------------------------------------- CURVES
#: The run whose start ``curves-start`` writes by default: our KSD of ``ksd_curves`` at ``scale=cpu_long``.
CURVES_RUN = ["+experiment=ksd_curves", "scale=cpu_long", "optimizer=ksd", "seed=0"]
CURVES_COLUMNS = [
    "method", "source", "iteration", "wall_time", "train_loss", "train_error", "val_loss", "val_error",
    "test_loss", "test_error", "bfgs_function_calls", "bfgs_gradient_calls", "bfgs_warnflag", "bfgs_phi",
]  # fmt: skip


def curves_start(args: argparse.Namespace) -> None:
    """(ksd-run's venv) The start of a ksd-run configuration as an .npz for :func:`curves_run`: the data
    splits, the initial weights and the settings, composed as ``ksd-run -m`` composes the job (the
    experiment's per-optimizer grid included, so ``ksd_curves`` at ``cpu_long`` gets its subsets of 2,500)
    and built by :func:`ksd.runner.prepare`, so that the weights are exactly those ``ksd-run`` starts from."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from hydra_plugins.ksd_grid_sweeper.grid_sweeper import grid_jobs
    from ksd.config import validate
    from ksd.figures import label
    from ksd.runner import REGISTRIES, prepare

    overrides = args.overrides or CURVES_RUN
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        sweeper = compose("config", overrides, return_hydra_config=True).hydra.sweeper
        grids = OmegaConf.to_container(sweeper.grids, resolve=True) if sweeper.get("grids") else {}
        jobs = grid_jobs(OverridesParser.create().parse_overrides(overrides), grids, sweeper.grid_key)
        if len(jobs) != 1:
            raise SystemExit(f"curves-start: the overrides make {len(jobs)} jobs; pin the grid to one")
        (job,) = jobs
        cfg = compose("config", job)
    settings = validate(cfg, REGISTRIES)
    o, m = settings.optimizer, settings.model
    if (
        o.name != "ksd"
        or m.name != "autoencoder"
        or m.activation != "sigmoid"
        or (m.loss or "") not in ("", "sigmoid_cross_entropy")
    ):
        raise SystemExit(
            "curves-start: needs optimizer=ksd on an autoencoder of logistic units (cross-entropy)"
        )
    if o.weight_decay != 0 or o.batch_size is not None:
        raise SystemExit("curves-start: the reference has no weight decay and takes the gradient on all data")
    torch.set_num_threads(1)
    problem, _, lines = prepare(settings)
    modules = list(problem.model.modules())[1:]  # Flatten, Linear, Sigmoid, …
    linears = [i for i, mod in enumerate(modules) if isinstance(mod, torch.nn.Linear)]
    types = [
        "logistic" if i == linears[-1] or isinstance(modules[i + 1], torch.nn.Sigmoid) else "linear"
        for i in linears
    ]
    splits = problem.splits
    arrays = {
        name: getattr(splits, name).inputs.flatten(1).cpu().numpy() for name in ("train", "val", "test")
    }
    for k, i in enumerate(linears):
        arrays[f"weight_{k}"] = modules[i].weight.detach().double().cpu().numpy()
        arrays[f"bias_{k}"] = modules[i].bias.detach().double().cpu().numpy()
    meta = {
        "overrides": job,
        "method": label(o.name),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "run": {k: getattr(settings.run, k) for k in ("max_seconds", "eval_train_size", "max_chunk")},
        "dtype": settings.dtype,
        "seed": settings.seed,
        "layer_types": types,
        "widths": [modules[linears[0]].in_features] + [modules[i].out_features for i in linears],
        "n_params": problem.n_params,
        "notes": lines,
        "torch": torch.__version__,
    }
    np.savez_compressed(args.out, settings=json.dumps(meta), **arrays)
    sizes = ", ".join(f"{k} {len(arrays[k])}" for k in ("train", "val", "test"))
    print(
        f"curves-start: ksd-run {' '.join(job)}: {sizes}, {problem.n_params:,} parameters; wrote {args.out}"
    )


class Clock:
    """Training seconds: counts only between :meth:`start` and :meth:`pause` (evaluations stay outside)."""

    def __init__(self) -> None:
        self.elapsed, self.started = 0.0, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def pause(self) -> None:
        self.elapsed += time.perf_counter() - self.started


class Budget(Exception):
    """Raised at the start of an iteration once the budget is spent: ends ``krylov_descent``."""


class GradientSet:
    """The reference's gradient ``Dataset``: all training data in ``batch_size`` batches. ``krylov_descent``
    iterates over it exactly once per iteration, first thing (its BFGS passes its own set), so its
    ``iterate`` starts with ``at_iteration`` (evaluation and the budget check, outside the clock)."""

    def __init__(self, data: np.ndarray, batch_size: int, at_iteration):
        if len(data) % batch_size:
            raise SystemExit(f"the {len(data)} training cases are not whole batches of {batch_size}")
        self.data, self.batch_size, self.at_iteration = data, batch_size, at_iteration
        self.number_batches = len(data) // batch_size

    def update(self) -> None:
        pass

    def iterate(self, update: bool = True):
        self.at_iteration()
        for i in range(self.number_batches):
            yield [self.data[i * self.batch_size : (i + 1) * self.batch_size]]


class RandomSubset:
    """The reference's curvature or BFGS ``Dataset`` (``train_dae_curves.Dataset``): the first
    ``number_batches`` batches of a permutation of the training set, redrawn by ``update()``, which
    ``krylov_descent`` calls at the start of every iteration. Two of them, drawn one after the other from
    the same generator, may overlap, as the reference's do."""

    def __init__(self, data: np.ndarray, size: int, number_batches: int, rng: np.random.Generator):
        if size % number_batches:
            raise SystemExit(f"a subset of {size} is not {number_batches} whole batches")
        self.data, self.rng, self.number_batches = data, rng, number_batches
        self.batch_size, self.indices = size // number_batches, None

    def update(self) -> None:
        self.indices = self.rng.permutation(len(self.data))

    def iterate(self, update: bool = True):
        for i in range(self.number_batches):
            yield [self.data[self.indices[i * self.batch_size : (i + 1) * self.batch_size]]]
        if update:
            self.update()


def curves_run(args: argparse.Namespace) -> None:
    """(the reference's venv) ``krylov_descent`` from the start of :func:`curves_start` for a wall-time
    budget; one CSV row per iteration boundary (module docstring)."""
    import contextlib
    import csv
    import io
    import os
    from datetime import datetime, timezone

    sys.path.insert(0, str(args.reference))
    import optimizer as reference
    import pytensor
    import scipy
    import scipy.optimize
    import theano
    import theano.tensor as T

    # The lifted casts follow floatX: float64 (PyTensor's default) for step-by-step comparisons, float32
    # (PYTENSOR_FLAGS=floatX=float32: the precision of its own casts) beside ksd-run's float32 default.
    floatx = theano.config.floatX
    if floatx not in ("float32", "float64"):
        raise SystemExit(f"curves: floatX is {floatx}; float32 or float64")
    start = np.load(args.start)
    meta = json.loads(str(start["settings"]))
    ours, run = meta["optimizer"], meta["run"]
    train = start["train"].astype(floatx)[: args.train_size]
    val, test = start["val"].astype(floatx), start["test"].astype(floatx)
    n = len(train)
    curvature_size = min(args.subset_size or ours["curvature_size"], n // 2)  # ours' cut to half the data
    bfgs_size = min(args.subset_size or ours["bfgs_size"], n // 2)
    space_size = args.space_size if args.space_size is not None else ours["krylov_dim"] - 1
    maxfun = args.maxfun if args.maxfun is not None else ours["bfgs_max_iterations"]
    preconditioning = "martens" if ours["preconditioner"] else "None"
    fixed = (ours["preconditioner_exponent"], ours["preconditioner_floor"]) if ours["preconditioner"] else ()
    if fixed not in ((), (0.75, 1e-4)) or ours["curvature_floor"] != 1e-4:
        raise SystemExit("curves: the reference's exponent 0.75 and floors 1e-4 are fixed; ours differ")
    seconds = args.seconds if args.seconds is not None else run["max_seconds"]
    iterations = args.iterations if args.iterations is not None else 10**9
    if seconds is None and args.iterations is None:
        raise SystemExit("curves: give --seconds or --iterations")
    seconds = float("inf") if seconds is None else seconds

    layers = [
        {"weight": start[f"weight_{k}"], "bias": start[f"bias_{k}"]} for k in range(len(meta["widths"]) - 1)
    ]
    network = reference_network({"layers": layers, "layer_types": meta["layer_types"]}, floatx)
    x = T.matrix("x", dtype=floatx)
    outputs, s = network.t_forward(x, return_linear=True)
    per_image = network.t_stable_ce(s, x).sum(axis=1)
    cost = per_image.mean() if args.cost_scale == 1 else args.cost_scale * per_image.mean()
    model = reference.Model(network.parameters, [x], s, [cost])
    f_eval = theano.function([x], [per_image.sum(), T.sum((outputs - x) ** 2)])  # ksd-run's loss, error

    def evaluate(data: np.ndarray) -> tuple[float, float]:
        chunk = run["max_chunk"] or len(data)
        sums = np.sum([f_eval(data[i : i + chunk]) for i in range(0, len(data), chunk)], axis=0)
        return float(sums[0] / len(data)), float(sums[1] / len(data))

    eval_train = train[: run["eval_train_size"]]
    source = "pbrakel/ksd-theano"
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    commit = subprocess.run(
        ["git", "-C", str(args.reference), "rev-parse", "--short", "origin/HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    header = [
        f"# {source} ({commit or 'unknown commit'}) optimizer.krylov_descent unchanged, after lib2to3 and "
        f"with its float32 casts lifted to floatX = {floatx} (scripts/ksd_reference.py docstring); PyTensor "
        f"{pytensor.__version__}, NumPy {np.__version__}, SciPy {scipy.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"# scripts/ksd_reference.py curves {' '.join(sys.argv[2:])}",
        f"# start: {args.start} (scripts/ksd_reference.py curves-start) = ksd-run "
        f"{' '.join(meta['overrides'])} ({meta['dtype']} initial weights, cast to {floatx}; "
        f"torch {meta['torch']})",
        *[f"#   {line}" for line in meta["notes"]],
        f"# reference settings: space_size {space_size} ({space_size + 1} Krylov vectors; the previous step "
        f"is computed and discarded), matrix_type 'G', preconditioning {preconditioning!r}, maxfun {maxfun} "
        f"(scipy fmin_bfgs maxiter, gtol 1e-5); gradient on all {n} training cases in batches of "
        f"{args.batch_size}; curvature subset {curvature_size} and BFGS subset {bfgs_size} in "
        f"{args.subset_batches} batches each, redrawn independently every iteration (NumPy generator seed "
        f"{args.seed}); cost: {args.cost_scale:g} × the mean over cases of the cross-entropy summed over "
        "pixels",
        f"# ours (ksd-run): krylov_dim {ours['krylov_dim']} + previous step {ours['previous_step']}, subsets "
        f"{ours['subsets']}, bfgs_max_iterations {ours['bfgs_max_iterations']}, bfgs_tolerance "
        f"{ours['bfgs_tolerance']}",
        f"# budget: {seconds} s of training or {args.iterations} iterations; wall_time = training seconds, "
        "evaluations excluded; a row per iteration boundary (iteration = iterations done)",
        f"# train_* on the first {len(eval_train)} training cases (run.eval_train_size), val_* on "
        f"{len(val)}, test_* on {len(test)}; *_loss: cross-entropy summed over pixels, *_error: squared "
        "reconstruction error sum_j (sigmoid(z_j) - x_j)^2; both means over cases (ksd-run's metrics); "
        "bfgs_*: scipy's counts and warnflag of the iteration that ended there, bfgs_phi its final objective",
    ]
    clock, bfgs = Clock(), []
    done = {"iterations": 0}
    handle = partial.open("w", newline="")
    writer = csv.writer(handle, lineterminator="\n")
    handle.write("\n".join(header) + "\n")
    writer.writerow(CURVES_COLUMNS)

    def at_iteration() -> None:
        clock.pause()
        k = done["iterations"]
        metrics = [*evaluate(eval_train), *evaluate(val), *evaluate(test)]
        stats = bfgs[k - 1] if k else ["", "", "", ""]
        writer.writerow([meta["method"], source, k, clock.elapsed, *metrics, *stats])
        handle.flush()
        print(
            f"iteration {k}: {clock.elapsed:.1f} s, train error {metrics[1]:.4f}, "
            f"test error {metrics[5]:.4f}",
            file=sys.stderr,
        )
        if clock.elapsed >= seconds or k >= iterations:
            raise Budget
        done["iterations"] += 1
        clock.start()

    original = scipy.optimize.fmin_bfgs

    def fmin_bfgs(f, x0, fprime, **kwargs):
        result = original(f, x0, fprime, **kwargs)
        bfgs.append([int(result[4]), int(result[5]), int(result[6]), float(result[1])])
        return result

    rng = np.random.default_rng(args.seed)
    gradient_set = GradientSet(train, args.batch_size, at_iteration)
    curvature_set = RandomSubset(train, curvature_size, args.subset_batches, rng)
    bfgs_set = RandomSubset(train, bfgs_size, args.subset_batches, rng)
    ended = "budget reached"
    scipy.optimize.fmin_bfgs = fmin_bfgs
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            clock.start()
            reference.krylov_descent(
                model,
                gradient_set,
                curvature_set,
                bfgs_set,
                iterations=10**9,
                space_size=space_size,
                matrix_type="G" if ours["curvature"] == "ggn" else "H",
                preconditioning=preconditioning,
                maxfun=maxfun,
            )
    except Budget:
        pass
    except Exception as err:  # a breakdown of the reference (NaN assertion, Cholesky): keep the rows
        ended = f"stopped in iteration {done['iterations']}: {type(err).__name__}: {err}"
    finally:
        scipy.optimize.fmin_bfgs = original
    handle.write(f"# ended: {ended}\n")
    handle.close()
    os.replace(partial, out)
    print(f"curves: {done['iterations']} iterations, {clock.elapsed:.0f} s of training; {ended}; wrote {out}")


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
    cur = sub.add_parser("curves-start", help="ksd-run's venv: data, initial weights and settings as .npz")
    cur.add_argument("--out", required=True, help=".npz to write")
    cur.add_argument("overrides", nargs="*", help=f"ksd-run overrides (default: {' '.join(CURVES_RUN)})")
    run = sub.add_parser("curves", help="the reference's venv: krylov_descent from a curves-start .npz")
    run.add_argument("--reference", type=Path, required=True)
    run.add_argument("--start", required=True, help=".npz of curves-start")
    run.add_argument("--out", required=True, help="CSV to write (rows appear in OUT.partial meanwhile)")
    run.add_argument("--seconds", type=float, help="training-time budget (default: run.max_seconds, 720)")
    run.add_argument("--iterations", type=int, help="stop after this many iterations")
    run.add_argument("--space-size", type=int, help="its K (default: krylov_dim - 1: as many Krylov vectors)")
    run.add_argument("--maxfun", type=int, help="its BFGS cap (default: bfgs_max_iterations)")
    run.add_argument("--batch-size", type=int, default=1000, help="batches of the gradient set")
    run.add_argument("--subset-batches", type=int, default=5, help="batches per curvature / BFGS subset")
    run.add_argument("--train-size", type=int, help="keep the first N training cases (smoke tests)")
    run.add_argument("--subset-size", type=int, help="curvature and BFGS subset size (default: ours)")
    run.add_argument("--cost-scale", type=float, default=1.0, help="its cost = this × ksd-run's mean loss")
    run.add_argument("--seed", type=int, default=0, help="NumPy generator of the subsets")
    args = parser.parse_args()
    commands = {"record": record, "time": timing, "curves-start": curves_start, "curves": curves_run}
    commands[args.command](args)


if __name__ == "__main__":
    main()
