"""Step time of ARCs-LSR1 against L-BFGS and Adam on the MNIST deep autoencoder, and its growth with m.

``run(device)`` times, in one process, single optimizer steps on the 784-1000-500-250-30 autoencoder (mirror
decoder, 2.8 M parameters) with mini-batches of 1000: ARCs-LSR1 for m = 5, 10, 20, 40, L-BFGS
(``ksd.optim.lbfgs.LBFGS``, ``line_search: none``, so like ARCs-LSR1 it takes exactly two gradients per step:
at θ and at θ + s on the same batch) for m = 5 and 20, and Adam. Each quasi-Newton optimizer first runs
``m + 3`` steps so that its memory is full, then the median of ``repeats`` timed steps is reported
(the device synchronised around each step). Real MNIST when ``$KSD_DATA`` holds it, otherwise random
images of the same shape (timing does not depend on the pixel values).

The growth with m is fitted as ``t(m) ∝ m^p`` (least squares on log-log) twice: for the whole step and for
its overhead over the two gradient passes, where the O(nm) products with the stored pairs live.

    python scripts/bench_arcs.py [cpu|cuda]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from bench_common import mnist_autoencoder_problem, sync

from ksd.optim.arcs_lsr1 import ARCsLSR1
from ksd.optim.first_order import Adam
from ksd.optim.lbfgs import LBFGS

TRAIN_SIZE = 10_000
BATCH = 1000
MEMORIES = (5, 10, 20, 40)


def timed(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``step()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def power_law_exponent(memories: list[int], times: list[float]) -> float:
    return float(np.polyfit(np.log(memories), np.log(times), 1)[0])


def run(device: str | torch.device = "cpu", repeats: int | None = None) -> list[dict]:
    device = torch.device(device)
    repeats = repeats or (20 if device.type == "cuda" else 5)

    def problem():
        return mnist_autoencoder_problem(device, TRAIN_SIZE)

    adam = timed(Adam(problem(), Adam.Config(batch_size=BATCH)).step, device, 3, repeats)
    lbfgs, arcs, pairs = {}, {}, {}
    for m in (5, 20):
        config = LBFGS.Config(batch_size=BATCH, history_size=m, line_search="none", lr=0.1)
        optimizer = LBFGS(problem(), config)
        lbfgs[m] = timed(optimizer.step, device, m + 3, repeats)
    for m in MEMORIES:
        optimizer = ARCsLSR1(problem(), ARCsLSR1.Config(batch_size=BATCH, history_size=m))
        arcs[m] = timed(optimizer.step, device, m + 3, repeats)
        pairs[m] = len(optimizer.memory)
    # what every quasi-Newton step here spends on the network: two gradients on one batch
    p = problem()
    batch = p.next_batch(BATCH)
    two_gradients = timed(lambda: (p.loss_and_grad(batch), p.loss_and_grad(batch)), device, 3, repeats)
    where = (f"{device.type}, {p.splits.spec.source}, {p.n_params:,} parameters, batch {BATCH}, "
             f"median of {repeats}")
    rows = []
    for m in (5, 20):
        rows.append({"name": f"arcs_lsr1 / lbfgs step, m={m}", "ratio": arcs[m] / lbfgs[m],
                     "detail": f"{arcs[m] * 1e3:.1f} ms / {lbfgs[m] * 1e3:.1f} ms "
                               f"(L-BFGS line_search=none); {where}"})
        rows.append({"name": f"arcs_lsr1 / adam step, m={m}", "ratio": arcs[m] / adam,
                     "detail": f"{arcs[m] * 1e3:.1f} ms / {adam * 1e3:.1f} ms; {where}"})
    memories = list(MEMORIES)
    totals = [arcs[m] for m in memories]
    overheads = [arcs[m] - two_gradients for m in memories]
    per_m = ", ".join(f"m={m}: {arcs[m] * 1e3:.1f} ms ({pairs[m]} pairs)" for m in memories)
    rows.append({"name": "arcs_lsr1 step time ∝ m^p (whole step)",
                 "ratio": power_law_exponent(memories, totals), "detail": f"{per_m}; {where}"})
    rows.append({"name": "arcs_lsr1 step time ∝ m^p (overhead over 2 gradients)",
                 "ratio": power_law_exponent(memories, overheads) if min(overheads) > 0 else float("nan"),
                 "detail": ", ".join(f"m={m}: {o * 1e3:.1f} ms" for m, o in zip(memories, overheads))
                 + f"; two gradients {two_gradients * 1e3:.1f} ms; {where}"})
    return rows


if __name__ == "__main__":
    chosen = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    for row in run(chosen):
        print(f"{row['name']:<55} {row['ratio']:8.3f}   {row['detail']}")
