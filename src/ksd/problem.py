"""The training problem: model, loss and data splits, and the only place that evaluates them.

A :class:`Problem` owns one flat parameter vector ``theta``; the model's parameters are views into
it, so vector-space optimizers (L-BFGS, HF, KSD, ARCs-LSR1) update the network by writing to
``theta`` and never copy parameters, while ``torch.optim`` optimizers keep working on
``model.parameters()``. Functions of other parameter vectors (trial points, line searches) go
through :func:`torch.func.functional_call` with views of the given vector.

The problem also draws mini-batches (a seeded permutation per epoch, index slices of tensors
that already live on the run's device) and counts the work done, so that every metric row carries
``epoch`` = examples whose gradient was taken / training-set size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ksd.data import Split, Splits
from ksd.errors import require
from ksd.losses import Loss

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class Batch:
    """Inputs and targets of a set of examples, already on the run's device."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def chunks(self, size: int) -> Iterator[Batch]:
        """Consecutive sub-batches of at most ``size`` examples (views, no copies)."""
        for start in range(0, len(self), size):
            yield Batch(self.inputs[start : start + size], self.targets[start : start + size])


@dataclass
class WorkCounter:
    """Examples processed, by kind of pass, since the start of the run."""

    gradient: int = 0  # examples in a forward + backward pass for a gradient
    forward: int = 0  # examples in a forward pass only (line searches, evaluations of f)
    curvature: int = 0  # examples in curvature-vector products (each product counted once)


