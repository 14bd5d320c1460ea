"""Krylov Subspace Descent (Vinyals & Povey, "Krylov Subspace Descent for Deep Learning", AISTATS 2012,
arXiv 1111.4259).

One :meth:`KrylovSubspaceDescent.step` is one outer iteration ``n``:

1. gradient ``g = ∇f(θ)`` (+ ``τθ``) on the gradient batch (all training data by default);
2. two disjoint random subsets of the training set, fresh every iteration: the curvature subset ``C``
   and the BFGS subset ``B``;
3. diagonal preconditioner ``D = (F/|C| + τ)^{3/4}``, ``F = Σ_{i∈C} (∇ℓ_i)²`` floored at ``10⁻⁴ max F``
   (``D = I`` when ``preconditioner: false``);
4. orthonormal basis of the preconditioned Krylov subspace plus the previous step,

   ``span{D⁻¹g, (D⁻¹A)D⁻¹g, …, (D⁻¹A)^{K−1}D⁻¹g, d_{n−1}}``,  ``A = G_C + τI`` (Gauss-Newton) or ``H_C + τI``,

   built one vector at a time (``v_{k+1} ∝ D⁻¹ A v_k`` orthogonalised against ``v_1 … v_k``, twice), kept
   as the rows of ONE preallocated ``(K+1) × n`` matrix ``V``. A vector that vanishes in
   orthogonalisation (relative norm below ``breakdown_tolerance``: the Krylov space is invariant, or
   the previous step lies in it) cuts the basis before it; the method carries on with fewer vectors
   (statistics ``basis_size``, ``krylov_breakdown``). A zero preconditioned gradient leaves no Krylov
   vector: the basis is the previous step alone, or empty and the step zero;
5. the projected curvature ``Ĥ = V A Vᵀ`` ((K+1)², float64) from the same products: column ``k`` is
   ``V (A v_k)``, so the recursion's ``K − 1`` products are reused and one batched product of the last
   Krylov vector and the previous step completes it (``K + 1`` products in all);
6. minimise ``φ(a) = f_B(θ + Vᵀa) (+ τ/2 ‖θ + Vᵀa‖²)`` over ``a ∈ ℝ^{K+1}`` from ``a = 0`` by BFGS with
   the initial inverse Hessian ``Ĥ_floor⁻¹`` (eigenvalues ``|λ|`` floored at ``10⁻⁴ max |λ|``), a
   strong-Wolfe line search and at most ``bfgs_max_iterations`` iterations (``∇φ = V ∇f_B``, one
   forward+backward on ``B`` per evaluation; the small dense work in float64 on the host);
7. ``d_n = Vᵀa*``, ``θ ← θ + d_n``. No damping, no learning rate.

Faults (docs/faults.md): a non-finite loss or gradient at θ, a non-finite basis vector or projected
curvature raise :class:`~ksd.optim.base.Diverged`; the subspace BFGS skips pairs with
``sᵀy ≤ 10⁻¹⁰ ‖s‖‖y‖`` and stops when its line search finds no decrease (non-finite trial points count
as +∞), keeping the best point so far.

What the sources say, and what this module chose
------------------------------------------------
Searched (``search`` tool): the paper (arxiv-vanity, PMLR, moam.info copies), Vinyals' thesis
(UCB/EECS-2013-202, ch. 3; only a third-party chapter summary is stored), ``pbrakel/ksd-theano``
(``optimizer.py``, ``train_dae_curves.py`` at 492d9c1) and the historic ``BRML/climin`` ``climin/ksd.py``
(two versions; they cite the OPT 2011 workshop version of the paper).

* **Paper.** Only the abstract (and introduction opening) could be read. It confirms: a Krylov
  subspace from the gradient and a curvature matrix (Gauss-Newton in practice, the Hessian allowed,
  no PSD requirement), curvature products on a subset, the subspace optimisation on a (separate)
  subset, no damping parameter, the basis memory as the chief cost. K, the exact preconditioner,
  subset sizes and the BFGS cap could not be checked against the body text. Pascanu & Bengio (2013,
  notes in ``tttor/ml-foundation``) confirm the previous search direction is part of the subspace
  ("akin to nonlinear CG").
* **K** (``krylov_dim``): 20, as the project brief and ALGORITHMS.md (unverified recollection).
  pbrakel's CURVES example uses 80.
* **Preconditioner.** pbrakel's "martens" option: ``F = Σ_i (∇ℓ_i)²`` over the curvature data,
  floored at ``10⁻⁴ max F``, applied as ``F^{−3/4}`` (its CURVES example runs *without*
  preconditioning). climin divides by the squared *full-batch* gradient ``g²`` (exponent 1). Chosen:
  Martens' HF form ``(F/|C| + τ)^{3/4}`` with the floor, without HF's damping λ (KSD has none). Without
  weight decay the scale of ``D`` does not change the subspace.
* **Subsets.** pbrakel: 5 × 1000 = 5,000 of 18,000 CURVES cases for the curvature and 5,000 for BFGS,
  reshuffled independently every iteration (so they may overlap). Chosen: 5,000 each, disjoint, fresh
  every iteration (``problem.random_batches``); each is cut to half the training set when that is smaller.
  ``subsets: independent`` draws each on its own (they may overlap), as pbrakel does.
* **Previous step.** Both reference codes compute it (first iteration: ``e₁`` in pbrakel, all-ones in
  climin) but store basis vector ``i+1`` only while ``i < K``, so the orthogonalised previous step is
  discarded and their basis is ``K+1`` Krylov vectors — a bug, against the paper's description
  (ALGORITHMS.md §5 now says so too). Chosen: append it as the last row; on the first iteration there is
  none and the basis has ``K`` vectors (no arbitrary vector). ``previous_step: false`` leaves it out: with
  ``krylov_dim = K + 1`` that is pbrakel's basis for its ``space_size = K``.
* **Projected curvature and BFGS start.** Both references compute ``Ĥ = Vᵀ A V`` from the recursion's
  products and precondition BFGS with it: pbrakel floors the singular values (= ``|λ|`` of the
  symmetric ``Ĥ``) at ``10⁻⁴ max`` and runs scipy's BFGS over ``b = Lᵀa`` (``Ĥ = LLᵀ``); climin (earlier
  version) passes ``Ĥ⁻¹`` as BFGS's initial inverse Hessian, clipping eigenvalues at ``10⁻⁴ max``. The two
  are the same algorithm. Chosen: ``H₀ = Ĥ_floor⁻¹`` with ``|λ|`` floored at ``10⁻⁴ max |λ|`` (keeps the
  scale of negative-curvature directions when ``curvature: hessian``).
* **BFGS cap.** pbrakel 30 iterations (``maxiter``), climin ``2 × (K+1)``, paper unknown. Chosen: 40
  (ALGORITHMS.md's proposal), plus a stop on relative decrease below ``bfgs_tolerance``.
* **Orthogonalisation.** pbrakel: one modified Gram-Schmidt pass ("first vector is not that orthogonal to
  the rest"); climin: one pass. Chosen: classical Gram-Schmidt applied twice with float64-accumulated
  coefficients: as accurate as modified Gram-Schmidt with re-orthogonalisation and much faster here
  (see :func:`orthogonalize`).

Run beside pbrakel/ksd-theano (issue 21, docs/ksd_vs_reference.md: PyTensor, float64, the same weights and
subsets by index): with ``krylov_dim = K + 1`` and ``previous_step: false`` the gradient, the Krylov
subspace and ``Ĥ`` agree to rounding (principal angles ≤ 1.4e-13) and the step to the reference's BFGS
stop (its scipy ``fmin_bfgs`` ends on ``‖∇‖_∞ ≤ 1e-5`` in the whitened coordinates, after 9–22
evaluations, before the cap of 30); ``tests/test_ksd_reference.py`` follows its recorded trajectory.

Cost and memory. Per iteration: one gradient on the gradient batch, the per-example squared gradients
and ``K + 1`` curvature products on ``C``, one forward+backward on ``B`` per BFGS evaluation, ``O(nK²)``
for the orthogonalisation. Host synchronisations: three while building the basis (whether vectors
vanished is read once for the Krylov vectors and once for the previous step; ``Ĥ`` is read once) and one
per BFGS evaluation (the line search needs ``φ`` and ``∇φ``). Reductions over the ``n`` parameters that
decide orthogonality (norms, Gram-Schmidt coefficients, the ``orthogonality_error`` statistic) are
accumulated in float64: in float32 on the CPU they are off by 1e-5 to 1e-4 (relative) at n = 2.8 M.
The ``K + 1`` products share one stored forward pass on ``C`` (:func:`~ksd.curvature.ggn_operator`;
the gradient's graph for the Hessian): on the MNIST autoencoder this took the basis of
``scripts/bench_ksd.py`` from 7.9 s to 6.0 s and the whole iteration from 16.7 s to 13.5 s. Memory: the
``(K+1) × n`` basis, the previous step, the preconditioner, one trial point, the stored forward pass on
``C`` and the curvature-product temporaries. The basis is a workspace, rebuilt every iteration, so it is
not part of :attr:`state` (checkpoints hold only the previous step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ksd.curvature import ggn_operator, hessian_operator, per_example_squared_gradients
from ksd.errors import require
from ksd.optim.base import Diverged, Optimizer, OptimizerConfig, Stats
from ksd.optim.linalg import inner_products, strong_wolfe
from ksd.problem import Batch, Problem

#: Builders of the curvature operator ``V ↦ A V`` on the curvature subset, one per iteration: the forward
#: pass (Gauss-Newton) or the gradient's graph (Hessian) on ``C`` is stored once and shared by all ``K + 1``
#: products, which then cost about 1.25 gradients each instead of 1.75 (``scripts/bench_curvature.py``).
#: How the curvature and BFGS subsets of an iteration are drawn (:meth:`KrylovSubspaceDescent.draw_subsets`).
SUBSETS = ("disjoint", "independent")

CURVATURES: dict[str, Callable[[Problem, Batch], Callable[[Tensor], Tensor]]] = {
    "ggn": ggn_operator,
    "hessian": hessian_operator,
}


def orthogonalize(vector: Tensor, basis: Tensor) -> Tensor:
    """Remove from ``vector`` (in place) its components along the orthonormal rows of ``basis``.

    Classical Gram-Schmidt applied twice, ``w ← w − Vᵀ(V w)`` (CGS2): the second pass removes what
    rounding left after the first, so the rows stay orthonormal to working precision even when most of
    ``vector`` lay in their span — the guarantee of modified Gram-Schmidt with re-orthogonalisation
    ("twice is enough": Giraud, Langou & Rozložník 2005), with two matrix products per pass instead of
    ``2k`` dot products and ``2k`` axpys over the whole vector (all orthogonalisations of a 21-vector
    basis of 2.8 M entries on the 2-core CPU: 1.7 s against 7.8 s). The theorem needs coefficients
    ``V w`` accurate to a small multiple of the unit roundoff, which a float32 ``V.mv(w)`` over millions
    of entries is not on the CPU (it left ``|v_iᵀv_j|`` at ~3e-5 on the MNIST autoencoder, whatever the
    number of passes), so they are accumulated in float64 (:func:`~ksd.optim.linalg.inner_products`).
    Returns ``vector``.
    """
    for _ in range(2):
        coefficients = inner_products(basis, vector.unsqueeze(0))[:, 0]
        vector.addmv_(basis.T, coefficients.to(vector.dtype), alpha=-1)
    return vector


@dataclass
class Subspace:
    """The basis of one iteration: its first ``size`` rows of the workspace, and ``Ĥ = V A Vᵀ``."""

    size: int  # rows of V in use (Krylov vectors + the previous step when kept)
    krylov_size: int  # Krylov vectors among them (< krylov_dim after a breakdown)
    curvature: Tensor  # (size, size) float64 on the host: the projected curvature V A Vᵀ


@dataclass
class SubspaceMinimum:
    """Result of the subspace BFGS: coefficients ``a*`` and ``φ`` before and after."""

    coefficients: Tensor  # (size,) float64 on the host
    loss_before: float
    loss_after: float
    iterations: int
    evaluations: int


class KrylovSubspaceDescent(Optimizer):
    step_scale_applies_to = "the subspace step Vᵀa*"

    @dataclass
    class Config(OptimizerConfig):
        name: str = "ksd"
        batch_size: int | None = None  # gradient batch; None: all training data (the paper)
        krylov_dim: int = 20  # K: Krylov vectors per iteration (+ the previous step: K + 1 basis rows)
        curvature: str = "ggn"  # ggn (Gauss-Newton, the paper's choice) | hessian
        curvature_size: int = 5000  # examples of the curvature subset C (fresh every iteration)
        bfgs_size: int = 5000  # examples of the BFGS subset B (fresh, disjoint from C)
        preconditioner: bool = True  # diagonal (F/|C| + τ)^exponent from per-example squared gradients
        preconditioner_exponent: float = 0.75  # α of Martens (2010)
        preconditioner_floor: float = 1e-4  # F floored at this fraction of max F
        curvature_floor: float = 1e-4  # |eigenvalues| of Ĥ floored at this fraction of the largest
        bfgs_max_iterations: int = 40  # cap on subspace BFGS iterations
        bfgs_tolerance: float = 1e-6  # stop BFGS when φ decreases by less than this × max(|φ|, 1)
        line_search_evaluations: int = 25  # strong-Wolfe trial points per BFGS iteration
        breakdown_tolerance: float = 1e-4  # drop a vector left with less than this fraction of its norm
        previous_step: bool = True  # the previous step as the last basis row (the paper); False: Krylov only
        subsets: str = "disjoint"  # C and B: disjoint | independent (each drawn alone, may overlap)

        def __post_init__(self) -> None:
            super().__post_init__()
            require(self.krylov_dim >= 1, f"optimizer.krylov_dim must be >= 1, got {self.krylov_dim}.")
            require(
                self.curvature in CURVATURES,
                f"optimizer.curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}.",
            )
            require(self.bfgs_max_iterations >= 1, "optimizer.bfgs_max_iterations must be >= 1.")
            self.positive("curvature_size", "bfgs_size", "preconditioner_exponent", "line_search_evaluations")
            for key in ("preconditioner_floor", "curvature_floor", "breakdown_tolerance"):
                value = getattr(self, key)
                require(0 < value < 1, f"optimizer.{key} must lie in (0, 1), got {value}.")
            require(self.bfgs_tolerance >= 0, "optimizer.bfgs_tolerance must be >= 0.")
            require(
                self.subsets in SUBSETS,
                f"optimizer.subsets must be one of {', '.join(SUBSETS)}, got {self.subsets!r}.",
            )

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        c = self.config
        if problem.n_train:  # refuse a too small training set before training (the library API: each step)
            self.subset_sizes()
        self.curvature_operator = CURVATURES[c.curvature]
        theta = problem.theta
        # Workspaces, allocated once: the basis (rows v_1 … v_{K+1}), V A Vᵀ and the trial point θ + Vᵀa.
        self.basis = theta.new_empty(c.krylov_dim + 1, theta.numel())
        self.projected = theta.new_zeros(c.krylov_dim + 1, c.krylov_dim + 1)  # lower triangle of V A Vᵀ
        self.trial = torch.empty_like(theta)
        self.state.update(previous_step=None, iteration=0)

    # ------------------------------------------------------------------ the three phases of a step
    def gradient(self) -> tuple[Tensor, Tensor]:
        """Loss and gradient (weight decay included) on the gradient batch at the current θ."""
        return self.objective_and_grad(self.next_batch())

    def build_basis(self, grad: Tensor, batch: Batch) -> Subspace:
        """Fill the rows of :attr:`basis` with the orthonormal preconditioned Krylov basis on ``batch`` and
        the previous step; return their number and the projected curvature ``V A Vᵀ``.

        The recursion runs on the device without waiting for the host: whether a vector vanished is read
        once, after all ``K`` vectors are built, and the basis is cut before the first vanished vector
        (the vectors after it are then wasted work, but a breakdown only happens when the Krylov space is
        invariant: tiny or degenerate problems). A zero preconditioned gradient leaves no Krylov vector:
        the basis is then the previous step alone, or empty (the step is zero: θ is stationary on the
        gradient batch). Host synchronisations: that one, one for the previous step and one to read ``Ĥ``.
        """
        c, V, lower = self.config, self.basis, self.projected
        scale = self._inverse_preconditioner(batch) if c.preconditioner else torch.ones_like(grad)
        norms = [self._orthonormalize(torch.mul(grad, scale, out=V[0]), 0)]
        operator = self.curvature_operator(self.problem, batch)
        for k in range(1, c.krylov_dim):
            product = self._curvature(operator, V[k - 1 : k])[0]
            torch.mv(V[:k], product, out=lower[k - 1, :k])  # v_jᵀ A v_{k−1}, j < k: row k − 1 of Ĥ
            norms.append(self._orthonormalize(torch.mul(product, scale, out=V[k]), k))
        size = krylov_size = self._kept(norms)
        # The recursion has A v_k for every kept Krylov vector but the last one, unless it broke down.
        pending = [size - 1] if size == c.krylov_dim else []
        previous = self.state["previous_step"] if c.previous_step else None
        if previous is not None and self._kept([self._orthonormalize(V[size].copy_(previous), size)]):
            pending.append(size)
            size += 1
        if pending:  # one batched product for the vectors that have none yet
            lower[pending, :size] = self._curvature(operator, V[pending]) @ V[:size].T
        curvature = lower[:size, :size].to("cpu", torch.float64).tril()
        if not torch.isfinite(curvature).all():
            raise Diverged("non-finite projected curvature V A Vᵀ (a curvature product overflowed)")
        return Subspace(size, krylov_size, curvature + curvature.tril(-1).T)

    def minimize_in_subspace(self, subspace: Subspace, batch: Batch) -> SubspaceMinimum:
        """BFGS (Nocedal & Wright, Alg. 6.1) on ``φ(a) = f_B(θ + Vᵀa)`` from ``a = 0``, ``H₀ = Ĥ_floor⁻¹``."""
        c = self.config
        V = self.basis[: subspace.size]

        def objective(a: Tensor) -> tuple[float, Tensor]:
            torch.addmv(self.problem.theta, V.T, a.to(V), out=self.trial)
            loss, grad = self.objective_and_grad(batch, self.trial)
            values = torch.cat([loss.reshape(1), V.mv(grad)]).to("cpu", torch.float64)
            return values[0].item(), values[1:]

        inverse_hessian = self._initial_inverse_hessian(subspace.curvature)
        a = torch.zeros(subspace.size, dtype=torch.float64)
        loss, grad = objective(a)
        loss_before, iterations, evaluations = loss, 0, 1
        while iterations < c.bfgs_max_iterations:
            direction = -(inverse_hessian @ grad)
            if grad.dot(direction) >= 0:
                break
            search = strong_wolfe(
                lambda t, a=a, direction=direction: objective(a + t * direction),
                direction, loss, grad, 1.0, max_evaluations=c.line_search_evaluations,
            )
            evaluations += search.evaluations
            if not search.loss < loss:
                break
            s, y = search.step * direction, search.grad - grad
            a, grad, decrease, loss = a + s, search.grad, loss - search.loss, search.loss
            iterations += 1
            sy = s.dot(y)
            if sy > 1e-10 * s.norm() * y.norm():  # keeps H positive definite
                rho = 1 / sy
                correction = torch.eye(subspace.size, dtype=torch.float64) - rho * torch.outer(s, y)
                inverse_hessian = correction @ inverse_hessian @ correction.T + rho * torch.outer(s, s)
            if decrease <= c.bfgs_tolerance * max(abs(loss), 1.0):
                break
        return SubspaceMinimum(a, loss_before, loss, iterations, evaluations)

    def step(self) -> Stats:
        loss, grad = self.gradient()
        self.check_finite(f"loss or gradient at KSD iteration {self.state['iteration']}", loss, grad)
        curvature_batch, bfgs_batch = self.draw_subsets()
        subspace = self.build_basis(grad, curvature_batch)
        minimum = self.minimize_in_subspace(subspace, bfgs_batch)
        V = self.basis[: subspace.size]
        previous = self.state["previous_step"]
        if previous is None:
            previous = self.state["previous_step"] = torch.empty_like(self.problem.theta)
        torch.mv(V.T, minimum.coefficients.to(V), out=previous)
        if self.step_scale != 1.0:
            previous.mul_(self.step_scale)
        self.problem.theta.add_(previous)
        self.state["iteration"] += 1
        gram = inner_products(V, V)  # float64 accumulation: a float32 V Vᵀ is off by ~5e-6 on the CPU
        gram.diagonal().sub_(1)
        return {
            "loss": loss,
            "subspace_loss_before": minimum.loss_before,
            "subspace_loss_after": minimum.loss_after,
            "bfgs_iterations": minimum.iterations,
            "bfgs_evaluations": minimum.evaluations,
            "basis_size": subspace.size,
            "krylov_breakdown": int(subspace.krylov_size < self.config.krylov_dim),
            "orthogonality_error": gram.abs().max() if subspace.size else 0.0,
        }

    # ------------------------------------------------------------------ pieces
    def subset_sizes(self) -> tuple[int, int]:
        """Sizes of the curvature and BFGS subsets: the configured ones, each cut to half the training set.

        Computed at every step, because the library API may hand each step data of another size.
        """
        c, n = self.config, self.problem.n_train
        sizes = min(c.curvature_size, n // 2), min(c.bfgs_size, n // 2)
        require(min(sizes) >= 1, f"KSD needs at least 2 training examples, got {n}.")
        return sizes

    def draw_subsets(self) -> tuple[Batch, Batch]:
        """The curvature and BFGS subsets of one iteration, fresh: disjoint (one permutation cut in two) or,
        with ``subsets: independent``, each drawn on its own so that they may overlap (pbrakel/ksd-theano
        reshuffles its two ``Dataset`` objects independently)."""
        curvature_size, bfgs_size = self.subset_sizes()
        if self.config.subsets == "disjoint":
            curvature, bfgs = self.problem.random_batches(curvature_size, bfgs_size)
            return curvature, bfgs
        return self.problem.random_batches(curvature_size)[0], self.problem.random_batches(bfgs_size)[0]

    def _curvature(self, operator: Callable[[Tensor], Tensor], vectors: Tensor) -> Tensor:
        """``A v`` for each row of ``vectors``: the curvature ``operator`` plus weight decay."""
        products = operator(vectors)
        tau = self.config.weight_decay
        return products if tau == 0 else products.add_(vectors, alpha=tau)

    def _inverse_preconditioner(self, batch: Batch) -> Tensor:
        """``D⁻¹ = (max(F/|C| + τ, floor · max))^{−α}`` with ``F = Σ_{i∈C} (∇ℓ_i)²`` (Martens 2010, §4.7).

        ``D = I`` when the diagonal vanishes (τ = 0 and every example of ``C`` has a zero gradient): it
        then carries no scale, and ``0^{−α}`` would put infinities into the basis.
        """
        c = self.config
        diagonal = per_example_squared_gradients(self.problem, batch).div_(len(batch)).add_(c.weight_decay)
        diagonal.clamp_(min=diagonal.max() * c.preconditioner_floor)
        return diagonal.masked_fill_(diagonal == 0, 1.0).pow_(-c.preconditioner_exponent)

    def _orthonormalize(self, vector: Tensor, k: int) -> Tensor:
        """Orthogonalise row ``k`` of the basis against rows ``0 … k−1``; scale it to unit norm (no sync).

        Returns its norms before and after orthogonalisation (float64, shape (2,)) for :meth:`_kept`.
        """
        # float64 accumulation: torch's float32 norm of a few million entries is off by ~1e-4 (relative)
        before = torch.linalg.vector_norm(vector, dtype=torch.float64)
        after = torch.linalg.vector_norm(orthogonalize(vector, self.basis[:k]), dtype=torch.float64)
        vector.div_(after)
        return torch.stack([before, after])

    def _kept(self, norms: list[Tensor]) -> int:
        """How many rows precede the first one that vanished: whose norm after orthogonalisation is at most
        ``breakdown_tolerance`` times its norm before (one host synchronisation)."""
        for k, (before, after) in enumerate(torch.stack(norms).tolist()):
            if not math.isfinite(before):
                raise Diverged("non-finite basis vector (a curvature product or the previous step)")
            if not after > self.config.breakdown_tolerance * before:
                return k
        return len(norms)

    def _initial_inverse_hessian(self, curvature: Tensor) -> Tensor:
        """``Ĥ_floor⁻¹ = U diag(1 / max(|λ|, floor · max|λ|)) Uᵀ`` from ``Ĥ = U diag(λ) Uᵀ``; I when Ĥ = 0
        (or the basis is empty)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(curvature)
        magnitudes = eigenvalues.abs()
        largest = magnitudes.max() if len(magnitudes) else 0.0
        if not largest > 0:
            return torch.eye(curvature.shape[0], dtype=torch.float64)
        magnitudes.clamp_(min=largest * self.config.curvature_floor)
        return (eigenvectors / magnitudes) @ eigenvectors.T
