"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton methods.

Goldfarb, Ren & Bahamou, "Practical Quasi-Newton Methods for Training Deep Neural Networks",
NeurIPS 2020 (arXiv 2006.08877), and, for convolutional layers, Ren, Bahamou & Goldfarb,
"Kronecker-factored Quasi-Newton Methods for Deep Learning" (arXiv 2102.06737). Details follow the
authors' public code ``renyiryry/kbfgs_neurips2020_public`` (``kbfgs_utils.py``, ``training_utils.py``,
``training_function.py``), read for facts; this is an independent implementation.

Per layer (see :mod:`ksd.optim.kronecker` for the layer model) the block of the Hessian is
approximated by ``A ⊗ G``; the optimizer keeps ``H_a ≈ (A + √λ I)⁻¹`` and ``H_g ≈ G⁻¹``. One step:

1. forward/backward on a mini-batch at θ, recording layer inputs, pre-activations ``z`` and
   per-example pre-activation gradients ``δ``; gradient ``g`` plus weight decay ``τ θ``; momentum
   ``M ← ρ M + (1 − ρ) g``;
2. A side, ``optimizer.a_update``:

   * ``stored`` (the 2020 code's only mode): ``Ā ← β Ā + (1 − β) A_batch`` (β = 0.9), with ``Ā``
     initialised by averaging ``A`` over one pass of the training set before the first step and not
     updated at step 0 (``training_utils.train_initialization``); ``H_a = (Ā + √λ I)⁻¹`` explicitly at
     step 0 only;
   * ``minibatch`` (2022 paper, the "miniBatchADamped-HessianAction" setting of the authors' CNN
     runs): no ``Ā`` is stored; ``H_a = (A_batch + √λ I)⁻¹`` from the first mini-batch, and the
     Hessian action of step 6 uses the current mini-batch, ``A_batch v = (1/N) Σ ā (āᵀ v)``;
   * ``auto``: ``minibatch`` when the model has a conv layer (where ``A_batch`` costs
     O(N·|T|·d²) per step), ``stored`` otherwise — the authors' choice for each kind of network;

3. direction per layer ``P = −H_g · M · H_a`` (eq. (6)), and the step ``θ ← θ + α P``;
4. a second forward/backward *on the same mini-batch* at the new point θ + αP (which is the trial
   point of the authors' code: their step is the same α P), recording ``z⁺`` and ``δ⁺``;
5. G side: ``s = mean(z⁺) − mean(z)``, ``y = mean(δ⁺) − mean(δ)`` (means over examples and, for
   conv layers, positions); for mini-batches smaller than the training set they are smoothed,
   ``s̄ ← 0.9 s̄ + 0.1 s``, ``ȳ ← 0.9 ȳ + 0.1 y`` (``Kron_BFGS_momentum_s_y``); then double damping
   (:func:`double_damping`: Powell with μ₁ = 0.2, then Levenberg-Marquardt with μ₂ = the G-side
   damping √λ/√|T|) and the inverse BFGS update of ``H_g`` (:func:`bfgs_inverse_update_`: dense
   for K-BFGS, the compact limited-memory form with ``p`` pairs and ``H₀ = I`` for K-BFGS(L));
6. A side "Hessian-action BFGS": ``u = mean ā`` (homogeneous, last entry 1), ``s_a = H_a u``,
   ``y_a = (A + √λ I) s_a``, inverse BFGS update of ``H_a`` (eq. (9)); this keeps ``H_a`` the
   damped inverse of the moving ``A`` in the direction that matters most without re-inverting
   (the 2020 code appends 1 to ``mean h`` too; its ``mean(mean(h))`` alternative is commented out).

Checked against the authors' code (``tests/test_authors_trajectory.py``, ``docs/kbfgs_vs_authors.md``):
from the same weights and batches, in float64, our steps equal theirs to 3e-13 relative after 20 steps
of the full MNIST autoencoder and to 6e-10 after 30 steps of the reduced one. At α = λ = 0.3 the method
is unstable for a fraction of initialisations in both codes (float32, no line search): the loss rises for
a few steps, the activations grow and the run ends in NaN within the first epoch.

With a fresh, noisy ``A_batch`` every step the mini-batch action pulls ``H_a`` below the damped
inverse of the average A in the directions it does not revisit (it acts as extra damping; see
``tests/test_kbfgs.py::test_minibatch_hessian_action_errs_towards_more_damping``); the stored mode
tracks the inverse of the moving average within a few per cent.

Skip rule of every BFGS update (``get_BFGS_formula``, ``Kron_LBFGS_append_s_y``): no update when
``sᵀy ≤ 10⁻⁴ ‖s‖² ‖ḡ‖`` (ḡ = mean pre-activation gradient δ for ``H_g``, ``u`` for ``H_a``), in
particular when ``sᵀy ≤ 0``, or when the update is not finite. The comparisons run on the device
with ``torch.where`` (no host synchronisation inside a step); the limited-memory buffer is a ring
whose write position is a device counter.

Defaults (``conf/optimizer/kbfgs*.yaml``) are the authors': batch 1000, α = 0.3, λ = 0.3 (MNIST
autoencoder demo), β = 0.9, μ₁ = 0.2, momentum 0.9, τ = 1e-5, p = 100 (``Kron_BFGS_number_s_y``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ksd.errors import require
from ksd.optim.kronecker import (
    KroneckerLayer,
    KroneckerOptimizer,
    LayerRecord,
    PassRecord,
    damped_inverse,
)
from ksd.problem import Problem


def double_damping(
    s: Tensor, y: Tensor, h_times: Callable[[Tensor], Tensor], mu1: float, mu2: float
) -> tuple[Tensor, Tensor]:
    """Powell damping of ``s`` towards ``H y`` then Levenberg-Marquardt damping of ``y`` towards ``s``.

    2020 paper §3.2 ("DD"), ``get_BFGS_PowellHDamping`` and ``get_BFGS_ModifiedDamping``:

    * if ``sᵀy < μ₁ yᵀHy``: ``θ = (1 − μ₁) yᵀHy / (yᵀHy − sᵀy)``, ``s ← θ s + (1 − θ) H y``
      (afterwards ``sᵀy = μ₁ yᵀHy``);
    * if ``sᵀy < μ₂ sᵀs``: ``θ = (1 − μ₂) sᵀs / (sᵀs − sᵀy)``, ``y ← θ y + (1 − θ) s``
      (afterwards ``sᵀy = μ₂ sᵀs > 0``, so the BFGS update keeps ``H`` positive definite and its
      inverse's eigenvalues bounded by ``1/μ₂`` along ``s``).

    Returns new tensors; the branches are selected with ``torch.where`` on the device.
    """
    hy = h_times(y)
    sy, yhy = s.dot(y), y.dot(hy)
    theta = torch.where(sy < mu1 * yhy, (1 - mu1) * yhy / (yhy - sy), 1.0)
    s = theta * s + (1 - theta) * hy
    ss, sy = s.dot(s), s.dot(y)
    theta = torch.where(sy < mu2 * ss, (1 - mu2) * ss / (ss - sy), 1.0)
    y = theta * y + (1 - theta) * s
    return s, y


def accept_pair(s: Tensor, y: Tensor, g: Tensor, threshold: float) -> Tensor:
    """The authors' skip test as a 0-dim bool tensor: ``sᵀy > threshold · ‖s‖² · ‖g‖``, all finite.

    A non-finite ``s`` makes ``sᵀs`` (hence the comparison) inf or nan, and a non-finite ``y`` is caught
    by ``yᵀy``, so three dot products decide it.
    """
    sy = s.dot(y)
    return (sy > 0) & (sy > threshold * s.dot(s) * g.norm()) & torch.isfinite(y.dot(y))


def bfgs_inverse_update_(h: Tensor, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
    """In place ``H ← H + (ρ² yᵀHy + ρ) s sᵀ − ρ (H y sᵀ + s yᵀ H)``, ``ρ = 1/sᵀy``, where ``accept``.

    The BFGS update of an inverse Hessian approximation (Nocedal & Wright eq. (6.17)); afterwards
    ``H y = s``. Written as one rank-2 product ``[u, s] [s, u]ᵀ`` with ``u = ½(ρ² yᵀHy + ρ) s − ρ H y``.
    A rejected pair (``accept`` false, a 0-dim bool tensor) leaves ``H`` unchanged without a host
    synchronisation. Returns ``accept`` and'ed with the finiteness of the update.
    """
    hy = h @ y
    sy, yhy = s.dot(y), y.dot(hy)
    rho = 1 / sy
    u = (0.5 * (rho * rho * yhy + rho)) * s - rho * hy
    accept = accept & torch.isfinite(u).all()
    u = torch.where(accept, u, 0.0)
    s = torch.where(accept, s, 0.0)
    h.addmm_(torch.stack([u, s], 1), torch.stack([s, u], 0))
    return accept


class KBFGS(KroneckerOptimizer):
    """K-BFGS: dense ``H_g`` per layer (d_out × d_out), initialised to the identity."""

    @dataclass
    class Config(KroneckerOptimizer.Config):
        name: str = "kbfgs"
        a_update: str = "auto"  # auto | stored | minibatch
        a_decay: float = 0.9  # β of the moving average Ā (stored mode)
        powell_mu: float = 0.2  # μ₁ of Powell's damping
        sy_momentum: float = 0.9  # smoothing of (s, y) for mini-batches; 0 with the full batch
        skip_threshold: float = 1e-4  # skip a pair when sᵀy ≤ this · ‖s‖² ‖ḡ‖

        def __post_init__(self) -> None:
            super().__post_init__()
            require(
                self.a_update in ("auto", "stored", "minibatch"),
                f"optimizer.a_update must be auto, stored or minibatch, got {self.a_update!r}.",
            )
            for key in ("a_decay", "sy_momentum"):
                value = getattr(self, key)
                require(0 <= value < 1, f"optimizer.{key} must be in [0, 1), got {value}.")
            require(0 < self.powell_mu < 1, f"optimizer.powell_mu must be in (0, 1), got {self.powell_mu}.")
            require(self.skip_threshold >= 0, "optimizer.skip_threshold must be >= 0.")

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        mode = self.config.a_update
        if mode == "auto":
            mode = "minibatch" if any(layer.is_conv for layer in self.layers) else "stored"
        self.a_mode = mode
        like = problem.theta
        self.state.update(
            H_a=[],
            A=[],
            s_avg=[like.new_zeros(layer.n_out) for layer in self.layers],
            y_avg=[like.new_zeros(layer.n_out) for layer in self.layers],
        )
        self._init_output_factors()

    # ------------------------------------------------------------------ G side (dense)
    def _init_output_factors(self) -> None:
        like = self.problem.theta
        self.state["H_g"] = [
            torch.eye(layer.n_out, dtype=like.dtype, device=like.device) for layer in self.layers
        ]

    def _prepare_output_factors(self) -> None:
        """Hook for K-BFGS(L): build what applying ``H_g`` needs, once per step."""

    def _output_factor_times(self, index: int, matrix: Tensor) -> Tensor:
        return self.state["H_g"][index] @ matrix

    def _update_output_factor(self, index: int, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
        return bfgs_inverse_update_(self.state["H_g"][index], s, y, accept)

    # ------------------------------------------------------------------ A side
    def _init_input_factors(self, first: PassRecord) -> None:
        """Step 0: ``A`` from a pass over the training set (stored) or the first mini-batch, inverted."""
        st, problem = self.state, self.problem
        if self.a_mode == "stored":
            size = self.config.batch_size or problem.max_chunk
            moments = [problem.theta.new_zeros(layer.n_in, layer.n_in) for layer in self.layers]
            for chunk in problem.full_batch.chunks(size):
                record = self.layers.input_pass(chunk)
                for layer, moment, rec in zip(self.layers, moments, record.layers):
                    moment += layer.input_second_moment(rec, problem.n_train)
            st["A"] = moments
        else:
            moments = [
                layer.input_second_moment(rec, first.examples)
                for layer, rec in zip(self.layers, first.layers)
            ]
        st["H_a"] = [
            damped_inverse(moment, layer.damping(self.config.damping)[0])
            for layer, moment in zip(self.layers, moments)
        ]

    def _input_factor_times(
        self, layer: KroneckerLayer, index: int, record: LayerRecord, examples: int, v: Tensor
    ) -> Tensor:
        """``(A + √λ_A I) v`` with the stored ``Ā`` or the current mini-batch's ``A``."""
        damping = layer.damping(self.config.damping)[0]
        if self.a_mode == "stored":
            return torch.addmv(v, self.state["A"][index], v, beta=damping)
        return layer.input_second_moment_action(record, examples, v).add_(v, alpha=damping)

    # ------------------------------------------------------------------ step
    def step(self) -> dict:
        c, st, problem = self.config, self.state, self.problem
        lr = self.learning_rate()  # from the epoch reached before this step's batch
        batch = self.next_batch()
        first = self.layers.forward_backward(batch, gradient=True)
        loss, grad = self.regularized(first.loss, first.grad)
        momentum = self.momentum_gradient(grad)
        if st["step"] == 0:
            self._init_input_factors(first)
        elif self.a_mode == "stored":
            for layer, a_bar, rec in zip(self.layers, st["A"], first.layers):
                layer.update_input_second_moment_(a_bar, rec, first.examples, c.a_decay)

        named_momentum, named_theta = problem.unflatten(momentum), problem.unflatten(problem.theta)
        self._prepare_output_factors()
        for index, layer in enumerate(self.layers):
            direction = self._output_factor_times(
                index, layer.times_input_factor(named_momentum, st["H_a"][index])
            )
            layer.add_matrix_(named_theta, direction, -lr)

        second = self.layers.forward_backward(batch, gradient=False)
        smoothing = c.sy_momentum if len(batch) < problem.n_train else 0.0
        accepted = []
        for index, layer in enumerate(self.layers):
            before, after = first.layers[index], second.layers[index]
            mean_delta = layer.output_grad_mean(before)
            s = layer.output_mean(after) - layer.output_mean(before)
            y = layer.output_grad_mean(after) - mean_delta
            s_avg = st["s_avg"][index].mul_(smoothing).add_(s, alpha=1 - smoothing)
            y_avg = st["y_avg"][index].mul_(smoothing).add_(y, alpha=1 - smoothing)
            s, y = double_damping(
                s_avg,
                y_avg,
                lambda v, i=index: self._output_factor_times(i, v.unsqueeze(1)).squeeze(1),
                c.powell_mu,
                layer.damping(c.damping)[1],
            )
            accept = accept_pair(s, y, mean_delta, c.skip_threshold)
            accepted.append(self._update_output_factor(index, s, y, accept))

            u = layer.input_mean(before)
            s_a = st["H_a"][index] @ u
            y_a = self._input_factor_times(layer, index, before, first.examples, s_a)
            bfgs_inverse_update_(st["H_a"][index], s_a, y_a, accept_pair(s_a, y_a, u, c.skip_threshold))
        st["step"] += 1
        return {"loss": loss, "lr": lr, "g_updates": torch.stack(accepted).sum()}


class KBFGSL(KBFGS):
    """K-BFGS(L): ``H_g`` in compact limited-memory form from the last ``history_size`` pairs, ``H₀ = I``.

    The pairs live in ring buffers ``S``, ``Y`` (p × d_out) written at ``count mod p`` where ``count``
    (a device tensor) advances only for accepted pairs. Each step rebuilds the compact representation
    of Byrd, Nocedal & Schnabel (1994, Thm 2.2), as the authors' ``Kron_LBFGS_append_s_y``:
    ``H = γ I + [S R⁻ᵀ, γ Y] [[(D + γ YᵀY) R⁻¹ Sᵀ − γ Yᵀ], [−R⁻¹ Sᵀ]]`` with ``R`` the upper
    triangle of ``Sᵀ Y`` (pairs oldest first), ``D`` its diagonal and ``γ = 1``
    (``Kron_LBFGS_Hg_initial``), so ``H X = X + L (R' X)`` is two thin matrix products. Unwritten
    slots are zero pairs; giving them ``R_kk = 1`` makes their rows and columns vanish from ``L, R'``.
    """

    @dataclass
    class Config(KBFGS.Config):
        name: str = "kbfgs_l"
        history_size: int = 100  # p: (s, y) pairs kept per layer

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.history_size >= 1, f"optimizer.history_size must be >= 1, got {self.history_size}.")

    def _init_output_factors(self) -> None:
        p, like = self.config.history_size, self.problem.theta
        self.state.update(
            S=[like.new_zeros(p, layer.n_out) for layer in self.layers],
            Y=[like.new_zeros(p, layer.n_out) for layer in self.layers],
            pairs=[torch.zeros((), dtype=torch.long, device=like.device) for _ in self.layers],
        )
        self._compact: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)

    def _prepare_output_factors(self) -> None:
        st, p = self.state, self.config.history_size
        width = min(st["step"], p)  # at most one pair per step: the last `width` slots hold them all
        for index in range(len(self.layers)):
            self._compact[index] = None if width == 0 else self._compact_form(index, width)

    def _compact_form(self, index: int, width: int) -> tuple[Tensor, Tensor]:
        st, p = self.state, self.config.history_size
        offsets = torch.arange(width, device=st["pairs"][index].device)
        order = (st["pairs"][index] - width + offsets) % p  # oldest first
        s, y = st["S"][index][order], st["Y"][index][order]
        sy = s @ y.T
        d = sy.diagonal()
        r = torch.triu(sy)
        r.diagonal().copy_(torch.where(d > 0, d, torch.ones_like(d)))
        r_inv_st = torch.linalg.solve_triangular(r, s, upper=True)  # R⁻¹ Sᵀ, stored as rows
        left = torch.cat([r_inv_st.T, y.T], 1)
        middle = torch.diag(d) + y @ y.T
        right = torch.cat([middle @ r_inv_st - y, -r_inv_st], 0)
        return left, right

    def _output_factor_times(self, index: int, matrix: Tensor) -> Tensor:
        compact = self._compact[index]
        if compact is None:
            return matrix.clone()
        left, right = compact
        return torch.addmm(matrix, left, right @ matrix)

    def _update_output_factor(self, index: int, s: Tensor, y: Tensor, accept: Tensor) -> Tensor:
        st = self.state
        count = st["pairs"][index]
        slot = (count % self.config.history_size).view(1)
        for buffer, value in ((st["S"][index], s), (st["Y"][index], y)):
            buffer.index_put_((slot,), torch.where(accept, value, buffer[slot][0]).unsqueeze(0))
        count += accept
        return accept
