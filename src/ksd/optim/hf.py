"""Hessian-free optimisation: truncated Gauss-Newton with conjugate gradient (Martens, ICML 2010).

One :meth:`HessianFree.step` is one outer iteration ``k`` (an "epoch" in Martens' code):

1. objective ``f(θ) = f_D(θ) + τ/2 ‖θ‖²`` and gradient ``g = ∇f(θ)`` on the gradient batch ``D`` (the
   whole training set by default, ``batch_size`` otherwise), and the mean squared per-example
   gradient ``F_diag = (1/|D|) Σ_{i∈D} (∇ℓ_i)²`` on the same batch, from the same forward/backward
   pass (:func:`ksd.curvature.loss_gradient_and_squared_gradients`);
2. curvature chunk ``C``: the training set cut into ``num_chunks`` fixed contiguous chunks, chunk
   ``k mod num_chunks`` (``problem.train_chunk``); with ``chunk_order: shuffled`` the chunks are cut
   from one fixed permutation of the training set instead (Martens' demo permutes the cases once);
3. diagonal preconditioner ``M = (F_diag + λ + τ)^{3/4}`` (§4.7; ``M = I`` with ``preconditioner: false``);
4. ``p`` ≈ minimiser of ``q(p) = gᵀp + ½ pᵀ(G_C + (λ + τ) I) p`` by preconditioned CG
   (:func:`ksd.optim.linalg.conjugate_gradient`: at most ``max_cg_iterations``, Martens'
   relative-progress stop with ε = ``cg_tolerance`` and the sign test of ``cg_stop_rule``, bail-out on
   ``pᵀAp ≤ 0``), started from
   ``ζ p_prev`` (ζ = ``warm_start``), saving the iterates ``i = ⌈5·1.3^j⌉`` and the last;
   ``G_C`` is the Gauss-Newton matrix of the mean loss on ``C``, one :func:`ksd.curvature.ggn_operator`
   per step (the chunk's forward pass is stored once, as in Martens' code, and shared by all products);
5. CG backtracking (§4.6): ``f`` at the saved iterates from the last backwards while it does not
   increase; ``p`` = the earliest iterate of that non-increasing run;
6. reduction ratio on the curvature chunk, with the *undamped* quadratic
   ``ρ = [f_C(θ+p) − f_C(θ)] / [gᵀp + ½ pᵀ(G_C + τI)p]``, ``ρ = −∞`` if ``f_C(θ+p) > f_C(θ)``;
7. Armijo backtracking on ``D``: ``r = 1, 0.8, 0.8², …`` (at most ``line_search_tries`` values), the
   first with ``f(θ + r p) ≤ f(θ) + 0.01 r gᵀp``; none → the step is rejected (``r = 0``);
8. Levenberg-Marquardt: ``λ ← 3/2 λ`` if ``ρ < 1/4`` (or NaN), ``λ ← 2/3 λ`` if ``ρ > 3/4``;
9. ``θ ← θ + r p``; the warm start of the next CG run is the *last* CG iterate.

Cost (MNIST autoencoder, 10,000 examples, 2-core CPU; one iteration with 12 CG iterations): the
Gauss-Newton products take half the time, the CG-backtracking and line-search objectives on the gradient
batch a quarter. Profiling removed two overheads: each product re-ran the chunk's forward pass (now one
stored forward per step, :func:`~ksd.curvature.ggn_operator`: 1.75 → 1.25 gradients per product), and the
squared gradients took a second pass over the gradient batch (now shared with the gradient: the
iteration went from 7.05 s to 6.32 s).

Faults (docs/faults.md): a non-finite objective or gradient at θ raises
:class:`~ksd.optim.base.Diverged`; CG stops on ``pᵀAp ≤ 0`` (or NaN) and HF goes on with the iterates
saved so far (the warm start alone when it stops at once); a non-finite objective at a trial point
counts as +∞ in steps 5–7, so that point is backtracked from or the step rejected.

What the sources say, and what this module chose
------------------------------------------------
Sources: the paper (only its abstract and summaries were at hand) and Martens' public demo code —
``hf_train.m`` / ``nnet_train_2.m`` with ``conjgrad_1.m``, read in public forks through the code search
(the files that set ``initlambda = 45.0``, ``decay = 0.95``, ``numchunks = 4``, ``weightcost = 2e-5``).
Since then run beside his ``nnet_train_2.m`` / ``conjgrad_1.m`` in GNU Octave, in double precision, on
a small autoencoder from the same weights (``docs/hf_vs_martens.md``): the first 12 iterations agree to
≤ 5·10⁻¹³ relative in f, ‖g‖, ρ and ‖p‖, with the same CG iterations, chosen iterates, line-search
rates and λ; ``tests/test_hf_martens.py`` keeps the first 10 (``tests/data/hf_martens_reference.json``).

* **Normalisation of G and λ**: the demo code divides ``G`` by the chunk size and adds λ to that
  per-case matrix (its comment: the ICML paper added λ to the unnormalised matrix; same up to the
  scale); ``initial_damping = 45`` refers to this normalisation, as ALGORITHMS.md §4 says.
* **ρ's denominator** uses the full gradient ``g`` of step 1 (not the chunk's gradient) and the
  curvature with weight decay but without λ (the code switches ``autodamp`` off for that one
  product; its comment says the author was "not 100% sure" but it "probably doesn't make a huge
  difference"). The chunk objectives in the numerator include the weight-decay term, as in the code.
* **CG backtracking** evaluates ``f`` on the gradient batch (the code's "full training set version";
  the paper allows the mini-batch). Going back stops at the first earlier iterate whose ``f`` is
  strictly larger (ties continue backwards, as ``if ll > lowll`` in the code).
* **Line search**: the code counts *reductions* up to 60 and rejects after the 60th without
  testing it; here ``line_search_tries = 60`` trial rates ``0.8^0 … 0.8^59`` are each tested, so the
  last evaluation is not wasted. The code tests the same 60 rates (``j = 0 … 59``); it then evaluates
  ``f`` at ``0.8^60`` and rejects without looking at it. So the accepted rate, the rejection and the
  trajectory are the same, and the count is not an option: the code spends one more objective when
  it rejects, and prints ``j`` reductions where ``line_search_tries`` counts ``j + 1`` trials
  (``tests/test_hf_martens.py`` checks both against his loop). The Armijo test's first trial reuses
  ``f(θ+p)`` from step 5.
* **Warm start**: ``ch = decay * ch`` with ``ch = chs{end}``, the last CG iterate — neither the
  backtracked iterate nor the step actually taken, and kept even when the step is rejected.
* **Stop rule**: the code tests ``q_{i−k} < 0`` and ``i ≥ miniters`` (``miniters = 1``); this module
  tests the paper's ``q_i < 0`` by default (``cg_stop_rule: paper``; ``martens``: the code's test). The
  two fire at the same iteration whenever ``k·cg_tolerance ≤ 1`` (with ``q_i`` and ``q_{i−k}`` of
  opposite signs the ratio ``(q_i − q_{i−k})/q_i`` is ≥ 1 under either test), which holds for every
  ``cg_tolerance ≤ 1/⌈0.1·max_cg_iterations⌉``, the default included; they differ only for larger ones.
* **Weight decay** ``τ = 2·10⁻⁵`` on all parameters (the code's ``maskp`` is all ones: "not masking
  out the weight-decay for biases"); it enters ``f``, ``g``, ``G`` and the preconditioner.
* **Sparse initialisation** is a model option (``model.init=sparse``): ``conf/optimizer/hf.yaml``
  selects it through the ``init`` config group, so ``ksd-run optimizer=hf`` uses it unless the command
  line says ``model.init=default``.
* **Curvature chunks**: ``num_chunks = 4`` is the CURVES setting of the code (MNIST: 8, FACES: 20).
  Chunks are contiguous slices of the training set in file order, cycled (``chunk_order: contiguous``).
  ``nnet_train_2.m`` itself cuts contiguous chunks of the cases in the order it is given; its demo
  script (``nnet_demo_2.m``) permutes the training cases once (``randperm``) before calling it, and
  ``chunk_order: shuffled`` does the same with a fixed permutation (``torch.randperm`` with seed
  ``ksd.optim.chunks.CHUNK_SEED``, the same for every run, like the validation carve; our CURVES/MNIST
  training splits have no class order, so contiguous chunks are already unsorted samples). The gradient
  and line-search batch are the whole training set either way.
* **λ updates**: the code multiplies by ``drop = 2/3`` and ``boost = 1/drop``; this module divides and
  multiplies by ``damping_factor = 1.5``. ``λ·(2/3)`` and ``λ/1.5`` differ in the last bit at times
  (measured: ≤ 1.2·10⁻¹⁵ relative after 40 updates), far below what the trajectory resolves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ksd.curvature import ggn_operator, loss_gradient_and_squared_gradients
from ksd.errors import require
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.optim.chunks import CHUNK_ORDERS, CurvatureChunks
from ksd.optim.linalg import conjugate_gradient
from ksd.problem import Batch, Problem

#: Levenberg-Marquardt thresholds on the reduction ratio ρ (Martens 2010, §4.1; Moré 1978).
RHO_LOW, RHO_HIGH = 0.25, 0.75
CG_STOP_RULES = ("paper", "martens")


class HessianFree(CurvatureChunks, Optimizer):
    step_scale_applies_to = "1 / λ (the damping is divided by it)"

    @dataclass
    class Config(OptimizerConfig):
        name: str = "hf"
        batch_size: int | None = None  # gradient, line-search and CG-backtracking batch; None: all data
        weight_decay: float = 2e-5  # τ
        initial_damping: float = 45.0  # λ₀, added to the per-case-normalised Gauss-Newton matrix
        damping_factor: float = 1.5  # λ × factor if ρ < 1/4, λ / factor if ρ > 3/4
        num_chunks: int = 4  # curvature batch = one of this many fixed chunks of the training set, cycled
        max_cg_iterations: int = 250
        min_cg_iterations: int = 1
        cg_tolerance: float = 5e-4  # ε of the relative-progress stop
        warm_start: float = 0.95  # ζ: CG starts from ζ × the previous CG solution
        preconditioner: bool = True  # M = (F_diag + λ + τ)^exponent, else M = I
        preconditioner_exponent: float = 0.75
        cg_backtracking: bool = True  # choose among the saved CG iterates by the objective
        armijo_c: float = 0.01  # sufficient-decrease constant
        backtrack_factor: float = 0.8  # step-rate reduction per Armijo trial
        line_search_tries: int = 60  # Armijo trials before the step is rejected
        cg_stop_rule: str = "paper"  # CG progress stop needs q_i < 0 ("paper") or q_{i-k} < 0 ("martens")
        chunk_order: str = "contiguous"  # curvature chunks: "contiguous" slices or "shuffled" (fixed order)

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("initial_damping", "num_chunks", "max_cg_iterations", "cg_tolerance")
            self.positive("line_search_tries")
            factor = self.damping_factor
            require(factor > 1, f"optimizer.damping_factor must be > 1, got {factor}.")
            require(
                1 <= self.min_cg_iterations <= self.max_cg_iterations,
                "optimizer.min_cg_iterations must be between 1 and optimizer.max_cg_iterations.",
            )
            zeta = self.warm_start
            require(0 <= zeta <= 1, f"optimizer.warm_start must be in [0, 1], got {zeta}.")
            require(
                self.preconditioner_exponent >= 0,
                f"optimizer.preconditioner_exponent must be >= 0, got {self.preconditioner_exponent}.",
            )
            require(0 < self.armijo_c < 1, f"optimizer.armijo_c must be in (0, 1), got {self.armijo_c}.")
            require(
                0 < self.backtrack_factor < 1,
                f"optimizer.backtrack_factor must be in (0, 1), got {self.backtrack_factor}.",
            )
            for key, allowed in (("cg_stop_rule", CG_STOP_RULES), ("chunk_order", CHUNK_ORDERS)):
                value = getattr(self, key)
                require(
                    value in allowed, f"optimizer.{key} must be one of {', '.join(allowed)}, got {value!r}."
                )

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        if problem.n_train:  # refuse a too small training set before training (the library API: each step)
            self.check_chunks()
        self.state.update(damping=float(self.config.initial_damping), previous_step=None, iteration=0)

    def step(self) -> Stats:
        c, st, problem = self.config, self.state, self.problem
        theta, damping = problem.theta, st["damping"] / self.step_scale
        self.check_chunks()
        batch = self.next_batch()
        if c.preconditioner:  # one pass for the gradient and the squared per-example gradients
            loss, grad, squares = loss_gradient_and_squared_gradients(problem, batch)
        else:
            loss, grad = problem.loss_and_grad(batch)
        loss, grad = self.regularized(loss, grad, theta=theta)
        self.check_finite(f"loss or gradient at HF iteration {st['iteration']}", loss, grad)
        f0 = loss.item()
        chunk = self.curvature_chunk(st["iteration"])
        ggn = ggn_operator(problem, chunk)  # one stored forward on the chunk for all of this step's products
        shift = damping + c.weight_decay

        def damped_ggn(v: Tensor) -> Tensor:
            return ggn(v).add_(v, alpha=shift)

        preconditioner = None
        if c.preconditioner:
            preconditioner = squares.div_(len(batch)).add_(shift).pow_(c.preconditioner_exponent)
        start = None if st["previous_step"] is None else st["previous_step"] * c.warm_start
        cg = conjugate_gradient(
            damped_ggn, grad.neg(), start, preconditioner=preconditioner, max_iterations=c.max_cg_iterations,
            min_iterations=c.min_cg_iterations, tolerance=c.cg_tolerance,
            stop_sign="earlier" if c.cg_stop_rule == "martens" else "current",
        )
        st["previous_step"] = cg.iterates[-1]

        chosen = len(cg.iterates) - 1
        f_step = self._objective(batch, theta + cg.iterates[chosen])
        while c.cg_backtracking and chosen > 0:
            earlier = self._objective(batch, theta + cg.iterates[chosen - 1])
            if earlier > f_step:
                break
            chosen, f_step = chosen - 1, earlier
        step = cg.iterates[chosen]

        slope = grad.dot(step).item()
        rho = self._reduction_ratio(chunk, ggn, slope, step)
        rate, tries = 1.0, 1
        while f_step > f0 + c.armijo_c * rate * slope:
            if tries == c.line_search_tries:
                rate = 0.0
                break
            rate *= c.backtrack_factor
            tries += 1
            f_step = self._objective(batch, theta + rate * step)

        if not rho >= RHO_LOW:  # also NaN
            st["damping"] *= c.damping_factor
        elif rho > RHO_HIGH:
            st["damping"] /= c.damping_factor
        if rate > 0:
            theta.add_(step, alpha=rate)
        st["iteration"] += 1
        return {
            "loss": loss,
            "damping": damping,
            "cg_iterations": cg.iterations[-1],
            "cg_chosen_iteration": cg.iterations[chosen],
            "rho": rho,
            "step_size": rate,
            "line_search_tries": tries,
        }

    def _reduction_ratio(
        self, chunk: Batch, ggn: Callable[[Tensor], Tensor], slope: float, step: Tensor
    ) -> float:
        """``ρ = [f_C(θ+p) − f_C(θ)] / [gᵀp + ½ pᵀ(G_C + τI)p]`` with ``slope = gᵀp``; −∞ when ``f_C``
        increases."""
        theta, tau = self.problem.theta, self.config.weight_decay
        before, after = self._objective(chunk, theta), self._objective(chunk, theta + step)
        if after > before:
            return -math.inf
        curvature = ggn(step).add_(step, alpha=tau)
        predicted = slope + 0.5 * step.dot(curvature).item()
        return (after - before) / predicted if predicted != 0 else math.nan
