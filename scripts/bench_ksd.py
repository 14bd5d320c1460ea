"""Time of one Krylov Subspace Descent iteration on the MNIST autoencoder, split into its three phases.

The network is the paper's 784-1000-500-250-30 autoencoder (sigmoid units, linear code, mirror decoder;
2.8 M parameters) on real MNIST when ``KSD_DATA`` points at the data folder, else on random images of the
same shape. One iteration: gradient on a batch of 10,000 examples, K = 20 Krylov vectors (+ the previous
step) from Gauss-Newton products on a curvature subset of 2,500, and BFGS over the 21 coefficients on a
BFGS subset of 2,500 (at most 40 iterations, the default). The optimizer's defaults otherwise (subsets of
5,000, gradient on all data) make a CPU iteration several times longer.

The phases are timed by wrapping the optimizer's own phase methods, so the total is exactly what
``step()`` costs; "other" is the rest of the step (drawing the subsets, the update, the orthogonality
statistic). A warm-up iteration runs first, so the timed one has the previous step in its basis.

This is the problem and the settings of KSD's row in ``bench_optimizers`` (``make bench`` runs that
topic first): there, its first timed iteration goes through :func:`split_step`, and :func:`run` reports
that iteration instead of taking two more (about 30 s on a 2-core CPU).

    python scripts/bench_ksd.py [--device cpu|cuda] [--profile]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_common import mnist_autoencoder_problem, sync

from ksd.optim.ksd import KrylovSubspaceDescent

GRADIENT_BATCH = 10_000
SUBSET = 2_500
PHASES = ("gradient", "build_basis", "minimize_in_subspace")


def timed_step(
    optimizer: KrylovSubspaceDescent, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds of one ``step()`` per phase (+ "other" and "total") and the step's statistics."""
    seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            result = method(*args, **kwargs)
            sync(device)
            seconds[name] += time.perf_counter() - start
            return result

        return timed

    for name in PHASES:
        setattr(optimizer, name, wrap(name, getattr(optimizer, name)))
    sync(device)
    start = time.perf_counter()
    stats = optimizer.step()
    sync(device)
    total = time.perf_counter() - start
    for name in PHASES:
        delattr(optimizer, name)
    seconds["other"] = total - sum(seconds.values())
    seconds["total"] = total
    return seconds, stats


#: The first iteration timed by :func:`split_step` on each device: (seconds per phase, statistics, optimizer).
SPLIT_TAKEN: dict[str, tuple[dict[str, float], dict[str, Any], KrylovSubspaceDescent]] = {}


def split_step(optimizer: KrylovSubspaceDescent, device: torch.device) -> float:
    """Seconds of one ``step()`` of ``optimizer``, timed by phase; the first on ``device`` is kept for
    :func:`run`."""
    seconds, stats = timed_step(optimizer, device)
    SPLIT_TAKEN.setdefault(str(device), (seconds, stats, optimizer))
    return seconds["total"]


def build(device: torch.device) -> KrylovSubspaceDescent:
    """KSD on the MNIST autoencoder (sigmoid, paper widths, seed 0) with 10,000 real (or random) images, its
    gradient on all of them."""
    problem = mnist_autoencoder_problem(device, GRADIENT_BATCH)
    config = KrylovSubspaceDescent.Config(curvature_size=SUBSET, bfgs_size=SUBSET)
    return KrylovSubspaceDescent(problem, config)


def run(device: str | torch.device = "cpu") -> list[dict]:
    device = torch.device(device)
    if str(device) in SPLIT_TAKEN:
        seconds, stats, optimizer = SPLIT_TAKEN[str(device)]
    else:
        optimizer = build(device)
        optimizer.step()  # warm-up; gives the timed iteration a previous step
        seconds, stats = timed_step(optimizer, device)
    problem = optimizer.problem
    setting = (
        f"MNIST AE ({problem.n_params / 1e6:.2f} M params, {problem.splits.spec.source}), {device.type}, "
        f"gradient batch {GRADIENT_BATCH}, |C| = |B| = {SUBSET}, K = {optimizer.config.krylov_dim}, "
        f"{torch.get_num_threads()} threads"
    )
    details = {
        "gradient": f"loss and gradient on {GRADIENT_BATCH} examples",
        "build_basis": f"preconditioner + {stats['basis_size']} basis vectors + projected curvature "
        f"({optimizer.config.krylov_dim + 1} Gauss-Newton products on {SUBSET}); "
        f"max |VVᵀ − I| = {float(stats['orthogonality_error']):.1e}",
        "minimize_in_subspace": f"{stats['bfgs_iterations']} BFGS iterations, {stats['bfgs_evaluations']} "
        f"evaluations of f and ∇f on {SUBSET} "
        f"({seconds['minimize_in_subspace'] / stats['bfgs_evaluations']:.3f} s each)",
        "other": "subset draw, update θ += Vᵀa, orthogonality statistic",
        "total": setting,
    }
    return [
        {
            "name": f"ksd iteration: {name}",
            "seconds": round(value, 3),
            "ratio": round(value / seconds["total"], 3),  # share of the iteration
            "detail": details[name],
        }
        for name, value in seconds.items()
    ]


def profile(device: torch.device) -> None:
    """torch.profiler table of one iteration, by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    optimizer = build(device)
    optimizer.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        optimizer.step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one iteration")
    args = parser.parse_args()
    if args.profile:
        profile(torch.device(args.device))
        return
    for row in run(args.device):
        print(f"{row['name']:<38} {row['seconds']:>8.3f} s  {row['ratio']:>6.1%}  {row['detail']}")


if __name__ == "__main__":
    main()
