"""The curvature chunks of the truncated-Newton methods (HF, TRON), and their host-side objective.

Martens (2010, §4.2) computes each iteration's curvature products on one of ``num_chunks`` fixed parts of
the training set, taken in turn: chunk ``k mod num_chunks`` at iteration ``k``. ``chunk_order:
contiguous`` cuts them as consecutive slices of the training split; ``shuffled`` cuts them from one fixed
permutation (seed :data:`CHUNK_SEED`, the same for every run, like the validation carve), as his demo,
which permutes the cases with ``randperm`` before training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ksd.errors import require
from ksd.problem import Batch

CHUNK_ORDERS = ("contiguous", "shuffled")
#: Seed of the fixed permutation that ``chunk_order: shuffled`` cuts the curvature chunks from.
CHUNK_SEED = 0


class CurvatureChunks:
    """Mixin of an :class:`~ksd.optim.base.Optimizer` whose config has ``num_chunks`` and ``chunk_order``."""

    _permutation: Tensor | None = None  # chunk_order: shuffled (a function of n_train, not state)

    def check_chunks(self) -> None:
        """Refuse a training set with fewer examples than curvature chunks (checked at every step, because
        the library API may hand each step data of another size)."""
        n, chunks = self.problem.n_train, self.config.num_chunks
        require(chunks <= n, f"optimizer.num_chunks={chunks} exceeds the {n} training examples.")

    def curvature_chunk(self, iteration: int) -> Batch:
        """Chunk ``iteration mod num_chunks`` of the training set: a contiguous slice, or with
        ``chunk_order: shuffled`` a slice of one fixed permutation (seed :data:`CHUNK_SEED`)."""
        c, problem = self.config, self.problem
        if c.chunk_order == "contiguous":
            return problem.train_chunk(iteration, c.num_chunks)
        n = problem.n_train
        if self._permutation is None or len(self._permutation) != n:
            generator = torch.Generator().manual_seed(CHUNK_SEED)
            self._permutation = torch.randperm(n, generator=generator).to(problem.device)
        size = n // c.num_chunks
        start = (iteration % c.num_chunks) * size
        return problem.batch(problem.splits.train, self._permutation[start : start + size])

    def _objective(self, batch: Batch, theta: Tensor) -> float:
        """``f_batch(θ) + τ/2 ‖θ‖²`` as a float (the comparisons of these methods need host scalars).

        A non-finite value is +∞, so a trial point where the network overflows loses every comparison
        (HF: CG backtracking moves past it, ρ = −∞ raises the damping and the Armijo search shortens the
        step; TRON: the step is rejected and the radius shrinks).
        """
        value = self.regularized(self.problem.loss(batch, theta), theta=theta).item()
        return value if math.isfinite(value) else math.inf
