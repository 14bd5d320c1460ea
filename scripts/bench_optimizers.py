"""What each optimizer costs on the MNIST autoencoder, relative to SGD, in one process.

* time per step and per epoch (time of the timed steps / epochs they consumed) divided by SGD's, and
  time per step divided by Adam's (every mini-batch method at batch 1,000, NCG, HF and KSD full batch);
* optimizer-state memory (bytes of the tensors in ``state_dict``) divided by the parameters' bytes;
* growth of step time with batch size and with layer width (three sizes each) as a fitted exponent
  ``t ∝ size^p`` (least squares on log-log).

Times are steady-state: each optimizer first runs ``max(1, history_size + 1, inverse_every + 1)`` warm-up
steps (the fields its config has; a full-batch method's one warm-up step is timed too, as the largest
point of its scaling row), so L-BFGS, ARCs-LSR1 and K-BFGS(L) have full memories of pairs and
K-FAC is past its first ``inverse_every`` steps, all of which recompute its inverses (all but the last
warm-up step on small batches: ``bench_common.warm_up``). A step's time is the median of the timed
steps (three; two for the full-batch methods, ``FULL_BATCH_STEPS``), except for K-FAC: the mean over one
whole period of ``inverse_every`` steps, one of which refreshes the inverses (its amortised cost).

On CUDA, times come from CUDA events and the peak GPU memory of a step is reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from bench_common import log_log_slope, mnist_autoencoder_problem, seconds, state_bytes, warm_up
from bench_ksd import split_step

from ksd.optim import available, optimizer_class
from ksd.problem import Problem

TRAIN_SIZE = 10_000
#: Per-optimizer settings for this benchmark: mini-batch methods at their paper batch size, subsets
#: of the batch methods scaled to the 10,000-example training set.
SETTINGS: dict[str, dict] = {
    "sgd": {"batch_size": 1000},
    "adam": {"batch_size": 1000},
    "rmsprop": {"batch_size": 1000},
    "adagrad": {"batch_size": 1000},
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
    times: tuple[float, ...]  # seconds of each timed step


#: Timed steps of a full-batch method (HF, KSD, NCG, TRON): each takes seconds, far above the timer's
#: noise, so two of them (their median is their mean) instead of the mini-batch methods' three; the
#: detail column lists both, which shows how much the work per step (CG or BFGS iterations) varies.
FULL_BATCH_STEPS = 2


def full_batch(name: str) -> bool:
    """Whether the benchmark runs ``name`` on the whole training set (no ``batch_size`` in ``SETTINGS``)."""
    return SETTINGS.get(name, {}).get("batch_size") is None


def time_steps(
    optimizer,
    device: torch.device,
    steps: int,
    warmup: int | None = None,
    timer: Callable[[], float] | None = None,
) -> Timing:
    """Steady-state cost of a step, as in the module docstring: the warm-up steps, then ``steps`` timed steps
    (median), or one whole period of ``inverse_every`` steps (mean) for an optimizer with that field.
    ``warmup`` replaces the default warm-up for an optimizer that is in its steady state already; ``timer``
    takes and times one step in place of the wall clock around ``optimizer.step()``."""
    config = optimizer.config
    history, period = getattr(config, "history_size", 0), getattr(config, "inverse_every", None)
    count = max(1, history + 1, (period or 0) + 1) if warmup is None else warmup
    warm_up(optimizer, count)
    times, epochs = [], []
    for _ in range(period or steps):
        epoch0 = optimizer.problem.epoch
        if timer is not None:
            times.append(timer())
        elif device.type == "cuda":
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
    return Timing(step, sum(epochs) / len(epochs), per_epoch, tuple(times))


def run(device: torch.device, steps: int = 3) -> list[dict]:
    rows: list[dict] = []
    names = available()
    measured: dict[str, tuple[Timing, int, float | None]] = {}
    scaling_rows: list[dict] = []
    for name in names:
        problem = mnist_autoencoder_problem(device, TRAIN_SIZE)
        optimizer = build(name, problem)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # a full-batch method's warm-up step is a fresh optimizer's first step on the 10,000 examples:
        # timed, it is the largest point of the scaling exponent (below), which is not measured again
        first = seconds(optimizer.step, device) if full_batch(name) else None
        timing = time_steps(
            optimizer,
            device,
            FULL_BATCH_STEPS if full_batch(name) else steps,
            warmup=0 if first is not None else None,
            # KSD's timed iterations are bench_ksd's problem: its phase split reports the first of them
            timer=partial(split_step, optimizer, device) if name == "ksd" else None,
        )
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        measured[name] = (timing, state_bytes(optimizer.state_dict()), peak)
        param_bytes = problem.n_params * problem.theta.element_size()
        # the exponents next, while this optimizer is warmed up: its steady state serves the other batch sizes
        scaling_rows += scaling(device, name, optimizer, timing, first)
        del optimizer, problem
    sgd, adam = measured["sgd"][0], measured["adam"][0]
    for name, (timing, nbytes, peak) in measured.items():
        detail = f"{timing.step * 1000:.1f} ms/step, {timing.epochs:.3f} epochs/step"
        if full_batch(name):
            detail += f" (steps of {', '.join(f'{t:.2f}' for t in timing.times)} s)"
        if peak is not None:
            detail += f", peak GPU memory {peak:.0f} MiB"
        rows.append(
            {"name": f"{name}: time per step / SGD", "ratio": timing.step / sgd.step, "detail": detail}
        )
        rows.append(
            {
                "name": f"{name}: time per step / Adam",
                "ratio": timing.step / adam.step,
                "detail": f"{timing.step * 1000:.1f} vs {adam.step * 1000:.1f} ms/step",
            }
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
    return rows + scaling_rows


def scaling(
    device: torch.device, name: str, warmed, timing: Timing, first: float | None = None
) -> list[dict]:
    """Exponents of step time in batch size (mini-batch methods) or training-set size (full-batch methods)
    and in the autoencoder's width (all hidden widths scaled by 0.5, 1, 2), one timed step per size
    (K-FAC: one inversion period) in the steady state of ``time_steps`` (a full-batch method: its
    first step, below). For HF and KSD the work per step varies (CG and BFGS iterations), so their
    exponents mix the cost of a product with the number of products.

    Nothing is measured twice (this used to be more than half of ``make bench``): ``warmed`` is the
    optimizer whose step took ``timing`` (batch 1,000 of 10,000 examples, warmed up). A mini-batch method
    keeps it for the smaller batches, its state already steady (its memory of pairs full, K-FAC past its
    first period), with one step at the new size before the timed one; its width ×1 point is its batch-500
    step (the width sweep's batch; the step does not depend on the training-set size). A full-batch method
    has no memory to fill, so each of its points is a fresh optimizer's first step, without the warm-up
    step that doubled the most expensive rows of the benchmark (KSD's and HF's); its points are all first
    steps alike (KSD's basis has no previous step yet: K vectors instead of K + 1), so the exponent compares
    like with like, and its 10,000-example point is ``first``, the main timing's warm-up step (a fresh
    optimizer's first step on the same problem), not ``timing``, a later step. KSD's subsets are a
    quarter of the training set at every size, as in ``SETTINGS``."""
    sizes = [250, 500, 1000]
    factors = [0.5, 1.0, 2.0]
    whole = full_batch(name)
    batch_times: dict[int, float] = {}
    if whole:
        batch_times[1000] = first
        for size in sizes[:-1]:
            problem = mnist_autoencoder_problem(device, size * 10)
            subsets = size * 5 // 2  # a quarter of the training set, as SETTINGS["ksd"] at 10,000
            optimizer = build(name, problem, curvature_size=subsets, bfgs_size=subsets)
            batch_times[size] = seconds(optimizer.step, device)
    else:
        batch_times[1000] = timing.step
        for size in (500, 250):
            warmed.config.batch_size = size
            batch_times[size] = time_steps(warmed, device, 1, warmup=1).step
    width_times: dict[float, float] = {}
    for factor in factors:
        if factor == 1.0 and not whole:
            width_times[factor] = batch_times[500]
            continue
        problem = mnist_autoencoder_problem(
            device, 2000, widths=[int(w * factor) for w in (1000, 500, 250)] + [30]
        )
        optimizer = build(name, problem, batch_size=500, curvature_size=500, bfgs_size=500)
        width_times[factor] = (
            seconds(optimizer.step, device) if whole else time_steps(optimizer, device, 1).step
        )
    what = "training-set size" if whole else "batch size"
    return [
        {
            "name": f"{name}: step time exponent in {what}",
            "ratio": log_log_slope(sizes, [batch_times[s] for s in sizes]),
            "detail": ", ".join(f"{s}: {batch_times[s] * 1000:.0f} ms" for s in sizes),
        },
        {
            "name": f"{name}: step time exponent in layer width",
            "ratio": log_log_slope(factors, [width_times[f] for f in factors]),
            "detail": ", ".join(f"x{f}: {width_times[f] * 1000:.0f} ms" for f in factors),
        },
    ]


if __name__ == "__main__":
    from bench_common import print_rows, resolve_device

    print_rows(run(resolve_device()))
