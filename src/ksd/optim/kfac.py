"""K-FAC (Martens & Grosse 2015; KFC for conv layers, Grosse & Martens 2016), the K-BFGS papers' baseline.

As in the K-BFGS authors' code (``kfac_utils.py``, ``training_utils.py``; read for facts, this is an
independent implementation), per layer and step:

1. forward/backward on the mini-batch for the gradient ``g`` (+ weight decay ``τ θ``) and momentum
   ``M ← ρ M + (1 − ρ) g``; a second backward through the same graph with targets sampled from the
   model's predictive distribution gives per-example pre-activation gradients ``δ̃`` (the Fisher,
   ``matrix_name = 'Fisher'``; the authors run a second forward on the same examples, which gives the
   same values);
2. factors as moving averages ``A ← ρ_i A + (1 − ρ_i)(1/N) Σ ā āᵀ``,
   ``G ← ρ_i G + (1 − ρ_i) mean δ̃ δ̃ᵀ``. ``optimizer.factor_init`` chooses where they start:

   * ``data_pass`` (default, the authors' code): before step 0, ``A`` and ``G`` are the averages of
     the per-batch factors over one pass of the training set in file order, in batches of
     ``batch_size`` with sampled targets (``training_utils.train_initialization``), and every step
     uses the constant ``ρ_i = 0.9`` (``kfac_utils.kfac_update``: ``rho = kfac_rho``; the
     ``min(1 − 1/(i+1), ρ)`` ramp there is commented out);
   * ``first_batch`` (Martens & Grosse 2015, §5): no pass, ``ρ_i = min(1 − 1/(i+1), 0.9)``, so step 0
     takes the first batch's factors.

   The default follows the authors' code because this K-FAC is the K-BFGS papers' baseline as they ran
   it: with ``first_batch`` the first steps precondition with one batch's sampled Fisher, and at their
   α = 1, λ = 3 the MNIST autoencoder reached NaN by step 30 (``docs/kbfgs_vs_authors.md``).

3. damped inverses ``(A + π_A I)⁻¹``, ``(G + π_G I)⁻¹`` with ``π_A = π_G = √λ`` for linear layers
   (the authors' ``phi_ = 1``) and the 2022 spatial split ``√λ·√|T|``, ``√λ/√|T|`` for conv layers
   (:meth:`~ksd.optim.kronecker.KroneckerLayer.damping`), recomputed at steps ``i ≤ T_inv`` and
   every ``T_inv`` steps (``T_inv = 20``);
4. direction ``P = −(G + π_G I)⁻¹ M (A + π_A I)⁻¹``, i.e. the solution of
   ``((A + π_A I) ⊗ (G + π_G I)) vec(P) = −vec(M)`` (column-major ``vec``), and ``θ ← θ + α P``.

Defaults (``conf/optimizer/kfac.yaml``) are the authors' MNIST-autoencoder demo: α = 1, λ = 3, factor
decay 0.9, inverses every 20 steps, momentum 0.9, τ = 1e-5, batch 1000.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ksd.errors import require
from ksd.losses import Loss
from ksd.optim.kronecker import KroneckerOptimizer, damped_inverse
from ksd.problem import Problem


def sample_targets(loss: Loss, outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Targets drawn from the model's predictive distribution at ``outputs`` (the Fisher's ``t̃``).

    Bernoulli(σ(z)) for sigmoid cross-entropy, Categorical(softmax(z)) for softmax cross-entropy (by
    the Gumbel-max trick, no host synchronisation), N(z, I) for ``½‖z − t‖²``
    (``training_utils.sample_from_pred_dist``).
    """
    noise = torch.rand(outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype)
    if loss.name == "sigmoid_cross_entropy":
        return (noise < torch.sigmoid(outputs)).to(outputs.dtype)
    if loss.name == "softmax_cross_entropy":
        gumbel = -torch.log(-torch.log(noise.clamp_min(torch.finfo(noise.dtype).tiny)))
        return (outputs + gumbel).argmax(-1)
    if loss.name == "squared_error":
        return outputs + torch.randn(
            outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype
        )
    raise ValueError(f"K-FAC has no predictive distribution for loss {loss.name!r}.")


