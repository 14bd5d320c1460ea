"""What each optimizer costs on the MNIST autoencoder, relative to SGD, in one process.

* time per step and per epoch (time of the timed steps / epochs they consumed) divided by SGD's;
* optimizer-state memory (bytes of the tensors in ``state_dict``) divided by the parameters' bytes;
* growth of step time with batch size and with layer width (three sizes each) as a fitted exponent
  ``t ∝ size^p`` (least squares on log-log).

Times are steady-state: each optimizer first runs ``max(1, history_size + 1, inverse_every + 1)`` warm-up
steps (the fields its config has), so L-BFGS, ARCs-LSR1 and K-BFGS(L) have full memories of pairs and
K-FAC is past its first ``inverse_every`` steps, all of which recompute its inverses. A step's time is
the median of the timed steps, except for K-FAC: the mean over one whole period of ``inverse_every``
steps, one of which refreshes the inverses (its amortised cost).

On CUDA, times come from CUDA events and the peak GPU memory of a step is reported.
"""

from __future__ import annotations

import statistics
from typing import NamedTuple

import torch
from bench_common import log_log_slope, mnist_autoencoder_problem, seconds, state_bytes

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


class Timing(NamedTuple):
    step: float  # seconds per step: median of the timed steps, or their mean over a K-FAC period
    epochs: float  # epochs consumed per timed step, on average
    per_epoch: float  # seconds per epoch: total time of the timed steps / total epochs they consumed


def time_steps(optimizer, device: torch.device, steps: int) -> Timing:
    """Steady-state cost of a step, as in the module docstring: the warm-up steps, then ``steps`` timed steps
    (median), or one whole period of ``inverse_every`` steps (mean) for an optimizer with that field."""
    config = optimizer.config
    history, period = getattr(config, "history_size", 0), getattr(config, "inverse_every", None)
    for _ in range(max(1, history + 1, (period or 0) + 1)):
        optimizer.step()
    times, epochs = [], []
    for _ in range(period or steps):
        epoch0 = optimizer.problem.epoch
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            optimizer.step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000)
        else:
            times.append(seconds(optimizer.step, device))
        epochs.append(optimizer.problem.epoch - epoch0)
    step = statistics.mean(times) if period else statistics.median(times)
    per_epoch = sum(times) / sum(epochs) if sum(epochs) else float("nan")
    return Timing(step, sum(epochs) / len(epochs), per_epoch)


def run(device: torch.device, steps: int = 3) -> list[dict]:
    rows: list[dict] = []
    names = available()
    measured: dict[str, tuple[Timing, int, float | None]] = {}
    for name in names:
        problem = mnist_autoencoder_problem(device, TRAIN_SIZE)
        optimizer = build(name, problem)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_steps(optimizer, device, steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        measured[name] = (timing, state_bytes(optimizer.state_dict()), peak)
        param_bytes = problem.n_params * problem.theta.element_size()
    sgd = measured["sgd"][0]
    for name, (timing, nbytes, peak) in measured.items():
        detail = f"{timing.step * 1000:.1f} ms/step, {timing.epochs:.3f} epochs/step"
        if peak is not None:
            detail += f", peak GPU memory {peak:.0f} MiB"
        rows.append(
            {"name": f"{name}: time per step / SGD", "ratio": timing.step / sgd.step, "detail": detail}
        )
        rows.append(
            {
                "name": f"{name}: time per epoch / SGD",
                "ratio": timing.per_epoch / sgd.per_epoch,
                "detail": f"{timing.per_epoch:.2f} s/epoch",
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
    and in the autoencoder's width (all hidden widths scaled by 0.5, 1, 2), one timed step per size (K-FAC:
    one inversion period) after the warm-up of ``time_steps``. For HF and KSD the work per step varies (CG
    and BFGS iterations), so their exponents mix the cost of a product with the number of products."""
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
            batch_times.append(time_steps(build(name, problem, **overrides), device, 1).step)
        width_times = []
        for factor in factors:
            problem = mnist_autoencoder_problem(
                device, 2000, widths=[int(w * factor) for w in (1000, 500, 250)] + [30]
            )
            width_times.append(
                time_steps(
                    build(name, problem, batch_size=500, curvature_size=500, bfgs_size=500), device, 1
                ).step
            )
        what = "training-set size" if full_batch else "batch size"
        rows.append(
            {
                "name": f"{name}: step time exponent in {what}",
                "ratio": log_log_slope(sizes, batch_times),
                "detail": ", ".join(f"{s}: {t * 1000:.0f} ms" for s, t in zip(sizes, batch_times)),
            }
        )
        rows.append(
            {
                "name": f"{name}: step time exponent in layer width",
                "ratio": log_log_slope(factors, width_times),
                "detail": ", ".join(f"x{f}: {t * 1000:.0f} ms" for f, t in zip(factors, width_times)),
            }
        )
    return rows


if __name__ == "__main__":
    from bench_common import print_rows, resolve_device

    print_rows(run(resolve_device()))
