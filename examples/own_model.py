"""Train your own PyTorch model with each optimizer of ksd-run, through the library API (``ksd.optim``).

    python examples/own_model.py                 # every method, 15 steps each, on generated data
    python examples/own_model.py ksd kbfgs --steps 30

Each method is built like a ``torch.optim`` optimizer, on the model and the loss, and every step is handed
its data: the whole training set for the full-batch methods (KSD, HF, TRON, L-BFGS, nonlinear CG: their line
searches, curvature products and subsets all use it), a mini-batch for the others.

The same model and data in ``ksd-run`` (Hydra imports the model class by its path):

    python examples/own_model.py --save /tmp/blobs.npz
    PYTHONPATH=examples ksd-run model=custom model._target_=own_model.MLP +model.inputs=10 +model.hidden=32 \\
        +model.classes=3 dataset=tensors dataset.path=/tmp/blobs.npz optimizer=kbfgs optimizer.batch_size=100

``tests/test_examples.py`` runs this file; ``tests/test_api.py`` checks that the library and ksd-run follow
the same trajectory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ksd.optim import LIBRARY

INPUTS, CLASSES = 10, 3

#: Per method: hyperparameters (the rest are ksd-run's defaults) and the examples per step (None: all).
SETTINGS: dict[str, tuple[dict, int | None]] = {
    "ksd": ({"krylov_dim": 10}, None),
    "hf": ({"weight_decay": 0.0, "initial_damping": 1.0}, None),
    "lbfgs": ({}, None),
    "ncg": ({}, None),
    "tron": ({"weight_decay": 0.0}, None),
    "kbfgs": ({}, 100),
    "kbfgs_l": ({"history_size": 10}, 100),
    "kfac": ({"damping": 0.3}, 100),
    "arcs_lsr1": ({}, 100),
    "sgd": ({"lr": 0.2}, 100),
    "adam": ({"lr": 0.02}, 100),
    "rmsprop": ({"lr": 0.01}, 100),
    "adagrad": ({"lr": 0.2}, 100),
}


class MLP(nn.Module):
    """Your model: any ``nn.Module`` (K-BFGS and K-FAC need its parameters in nn.Linear / nn.Conv2d)."""

    def __init__(self, inputs: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(inputs, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def make_data(count: int = 600, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Three overlapping Gaussian blobs in 10 dimensions, labels 0, 1, 2."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    centres = torch.randn(CLASSES, INPUTS, generator=generator) * 0.5
    inputs = centres[labels] + torch.randn(count, INPUTS, generator=generator)
    return inputs, labels


def train(method: str, inputs: Tensor, labels: Tensor, steps: int, seed: int = 0) -> list[float]:
    """The training loss before and after every step of ``method`` on a fresh :class:`MLP`."""
    hyperparameters, batch = SETTINGS[method]
    torch.manual_seed(seed)
    model = MLP(INPUTS, 32, CLASSES)
    optimizer = LIBRARY[method](model, "softmax_cross_entropy", seed=seed, **hyperparameters)
    batch = batch or len(inputs)
    losses = [F.cross_entropy(model(inputs), labels).item()]
    for step in range(steps):
        start = step * batch % len(inputs)
        optimizer.step(inputs[start : start + batch], labels[start : start + batch])
        with torch.no_grad():
            losses.append(F.cross_entropy(model(inputs), labels).item())
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="*", help=f"some of {', '.join(SETTINGS)} (default: all)")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--save", type=Path, help="write the data as a .npz file for ksd-run and stop")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.methods) - set(SETTINGS)):
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    inputs, labels = make_data()
    if args.save:
        np.savez(args.save, inputs=inputs[:500].numpy(), targets=labels[:500].numpy(),
                 test_inputs=inputs[500:].numpy(), test_targets=labels[500:].numpy())
        print(f"wrote {args.save}")
        return 0
    for method in args.methods or SETTINGS:
        losses = train(method, inputs, labels, args.steps)
        print(f"{method:10s} training loss {losses[0]:.4f} -> {losses[-1]:.4f} after {args.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