class Problem:
    """Model + loss + data splits with a flat-parameter view.

    Args:
        model: network mapping a batch of inputs to outputs (pre-activations).
        loss: the training loss on those outputs.
        splits: train / validation / test data on the run's device.
        autoencoder: targets are the inputs (flattened) instead of the labels.
        seed: seeds the mini-batch order.
        max_chunk: largest number of examples pushed through the network at once; larger batches
            are processed in chunks and their results summed (same values, bounded memory).
        augment: optional training-batch augmentation, applied when mini-batches are drawn.
        compile_curvature: compile the curvature-vector products of :mod:`ksd.curvature` with
            ``torch.compile`` (see there for when it pays).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Loss,
        splits: Splits,
        *,
        autoencoder: bool,
        seed: int = 0,
        max_chunk: int = 10_000,
        augment: Augment | None = None,
        compile_curvature: bool = False,
    ) -> None:
        self.model = model
        self.loss_fn = loss
        self.splits = splits
        self.autoencoder = autoencoder
        self.max_chunk = max_chunk
        self.augment = augment
        self.compile_curvature = compile_curvature
        self.counts = WorkCounter()
        self.theta = self._flatten_parameters()
        self.n_params = self.theta.numel()
        self.generator = torch.Generator().manual_seed(seed)
        self._order, self._cursor = torch.empty(0, dtype=torch.long), 0  # drawn by use_training_data
        self.use_training_data(splits.train)

    # ------------------------------------------------------------------ parameters
    def _flatten_parameters(self) -> Tensor:
        """Copy the parameters once into one flat vector and make the model's parameters views of it.

        Every parameter gets its own trainable view, so a parameter shared by two modules (tied weights)
        would silently come apart and a frozen one (``requires_grad=False``) would be trained: both are
        refused (:class:`~ksd.errors.ConfigError`), which matters for the users' own networks.
        """
        owners = [
            (module, prefix, name, p)
            for prefix, module in self.model.named_modules()
            for name, p in module.named_parameters(recurse=False)
        ]
        self._names = [f"{prefix}.{name}" if prefix else name for _, prefix, name, _ in owners]
        seen: set[int] = set()
        for name, (*_, p) in zip(self._names, owners):
            require(
                id(p) not in seen,
                f"parameter {name} is shared with another module (tied weights), which the flat parameter "
                "vector of the optimizers cannot keep tied; give every module its own parameters.",
            )
            require(
                p.requires_grad,
                f"parameter {name} has requires_grad=False, but the optimizers train every parameter of the "
                "model; leave frozen layers out of it (e.g. feed it their precomputed outputs).",
            )
            seen.add(id(p))
        self._shapes = [p.shape for *_, p in owners]
        self._sizes = [p.numel() for *_, p in owners]
        theta = torch.cat([p.detach().reshape(-1) for *_, p in owners])
        for (module, _, name, _), view in zip(owners, self.unflatten(theta).values()):
            setattr(module, name, nn.Parameter(view))
        return theta

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Views of a flat vector shaped like the model's parameters, keyed by parameter name.

        ``split`` rather than slicing keeps the backward pass of a function of ``vector`` a single
        concatenation instead of one full-size scatter per parameter.
        """
        parts = vector.split(self._sizes)
        return {n: t.view(s) for n, t, s in zip(self._names, parts, self._shapes)}

    @property
    def device(self) -> torch.device:
        return self.splits.train.inputs.device

    @property
    def epoch(self) -> float:
        """Gradient examples processed / training-set size."""
        return self.counts.gradient / self.n_train

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, parameters: bool = True) -> dict[str, Any]:
        """Parameters (unless ``parameters`` is false: the library API leaves them to ``model.state_dict()``),
        work counts and the mini-batch sampler's position and random state."""
        state = {
            "counts": dataclasses.asdict(self.counts),
            "generator": self.generator.get_state(),
            "order": self._order.cpu(),
            "cursor": self._cursor,
        }
        return {"theta": self.theta.detach().cpu().clone(), **state} if parameters else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "theta" in state:
            self.theta.copy_(state["theta"])
        self.counts = WorkCounter(**state["counts"])
        self.generator.set_state(state["generator"])
        self._order = state["order"].to(self.device)
        self._cursor = state["cursor"]

    # ------------------------------------------------------------------ batches
    def use_training_data(self, split: Split) -> None:
        """Train on ``split`` from now on: full batch, mini-batches, random subsets and chunks come from it.

        The constructor calls it with the training split; the library API (:mod:`ksd.optim.api`) builds a
        problem on an empty split and hands every step its data this way. A training set of a new size
        gets a fresh permutation for :meth:`next_batch` (an empty split draws none), so a problem built
        without data and then handed the training set follows the same random sequence as one built with it.
        """
        self.splits.train = split
        self.n_train = len(split)
        self.full_batch = self.batch(split)
        if len(self._order) != self.n_train:
            self._order = torch.randperm(self.n_train, generator=self.generator).to(self.device)
            self._cursor = 0

    def batch(self, split: Split, index: Tensor | slice | None = None) -> Batch:
        """The examples ``index`` (all when None) of ``split`` with the targets of this problem."""
        inputs = split.inputs if index is None else split.inputs[index]
        if self.autoencoder:
            return Batch(inputs, inputs.flatten(1))
        labels = split.labels if index is None else split.labels[index]
        return Batch(inputs, labels)

    def next_batch(self, size: int) -> Batch:
        """The next ``size`` training examples of a seeded permutation, reshuffled every epoch."""
        if size >= self.n_train:
            return self.full_batch
        if self._cursor + size > self.n_train:
            self._order = torch.randperm(self.n_train, generator=self.generator).to(self.device)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + size]
        self._cursor += size
        batch = self.batch(self.splits.train, index)
        if self.augment is not None:
            batch = Batch(self.augment(batch.inputs, self.generator), batch.targets)
        return batch

    def random_batches(self, *sizes: int) -> list[Batch]:
        """Disjoint random subsets of the training set with the given sizes (fresh draw per call)."""
        if sum(sizes) > self.n_train:
            raise ValueError(f"subsets of sizes {sizes} do not fit in {self.n_train} training examples")
        perm = torch.randperm(self.n_train, generator=self.generator).to(self.device)
        out, start = [], 0
        for size in sizes:
            out.append(self.batch(self.splits.train, perm[start : start + size]))
            start += size
        return out

    def train_chunk(self, index: int, count: int) -> Batch:
        """Chunk ``index mod count`` of the training set cut into ``count`` fixed contiguous chunks."""
        size = self.n_train // count
        start = (index % count) * size
        return self.batch(self.splits.train, slice(start, start + size))

    # ------------------------------------------------------------------ evaluation of f
    def outputs(self, inputs: Tensor, theta: Tensor | None = None) -> Tensor:
        """Network outputs at ``theta`` (the current parameters when None)."""
        if theta is None:
            return self.model(inputs)
        return functional_call(self.model, self.unflatten(theta), (inputs,))

    def loss(self, batch: Batch, theta: Tensor | None = None) -> Tensor:
        """Mean loss over ``batch`` at ``theta``, without gradient (a 0-dim tensor, no host sync)."""
        self.counts.forward += len(batch)
        with torch.no_grad():
            total = sum(
                self.loss_fn.per_example(self.outputs(c.inputs, theta), c.targets).sum()
                for c in batch.chunks(self.max_chunk)
            )
        return total / len(batch)

    def loss_and_grad(self, batch: Batch, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean loss over ``batch`` and its gradient as a flat vector, at ``theta`` (default: current)."""
        self.counts.gradient += len(batch)
        point = (self.theta if theta is None else theta).detach().requires_grad_()
        loss_total = grad = None
        for chunk in batch.chunks(self.max_chunk):
            out = self.outputs(chunk.inputs, point)
            chunk_loss = self.loss_fn.per_example(out, chunk.targets).sum()
            (g,) = torch.autograd.grad(chunk_loss, point)
            grad = g if grad is None else grad.add_(g)
            loss_total = chunk_loss.detach() if loss_total is None else loss_total + chunk_loss.detach()
        return loss_total / len(batch), grad.div_(len(batch))

    def backward(self, batch: Batch) -> Tensor:
        """Forward and backward of the mean loss through the model, filling ``p.grad`` (for torch.optim)."""
        self.counts.gradient += len(batch)
        loss = self.loss_fn(self.model(batch.inputs), batch.targets)
        loss.backward()
        return loss.detach()

    def evaluate(self, split: Split, max_examples: int | None = None) -> dict[str, float]:
        """Mean loss and mean error (squared reconstruction error or misclassification) on a split.

        Not counted as training work. One host synchronisation at the end.
        """
        n = len(split) if max_examples is None else min(max_examples, len(split))
        batch = self.batch(split, slice(0, n))
        loss = self.theta.new_zeros(())
        error = self.theta.new_zeros(())
        with torch.no_grad():
            for chunk in batch.chunks(self.max_chunk):
                out = self.outputs(chunk.inputs)
                loss += self.loss_fn.per_example(out, chunk.targets).sum()
                error += self.loss_fn.error(out, chunk.targets).sum()
        values = torch.stack([loss, error]).div_(n).tolist()
        return {"loss": values[0], "error": values[1]}
