"""Step time of ARCs-LSR1 against L-BFGS and Adam on the MNIST deep autoencoder, and its growth with m.

``run(device)`` times, in one process, single optimizer steps on the 784-1000-500-250-30 autoencoder (mirror
decoder, 2.8 M parameters) with mini-batches of 1000: ARCs-LSR1 for m = 5, 10, 20, 40, L-BFGS
(``ksd.optim.lbfgs.LBFGS``, ``line_search: none``, so like ARCs-LSR1 it takes exactly two gradients per step:
at θ and at θ + s on the same batch) for m = 5 and 20, and Adam. Each quasi-Newton optimizer first runs
``m + 3`` steps so that its memory is full (all but the last on small batches: ``bench_common.warm_up``).
Every ratio comes from interleaved timing (``bench_common.paired_step_times``): ``repeats`` blocks of three
steps of ARCs-LSR1 alternate with blocks of three steps of its baseline (the device synchronised around each
step), and the ratio of the two medians is reported, so both are measured under the same load on a shared
machine. The baselines: L-BFGS with the same m and Adam (m = 5 and 20), and for every m two gradient passes
on one fixed batch, which gives the ARCs-LSR1 step times of the m-fit. Real MNIST when ``$KSD_DATA`` holds
it, otherwise random images of the same shape (timing does not depend on the pixel values).

The growth with m is fitted as ``t(m) ∝ m^p`` (least squares on log-log) twice: for the whole step and for
its overhead over the two gradient passes, where the O(nm) products with the stored pairs live.

    python scripts/bench_arcs.py [cpu|cuda]
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import torch
from bench_common import log_log_slope, mnist_autoencoder_problem, paired_step_times, warm_up

from ksd.optim.arcs_lsr1 import ARCsLSR1
from ksd.optim.first_order import Adam
from ksd.optim.lbfgs import LBFGS

TRAIN_SIZE = 10_000
BATCH = 1000
MEMORIES = (5, 10, 20, 40)


def run(device: str | torch.device = "cpu", repeats: int | None = None) -> list[dict]:
    device = torch.device(device)
    repeats = repeats or (20 if device.type == "cuda" else 3)  # CPU: 5 until 2026-12-03

    def problem():
        return mnist_autoencoder_problem(device, TRAIN_SIZE)

    def medians(step: Callable[[], object], baseline: Callable[[], object], warmup: int) -> tuple[float, ...]:
        """Median seconds of ``step`` and of ``baseline``, timed in alternating blocks after the warm-up."""
        times, baseline_times = paired_step_times(step, baseline, device, warmup, repeats)
        return statistics.median(times), statistics.median(baseline_times)

    adam = Adam(problem(), Adam.Config(batch_size=BATCH))
    for _ in range(3):
        adam.step()
    # what every quasi-Newton step here spends on the network: two gradients on one batch
    p = problem()
    batch = p.next_batch(BATCH)

    def two_gradients() -> None:
        p.loss_and_grad(batch)
        p.loss_and_grad(batch)

    two_gradients()
    arcs, gradients, pairs, lbfgs, vs_adam = {}, {}, {}, {}, {}
    for m in MEMORIES:
        optimizer = ARCsLSR1(problem(), ARCsLSR1.Config(batch_size=BATCH, history_size=m))
        warm_up(optimizer, m + 3)
        arcs[m], gradients[m] = medians(optimizer.step, two_gradients, 0)
        pairs[m] = len(optimizer.memory)
        if m in (5, 20):
            config = LBFGS.Config(batch_size=BATCH, history_size=m, line_search="none", lr=0.1)
            baseline = LBFGS(problem(), config)
            warm_up(baseline, m + 3)
            lbfgs[m] = medians(baseline.step, optimizer.step, 0)  # (L-BFGS time, ARCs time)
            vs_adam[m] = medians(optimizer.step, adam.step, 0)
    where = (f"{device.type}, {p.splits.spec.source}, {p.n_params:,} parameters, batch {BATCH}, "
             f"medians of {3 * repeats} steps in alternating blocks of 3")
    rows = []
    for m in (5, 20):
        (lbfgs_time, arcs_time), (arcs_time_a, adam_time) = lbfgs[m], vs_adam[m]
        rows.append({"name": f"arcs_lsr1 / lbfgs step, m={m}", "ratio": arcs_time / lbfgs_time,
                     "detail": f"{arcs_time * 1e3:.1f} ms / {lbfgs_time * 1e3:.1f} ms "
                               f"(L-BFGS line_search=none); {where}"})
        rows.append({"name": f"arcs_lsr1 / adam step, m={m}", "ratio": arcs_time_a / adam_time,
                     "detail": f"{arcs_time_a * 1e3:.1f} ms / {adam_time * 1e3:.1f} ms; {where}"})
    memories = list(MEMORIES)
    totals = [arcs[m] for m in memories]
    overheads = [arcs[m] - gradients[m] for m in memories]
    per_m = ", ".join(f"m={m}: {arcs[m] * 1e3:.1f} ms ({pairs[m]} pairs)" for m in memories)
    rows.append({"name": "arcs_lsr1 step time ∝ m^p (whole step)",
                 "ratio": log_log_slope(memories, totals), "detail": f"{per_m}; {where}"})
    rows.append({"name": "arcs_lsr1 step time ∝ m^p (overhead over 2 gradients)",
                 "ratio": log_log_slope(memories, overheads) if min(overheads) > 0 else float("nan"),
                 "detail": ", ".join(f"m={m}: {o * 1e3:.1f} ms (two gradients {gradients[m] * 1e3:.1f} ms)"
                                     for m, o in zip(memories, overheads)) + f"; {where}"})
    return rows


if __name__ == "__main__":
    chosen = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for row in run(chosen):
        print(f"{row['name']:<55} {row['ratio']:8.3f}   {row['detail']}")
