"""TRON: trust-region Newton-CG (Lin & Moré 1999; Steihaug 1983; the solver of LIBLINEAR, Lin, Weng & Keerthi
2008), on the Gauss-Newton or Hessian products of :mod:`ksd.curvature`.

One :meth:`TRON.step` is one outer iteration ``k``:

1. objective ``f(θ) = f_D(θ) + τ/2 ‖θ‖²`` and gradient ``g = ∇f(θ)`` on the gradient batch ``D`` (the whole
   training set by default, ``batch_size`` otherwise); with ``preconditioner: true`` also the mean squared
   per-example gradient ``F_diag`` from the same pass, as HF;
2. curvature batch ``C``: chunk ``k mod num_chunks`` of the training set, cut and cycled exactly as HF's
   (``chunk_order: contiguous | shuffled``, the same fixed permutation); ``B = G_C + τI`` (``curvature:
   ggn``, :func:`~ksd.curvature.ggn_operator`) or ``B = H_C + τI`` (``hessian``,
   :func:`~ksd.curvature.hessian_operator``), one stored operator per step;
3. the trust-region subproblem ``min q(p) = gᵀp + ½ pᵀBp`` s.t. ``‖p‖_M ≤ Δ_k`` by Steihaug–Toint CG
   (:func:`ksd.optim.linalg.steihaug_cg`; Nocedal & Wright 2006, Alg. 7.2), stopped at the boundary, on
   negative curvature (on the boundary, along that direction) or when ``‖r‖_{M⁻¹} ≤ ξ_k ‖g‖_{M⁻¹}`` (N&W
   eq. 7.3); ``ξ_k = ξ`` (``cg_forcing: constant``, LIBLINEAR's ``eps_cg``) or ``min(ξ, √‖g‖)``
   (``cg_forcing: sqrt``, N&W eq. 7.3 / SciPy, superlinear); ``M = (F_diag + τ + μ)^α`` with
   ``preconditioner: true`` (HF's §4.7 diagonal with the fixed shift μ = ``preconditioner_shift`` in place
   of HF's λ), else ``M = I`` (the Euclidean ball of Lin & Moré and SciPy);
4. ρ on the gradient batch: ``ρ = [f(θ) − f(θ+p)] / [−q(p)]`` (N&W eq. 4.4; LIBLINEAR's
   ``actred / prered``), ``−q(p) = −½(gᵀp + rᵀp)`` from CG's residual ``r = Bp + g``, no extra product;
5. accept ``θ ← θ + p`` iff ``ρ > η₀`` (LIBLINEAR: ``actred > eta0·prered``; N&W Alg. 4.1: ``ρ > η``);
6. the new radius by ``radius_rule``, below. Then ``Δ_{k+1}`` is stored divided by ``step_scale`` (the
   engine's rewind scale multiplies the radius a step uses), so a halved scale halves every radius.

Radius rules
------------
``liblinear`` — ``tron.cpp`` of LIBLINEAR 2.30 (the last release with the trust-region solver; 2.40 replaced
it by a line search; read in a public copy of github.com/cjlin1/liblinear, commit before ``ec50a26``), with
``s = p``, ``‖s‖`` its M-norm, ``actred = f(θ) − f(θ+s)``, ``prered = −q(s)``:

* ``Δ₀ = ‖g₀‖_M`` (``delta = sqrt(uTMv(g, M, g))``, ``‖g₀‖`` before the 2017 preconditioner; option
  ``initial_radius`` replaces it), and on the first iteration ``Δ₀ ← min(Δ₀, ‖s₀‖)`` once after the first
  CG solve (``if (iter == 1 && !delta_adjusted) delta = min(delta, sMnorm)``);
* the interpolated step ``α``: the minimiser, relative to ``s``, of the parabola through ``f(θ)``,
  ``gᵀs`` and ``f(θ+s)``: ``α = σ₃`` if ``f(θ+s) − f(θ) − gᵀs ≤ 0``, else ``α = max(σ₁, −½ gᵀs / (f(θ+s) −
  f(θ) − gᵀs))`` (Lin & Moré 1999, §2; Moré & Sorensen's rule);
* ``actred < η₀ prered``: ``Δ = min(α‖s‖, σ₂Δ)``; ``< η₁ prered``: ``Δ = max(σ₁Δ, min(α‖s‖, σ₂Δ))``;
  ``< η₂ prered``: ``Δ = max(σ₁Δ, min(α‖s‖, σ₃Δ))``; otherwise ``Δ = σ₃Δ`` if CG reached the boundary
  (the 2017 rule, ``reach_boundary``), else ``Δ = max(Δ, min(α‖s‖, σ₃Δ))``;
* constants ``η₀, η₁, η₂ = 10⁻⁴, 0.25, 0.75`` and ``σ₁, σ₂, σ₃ = 0.25, 0.5, 4`` (``tron.cpp``'s
  "Parameters for updating the iterates / the trust region size delta"; Lin, Weng & Keerthi 2008, §2.1,
  Algorithm 2 give the same values); ``eps_cg = 0.1`` (``linear.cpp``'s ``train_one``; 0.5 when warm
  started), our ``cg_tolerance``.

``nocedal_wright`` — Nocedal & Wright (2006), Algorithm 4.1, as SciPy's ``minimize(method="trust-ncg")``
implements it (``scipy/optimize/_trustregion.py``): ``ρ < ¼``: ``Δ ← ¼Δ``; ``ρ > ¾`` and ‖p‖ = Δ (CG stopped
on the boundary or on negative curvature): ``Δ ← min(2Δ, Δ̂)``, ``Δ̂ = max_radius``; otherwise unchanged;
accept iff ``ρ > η`` (``eta0``; SciPy's ``eta = 0.15``, ``initial_trust_radius = 1``, ``max_trust_radius =
1000``; the CG tolerance ``min(0.5, √‖g‖)‖g‖`` is ``cg_forcing: sqrt`` with ``cg_tolerance: 0.5``). With
these settings, the exact Hessian and no preconditioner, the iterates and radii equal SciPy's
(``tests/test_tron.py``).

Choices where the sources are silent (ours): ``max_radius`` (none by default, as LIBLINEAR; SciPy's 1000 when
set) caps both rules; a predicted reduction that is not positive (or not finite: a NaN product) rejects the
step and shrinks the radius by σ₁ (LIBLINEAR stops the solver there, SciPy too; a step-based run goes on);
a zero step (``g = 0``) leaves the radius as it is; the weight decay τ = 2·10⁻⁵ and ``num_chunks = 4`` are
HF's (Martens' CURVES settings), so TRON and HF minimise the same objective on the same curvature chunks;
``max_cg_iterations = 250`` is HF's (LIBLINEAR: ``max(n, 5)``); μ = 10⁻⁴ and α = ¾ of the optional
preconditioner; the M-norm region with a preconditioner (N&W §7.2; LIBLINEAR 2.20+).

Faults (docs/faults.md): a non-finite objective or gradient at θ raises :class:`~ksd.optim.base.Diverged`;
a non-finite ``f(θ+p)`` counts as +∞, so ``actred = −∞``: the step is rejected and the radius shrinks
(LIBLINEAR: ``α = σ₁``, ``Δ = min(σ₁‖s‖, σ₂Δ)``; N&W: ``Δ/4``); a non-finite curvature product stops CG with
the iterate before it (a zero step if it is the first, then the radius shrinks by σ₁).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ksd.curvature import ggn_operator, hessian_operator, loss_gradient_and_squared_gradients
from ksd.errors import require
from ksd.optim.base import Optimizer, OptimizerConfig, Stats
from ksd.optim.chunks import CHUNK_ORDERS, CurvatureChunks
from ksd.optim.linalg import steihaug_cg
from ksd.problem import Problem

RADIUS_RULES = ("liblinear", "nocedal_wright")
CURVATURES = ("ggn", "hessian")
CG_FORCINGS = ("constant", "sqrt")
#: Nocedal & Wright (2006), Algorithm 4.1: shrink below ρ = ¼ by ¼, grow above ρ = ¾ (on the boundary) by 2.
NW_LOW, NW_HIGH, NW_SHRINK, NW_GROW = 0.25, 0.75, 0.25, 2.0


class TRON(CurvatureChunks, Optimizer):
    step_scale_applies_to = "Δ (the trust radius a step uses is multiplied by it)"

    @dataclass
    class Config(OptimizerConfig):
        name: str = "tron"
        batch_size: int | None = None  # gradient and ρ batch; None: all data
        weight_decay: float = 2e-5  # τ (HF's)
        curvature: str = "ggn"  # B = Gauss-Newton ("ggn") or Hessian ("hessian") of the chunk, + τI
        num_chunks: int = 4  # curvature batch = one of this many fixed chunks of the training set, cycled
        chunk_order: str = "contiguous"  # as HF: "contiguous" slices or "shuffled" (one fixed permutation)
        radius_rule: str = "liblinear"  # "liblinear" (tron.cpp) or "nocedal_wright" (N&W Alg. 4.1, SciPy)
        initial_radius: float | None = None  # Δ₀; None: ‖g₀‖_M (LIBLINEAR)
        max_radius: float | None = None  # Δ̂ cap of the radius; None: no cap (LIBLINEAR)
        eta0: float = 1e-4  # accept iff ρ > η₀ (LIBLINEAR 1e-4; SciPy's eta 0.15)
        eta1: float = 0.25  # liblinear rule: ρ thresholds η₁, η₂
        eta2: float = 0.75
        sigma1: float = 0.25  # liblinear rule: radius factors σ₁ < σ₂ < 1 < σ₃
        sigma2: float = 0.5
        sigma3: float = 4.0
        cg_tolerance: float = 0.1  # ξ: CG stops when ‖r‖ ≤ ξ_k ‖g‖ (LIBLINEAR eps_cg)
        cg_forcing: str = "constant"  # ξ_k = ξ ("constant") or min(ξ, √‖g‖) ("sqrt": N&W eq. 7.3, SciPy)
        max_cg_iterations: int = 250
        preconditioner: bool = False  # M = (F_diag + τ + μ)^exponent and the M-norm region, else M = I
        preconditioner_exponent: float = 0.75
        preconditioner_shift: float = 1e-4  # μ

        def __post_init__(self) -> None:
            super().__post_init__()
            self.positive("num_chunks", "max_cg_iterations", "cg_tolerance", "preconditioner_shift")
            for key in ("initial_radius", "max_radius"):
                value = getattr(self, key)
                require(value is None or value > 0, f"optimizer.{key} must be > 0 or null, got {value}.")
            if self.initial_radius is not None and self.max_radius is not None:
                require(
                    self.initial_radius <= self.max_radius,
                    "optimizer.initial_radius must not exceed optimizer.max_radius.",
                )
            require(
                0 <= self.eta0 < self.eta1 <= self.eta2 < 1,
                f"optimizer.eta0, eta1, eta2 must satisfy 0 <= eta0 < eta1 <= eta2 < 1, got "
                f"{self.eta0}, {self.eta1}, {self.eta2}.",
            )
            require(
                0 < self.sigma1 < self.sigma2 < 1 < self.sigma3,
                f"optimizer.sigma1, sigma2, sigma3 must satisfy 0 < sigma1 < sigma2 < 1 < sigma3, got "
                f"{self.sigma1}, {self.sigma2}, {self.sigma3}.",
            )
            require(
                self.preconditioner_exponent >= 0,
                f"optimizer.preconditioner_exponent must be >= 0, got {self.preconditioner_exponent}.",
            )
            for key, allowed in (
                ("curvature", CURVATURES), ("chunk_order", CHUNK_ORDERS), ("radius_rule", RADIUS_RULES),
                ("cg_forcing", CG_FORCINGS),
            ):
                value = getattr(self, key)
                require(
                    value in allowed, f"optimizer.{key} must be one of {', '.join(allowed)}, got {value!r}."
                )

    def __init__(self, problem: Problem, config: Config | None = None) -> None:
        super().__init__(problem, config)
        if problem.n_train:  # refuse a too small training set before training (the library API: each step)
            self.check_chunks()
        self.state.update(radius=None, iteration=0)

    def step(self) -> Stats:
        c, st, problem = self.config, self.state, self.problem
        theta = problem.theta
        self.check_chunks()
        batch = self.next_batch()
        if c.preconditioner:
            loss, grad, squares = loss_gradient_and_squared_gradients(problem, batch)
        else:
            loss, grad = problem.loss_and_grad(batch)
        loss, grad = self.regularized(loss, grad, theta=theta)
        self.check_finite(f"loss or gradient at TRON iteration {st['iteration']}", loss, grad)
        f0 = loss.item()
        metric = None
        if c.preconditioner:
            shift = c.weight_decay + c.preconditioner_shift
            metric = squares.div_(len(batch)).add_(shift).pow_(c.preconditioner_exponent)
        grad_norm = grad.norm().item()
        first = st["radius"] is None
        if first:
            m_norm = grad_norm if metric is None else math.sqrt(grad.dot(metric * grad).item())
            st["radius"] = m_norm if c.initial_radius is None else c.initial_radius
        radius = st["radius"] * self.step_scale

        chunk = self.curvature_chunk(st["iteration"])
        build = ggn_operator if c.curvature == "ggn" else hessian_operator
        operator = build(problem, chunk)  # one stored forward (or gradient graph) for all products

        def curvature(v: Tensor) -> Tensor:
            return operator(v).add_(v, alpha=c.weight_decay)

        forcing = c.cg_tolerance if c.cg_forcing == "constant" else min(c.cg_tolerance, math.sqrt(grad_norm))
        cg = steihaug_cg(
            curvature, grad, radius, tolerance=forcing, preconditioner=metric,
            max_iterations=c.max_cg_iterations,
        )
        step = cg.step
        predicted = -cg.model_change
        f_new = self._objective(batch, theta + step)
        actual = f0 - f_new
        valid = math.isfinite(predicted) and predicted > 0
        rho = actual / predicted if valid else math.nan
        accepted = valid and rho > c.eta0
        step_norm = math.sqrt(step.dot(step if metric is None else metric * step).item())
        judged = radius
        if first and c.radius_rule == "liblinear":  # tron.cpp: delta = min(delta, sMnorm), once
            judged = min(radius, step_norm)
        slope = grad.dot(step).item()
        new_radius = self._new_radius(judged, step_norm, f0, f_new, slope, actual, predicted, valid, cg)
        if c.max_radius is not None:
            new_radius = min(new_radius, c.max_radius)
        st["radius"] = new_radius / self.step_scale
        if accepted:
            theta.add_(step)
        st["iteration"] += 1
        return {
            "loss": loss,
            "radius": radius,
            "rho": rho,
            "accepted": int(accepted),
            "step_norm": step_norm,
            "predicted_reduction": predicted,
            "cg_iterations": cg.iterations,
            "cg_boundary": int(cg.hits_boundary),
        }

    def _new_radius(
        self, radius: float, step_norm: float, f0: float, f_new: float, slope: float, actual: float,
        predicted: float, valid: bool, cg,
    ) -> float:
        """``Δ_{k+1}`` from the radius the step used, by ``radius_rule`` (module docstring)."""
        c = self.config
        if step_norm == 0:  # g = 0 (or CG failed at once on a finite model): nothing to judge the radius by
            return radius if valid or cg.stop != "non_finite" else c.sigma1 * radius
        if not valid:
            return c.sigma1 * radius
        if c.radius_rule == "nocedal_wright":
            rho = actual / predicted
            if not rho >= NW_LOW:
                return NW_SHRINK * radius
            if rho > NW_HIGH and cg.hits_boundary:
                return NW_GROW * radius
            return radius
        curvature_gap = f_new - f0 - slope
        alpha = c.sigma3 if curvature_gap <= 0 else max(c.sigma1, -0.5 * (slope / curvature_gap))
        if actual < c.eta0 * predicted:
            return min(alpha * step_norm, c.sigma2 * radius)
        if actual < c.eta1 * predicted:
            return max(c.sigma1 * radius, min(alpha * step_norm, c.sigma2 * radius))
        if actual < c.eta2 * predicted:
            return max(c.sigma1 * radius, min(alpha * step_norm, c.sigma3 * radius))
        if cg.hits_boundary:
            return c.sigma3 * radius
        return max(radius, min(alpha * step_norm, c.sigma3 * radius))
