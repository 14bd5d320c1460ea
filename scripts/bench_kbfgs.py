"""K-BFGS, K-BFGS(L) and K-FAC against Adam: time of one step and optimizer-state memory.

The problem is the K-BFGS paper's MNIST autoencoder (784-1000-500-250-30 + mirror, ReLU, 2.8 M
parameters) with mini-batches of 1,000, on real MNIST when ``KSD_DATA`` points at the data folder, else
on random images of the same shape. Every optimizer starts from the same initialisation; steps are timed
one by one (device synchronised around each) after warm-up steps, in blocks of three that alternate with
blocks of three Adam steps, and the ratio of the medians is reported. Warm-up
covers K-BFGS's step 0 (pass over the training data for Ā, explicit inverses), K-BFGS(L)'s first
``history_size`` steps (until its ring buffers are full, so the compact form has its steady width) and
K-FAC's first ``inverse_every`` steps (inverses every step), all but the last on small batches
(``bench_common.warm_up``); K-FAC's time is the mean over one full inversion period (``inverse_every``
steps, one of which refreshes the inverses), its amortised cost.

Where the time goes (batch N = 1000, P = 2.8 M parameters): an Adam step is one forward/backward,
≈ 6NP = 17 GFLOP. K-BFGS adds the second pass at the trial point (forward + pre-activation gradients
only, ≈ 4NP = 11 GFLOP), the direction ``H_g M H_a`` (Σ 2·d_out·d_in·(d_in + d_out) ≈ 9 GFLOP; about
half that on the G side of K-BFGS(L) with p = 100) and, in ``stored`` mode, the mini-batch ``H̄ᵀH̄``
of the moving average (Σ 2·N·d_in² ≈ 6.5 GFLOP). On a CPU the step is matrix-product bound, so these
counts bound the ratio from below at about 2.1–2.5. On a GPU at this batch size every step is bound by
kernel launches instead (Adam ≈ 70 kernels, K-BFGS ≈ 1,500: about a hundred small vector and scalar
operations per layer for the damping, skip tests and rank-2 updates). Memory is the
bytes of the tensors in each optimizer's ``state_dict`` (Adam: its two moment vectors).

Targets (issue 5, from the paper's claim of near first-order per-iteration cost): K-BFGS ≤ 2.0 and
K-BFGS(L) ≤ 1.7 times an Adam step. The split rows time the phases of the same steps (by wrapping the
optimizer's own methods, so their sum is the step) in Adam steps: the first pass is an Adam step's
forward/backward, and the two passes together already take about 1.6 of them on the CPU.

    python scripts/bench_kbfgs.py [--device cpu|cuda] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (
    mnist_autoencoder_problem,
    paired_step_times,
    print_rows,
    resolve_device,
    state_bytes,
    sync,
    warm_up,
)

from ksd.optim import optimizer_class
from ksd.optim.base import Optimizer

BATCH = 1000
TRAIN_SIZE = 10_000


def phase_seconds(optimizer: Optimizer, device: torch.device, repeats: int) -> dict[str, float]:
    """Mean seconds per step of each phase of a K-BFGS step, by wrapping the methods that do them.

    Phases: the two forward/backward passes, the A statistics (``input_second_moment`` and its in-place
    moving average), the direction ``H_g M H_a`` (``times_input_factor`` and ``_output_factor_times``,
    which also applies ``H_g`` to the vectors of the double damping) and the rest (pair updates, momentum,
    bookkeeping).
    """
    seconds: dict[str, float] = {}

    def timed(label: Callable[..., str], method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            result = method(*args, **kwargs)
            sync(device)
            key = label(*args, **kwargs)
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
            return result

        return wrapper

    layers = optimizer.layers
    layers.forward_backward = timed(
        lambda *a, gradient, **k: "first pass (gradient)" if gradient else "second pass (trial point)",
        layers.forward_backward,
    )
    for layer in layers:
        for method in ("input_second_moment", "update_input_second_moment_"):
            setattr(layer, method, timed(lambda *a: "A statistics", getattr(layer, method)))
        layer.times_input_factor = timed(lambda *a: "direction H_g M H_a", layer.times_input_factor)
    optimizer._output_factor_times = timed(lambda *a: "direction H_g M H_a", optimizer._output_factor_times)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.step()
    sync(device)
    total = time.perf_counter() - start
    seconds["rest"] = total - sum(seconds.values())
    return {key: value / repeats for key, value in seconds.items()}


def make(name: str, device: torch.device, **overrides: Any) -> Optimizer:
    problem = mnist_autoencoder_problem(device, TRAIN_SIZE, activation="relu")
    cls = optimizer_class(name)
    return cls(problem, cls.Config(batch_size=BATCH, **overrides))


def run(device: torch.device, repeats: int = 3) -> list[dict]:  # 7 until 2026-12-03
    cases = [  # (label, optimizer, overrides, target)
        ("K-BFGS", "kbfgs", {}, 2.0),
        ("K-BFGS(L)", "kbfgs_l", {}, 1.7),
        ("K-BFGS, a_update=minibatch", "kbfgs", {"a_update": "minibatch"}, None),
        ("K-BFGS(L), a_update=minibatch", "kbfgs_l", {"a_update": "minibatch"}, None),
        ("K-FAC", "kfac", {}, None),
    ]
    adam = make("adam", device)
    for _ in range(2):
        adam.step()
    adam_bytes = state_bytes(adam.state_dict())
    rows = []
    for label, name, overrides, target in cases:
        opt = make(name, device, **overrides)
        if name == "kfac":  # amortised: one full inversion period, one step of which refreshes the inverses
            period = opt.config.inverse_every
            warm_up(opt, period + 1)
            times, adam_times = paired_step_times(opt.step, adam.step, device, 0, 1, block=period)
            seconds, adam_time = statistics.mean(times), statistics.mean(adam_times)
            how = f"means of {period} steps (one inverse refresh)"
        else:  # K-BFGS(L): warm up until its ring buffers are full (steady-state cost)
            warmup = getattr(opt.config, "history_size", 1) + 1
            warm_up(opt, warmup)
            times, adam_times = paired_step_times(opt.step, adam.step, device, 0, repeats)
            seconds, adam_time = statistics.median(times), statistics.median(adam_times)
            how = f"medians of {3 * repeats} steps in alternating blocks of 3, after {warmup} warm-up steps"
        rows.append(
            {
                "name": f"{label} step / Adam step",
                "ratio": seconds / adam_time,
                "target": target,
                "detail": f"{seconds * 1e3:.1f} vs {adam_time * 1e3:.1f} ms ({how}); batch {BATCH}, {device}",
            }
        )
        if name.startswith("kbfgs") and not overrides:
            for phase, spent in phase_seconds(opt, device, repeats).items():
                rows.append(
                    {
                        "name": f"{label} step split: {phase} / Adam step",
                        "ratio": spent / adam_time,
                        "detail": f"{spent * 1e3:.1f} ms per step, mean of {repeats} steps",
                    }
                )
        rows.append(
            {
                "name": f"{label} state memory / Adam",
                "ratio": state_bytes(opt.state_dict()) / adam_bytes,
                "detail": f"{state_bytes(opt.state_dict()) / 2**20:.1f} MiB vs {adam_bytes / 2**20:.1f} MiB",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_rows(run(resolve_device(args.device), args.repeats))


if __name__ == "__main__":
    main()
