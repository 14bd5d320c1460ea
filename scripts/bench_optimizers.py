"""What each optimizer costs on the MNIST autoencoder, relative to SGD, in one process.

* time per step and per epoch (step time / epochs consumed per step) divided by SGD's;
* optimizer-state memory (bytes of the tensors in ``state_dict``) divided by the parameters' bytes;
* growth of step time with batch size and with layer width (three sizes each) as a fitted exponent
  ``t ∝ size^p`` (least squares on log-log).

On CUDA, times come from CUDA events and the peak GPU memory of a step is reported.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from bench_common import mnist_autoencoder_problem, state_bytes, sync

from ksd.optim import available, optimizer_class
from ksd.problem import Problem

TRAIN_SIZE = 10_000
#: Per-optimizer settings for this benchmark: mini-batch methods at their paper batch size, subsets
#: of the batch methods scaled to the 10,000-example training set.
SETTINGS: dict[str, dict] = {
    "sgd": {"batch_size": 1000},
    "adam": {"batch_size": 1000},
    "lbfgs": {"batch_size": 1000, "line_search": "none", "lr": 0.1},
    "kbfgs": {"batch_size": 1000},
    "kbfgs_l": {"batch_size": 1000},
    "kfac": {"batch_size": 1000},
    "arcs_lsr1": {"batch_size": 1000},
    "hf": {"max_cg_iterations": 50},
    "ksd": {"curvature_size": 2500, "bfgs_size": 2500},
}


def build(name: str, problem: Problem, **overrides):
    cls = optimizer_class(name)
    fields = cls.Config.__dataclass_fields__
    settings = {k: v for k, v in {**SETTINGS.get(name, {}), **overrides}.items() if k in fields}
    return cls(problem, cls.Config(**settings))


def time_steps(optimizer, device: torch.device, steps: int) -> tuple[float, float]:
    """Median seconds per step after one warm-up step, and the epochs consumed per step."""
    optimizer.step()
    times = []
    for _ in range(steps):
        epoch0 = optimizer.problem.epoch
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            optimizer.step()
            sync(device)
            times.append(time.perf_counter() - t0)
        per_step_epochs = optimizer.problem.epoch - epoch0
    return statistics.median(times), per_step_epochs


def fitted_exponent(sizes: list[float], times: list[float]) -> float:
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in times]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(device: torch.device, steps: int = 3) -> list[dict]:
    rows: list[dict] = []
    names = available()
    measured: dict[str, tuple[float, float, int, float | None]] = {}
    for name in names:
        problem = mnist_autoencoder_problem(device, TRAIN_SIZE)
        optimizer = build(name, problem)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, epochs = time_steps(optimizer, device, steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        measured[name] = (seconds, epochs, state_bytes(optimizer.state_dict()), peak)
        param_bytes = problem.n_params * problem.theta.element_size()
    sgd_step, sgd_epochs, _, _ = measured["sgd"]
    for name, (seconds, epochs, nbytes, peak) in measured.items():
        per_epoch = seconds / epochs if epochs else float("nan")
        detail = f"{seconds * 1000:.1f} ms/step, {epochs:.3f} epochs/step"
        if peak is not None:
            detail += f", peak GPU memory {peak:.0f} MiB"
        rows.append({"name": f"{name}: time per step / SGD", "ratio": seconds / sgd_step, "detail": detail})
        rows.append(
            {
                "name": f"{name}: time per epoch / SGD",
                "ratio": per_epoch / (sgd_step / sgd_epochs),
                "detail": f"{per_epoch:.2f} s/epoch",
            }
        )
        rows.append(
            {
                "name": f"{name}: state memory / parameters",
                "ratio": nbytes / param_bytes,
                "detail": f"{nbytes / 2**20:.1f} MiB",
            }
        )
    rows += scaling(device, names)
    return rows


def scaling(device: torch.device, names: list[str]) -> list[dict]:
    """Exponents of step time in batch size (mini-batch methods) or training-set size (full-batch methods)
    and in the autoencoder's width (all hidden widths scaled by 0.5, 1, 2), one timed step per size after a
    warm-up step. For HF and KSD the work per step varies (CG and BFGS iterations), so their exponents
    mix the cost of a product with the number of products."""
    rows = []
    sizes = [250, 500, 1000]
    factors = [0.5, 1.0, 2.0]
    for name in names:
        full_batch = SETTINGS.get(name, {}).get("batch_size") is None
        batch_times = []
        for size in sizes:
            train = size * 10 if full_batch else TRAIN_SIZE
            problem = mnist_autoencoder_problem(device, train)
            overrides = (
                {"curvature_size": size * 2, "bfgs_size": size * 2} if full_batch else {"batch_size": size}
            )
            batch_times.append(time_steps(build(name, problem, **overrides), device, 1)[0])
        width_times = []
        for factor in factors:
            problem = mnist_autoencoder_problem(
                device, 2000, widths=[int(w * factor) for w in (1000, 500, 250)] + [30]
            )
            width_times.append(
                time_steps(
                    build(name, problem, batch_size=500, curvature_size=500, bfgs_size=500), device, 1
                )[0]
            )
        what = "training-set size" if full_batch else "batch size"
        rows.append(
            {
                "name": f"{name}: step time exponent in {what}",
                "ratio": fitted_exponent(sizes, batch_times),
                "detail": ", ".join(f"{s}: {t * 1000:.0f} ms" for s, t in zip(sizes, batch_times)),
            }
        )
        rows.append(
            {
                "name": f"{name}: step time exponent in layer width",
                "ratio": fitted_exponent(factors, width_times),
                "detail": ", ".join(f"x{f}: {t * 1000:.0f} ms" for f, t in zip(factors, width_times)),
            }
        )
    return rows


if __name__ == "__main__":
    from bench_common import print_rows, resolve_device

    print_rows(run(resolve_device()))
