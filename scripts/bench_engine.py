"""Engine overhead: one SGD epoch on the MNIST autoencoder through ``ksd-run``'s engine divided by the
same epoch in a plain hand-written PyTorch loop, in the same process on the same data.

Both loops draw mini-batches as index slices of a seeded permutation of tensors on the device, run
forward, the summed-over-pixels sigmoid cross-entropy averaged over the batch, backward and
``torch.optim.SGD.step``. The engine additionally counts work, checks budgets and keeps a device-side
finiteness flag; evaluation is excluded from its wall time, as from the plain loop's.
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_common import mnist_autoencoder_problem, sync
from torch import nn

from ksd.config import RunConfig
from ksd.engine import train
from ksd.optim.first_order import SGD


def plain_epoch(model: nn.Module, inputs: torch.Tensor, batch_size: int, lr: float, seed: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
    sync(inputs.device)
    start = time.perf_counter()
    for i in range(inputs.shape[0] // batch_size):
        x = inputs[order[i * batch_size : (i + 1) * batch_size]]
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none")
        loss.sum(1).mean().backward()
        optimizer.step()
    sync(inputs.device)
    return time.perf_counter() - start


def engine_epoch(device: torch.device, train_size: int, batch_size: int, lr: float, seed: int) -> float:
    problem = mnist_autoencoder_problem(device, train_size, seed=seed)
    optimizer = SGD(problem, SGD.Config(batch_size=batch_size, lr=lr))
    cfg = RunConfig(max_epochs=1.0, max_seconds=None, eval_every=10**9, eval_train_size=100, plot=False)
    return train(problem, optimizer, cfg, on_row=lambda row: None).wall_time


def run(
    device: torch.device, train_size: int = 10_000, batch_size: int = 100, repeats: int = 4
) -> list[dict]:
    lr = 0.01
    engine_times, plain_times = [], []
    for r in range(repeats + 1):  # the first round warms up both paths; the order alternates
        problem = mnist_autoencoder_problem(device, train_size, seed=r)
        if r % 2:
            p = plain_epoch(problem.model, problem.splits.train.inputs, batch_size, lr, seed=r)
            e = engine_epoch(device, train_size, batch_size, lr, seed=r)
        else:
            e = engine_epoch(device, train_size, batch_size, lr, seed=r)
            p = plain_epoch(problem.model, problem.splits.train.inputs, batch_size, lr, seed=r)
        if r > 0:
            engine_times.append(e)
            plain_times.append(p)
    ratio = statistics.median(e / p for e, p in zip(engine_times, plain_times))
    return [
        {
            "name": "engine overhead: SGD epoch via engine / plain PyTorch loop",
            "ratio": ratio,
            "target": 1.05,
            "detail": f"MNIST AE, {train_size} examples, batch {batch_size}, "
            f"engine {statistics.median(engine_times):.3f} s vs plain {statistics.median(plain_times):.3f} s",
        }
    ]


if __name__ == "__main__":
    from bench_common import print_rows, resolve_device

    print_rows(run(resolve_device()))