class KFAC(KroneckerOptimizer):
    @dataclass
    class Config(KroneckerOptimizer.Config):
        name: str = "kfac"
        lr: float = 1.0
        damping: float = 3.0
        factor_decay: float = 0.9  # ρ of the factors' moving averages (the ramp's bound with first_batch)
        factor_init: str = "data_pass"  # data_pass (authors' code) | first_batch (Martens & Grosse)
        inverse_every: int = 20  # T_inv: refresh the damped inverses every this many steps

        def __post_init__(self) -> None:
            super().__post_init__()
            require(
                0 <= self.factor_decay < 1,
                f"optimizer.factor_decay must be in [0, 1), got {self.factor_decay}.",
            )
            require(
                self.factor_init in ("data_pass", "first_batch"),
                f"optimizer.factor_init must be data_pass or first_batch, got {self.factor_init!r}.",
            )
            require(
                self.inverse_every >= 1, f"optimizer.inverse_every must be >= 1, got {self.inverse_every}."
            )

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        like = problem.theta
        self.state.update(
            A=[like.new_zeros(layer.n_in, layer.n_in) for layer in self.layers],
            G=[like.new_zeros(layer.n_out, layer.n_out) for layer in self.layers],
            A_inv=[],
            G_inv=[],
        )
        self.generator = torch.Generator(device=like.device).manual_seed(problem.generator.initial_seed())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.generator.set_state(state_dict["generator"])

    def _sampled_targets(self, outputs: Tensor) -> Tensor:
        return sample_targets(self.problem.loss_fn, outputs, self.generator)

    def _average_factors_over_the_data(self) -> None:
        """``A``, ``G`` = means of the per-batch factors over one pass of the training set in file order."""
        st, problem = self.state, self.problem
        size = self.config.batch_size or problem.n_train
        for j, chunk in enumerate(problem.full_batch.chunks(size)):
            if len(chunk) < size:  # the authors' pass stops at the last full batch
                break
            record = self.layers.forward_backward(
                chunk, gradient=False, sampled_targets=self._sampled_targets
            )
            decay = j / (j + 1)
            for index, (layer, rec) in enumerate(zip(self.layers, record.layers)):
                layer.update_input_second_moment_(st["A"][index], rec, record.examples, decay)
                layer.update_output_grad_second_moment_(st["G"][index], rec, decay)

    def step(self) -> dict:
        c, st, problem = self.config, self.state, self.problem
        i = st["step"]
        lr = self.learning_rate()  # from the epoch reached before this step's batch
        if i == 0 and c.factor_init == "data_pass":
            self._average_factors_over_the_data()
        batch = self.next_batch()
        record = self.layers.forward_backward(batch, gradient=True, sampled_targets=self._sampled_targets)
        loss, grad = self.regularized(record.loss, record.grad)
        momentum = self.momentum_gradient(grad)
        rho = c.factor_decay if c.factor_init == "data_pass" else min(1 - 1 / (i + 1), c.factor_decay)
        refresh = i <= c.inverse_every or i % c.inverse_every == 0
        if refresh:
            st["A_inv"], st["G_inv"] = [], []
        named_momentum, named_theta = problem.unflatten(momentum), problem.unflatten(problem.theta)
        for index, (layer, rec) in enumerate(zip(self.layers, record.layers)):
            layer.update_input_second_moment_(st["A"][index], rec, record.examples, rho)
            layer.update_output_grad_second_moment_(st["G"][index], rec, rho)
            if refresh:
                damping_a, damping_g = layer.damping(c.damping)
                st["A_inv"].append(damped_inverse(st["A"][index], damping_a))
                st["G_inv"].append(damped_inverse(st["G"][index], damping_g))
            direction = st["G_inv"][index] @ layer.times_input_factor(named_momentum, st["A_inv"][index])
            layer.add_matrix_(named_theta, direction, -lr)
        st["step"] += 1
        return {"loss": loss, "lr": lr}
