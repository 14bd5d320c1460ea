"""Linear algebra and line searches shared by the quasi-Newton and Newton-type optimizers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def two_loop_recursion(
    grad: Tensor, steps: Sequence[Tensor], grad_diffs: Sequence[Tensor], rhos: Sequence[float], gamma: float
) -> Tensor:
    """L-BFGS inverse-Hessian product ``H g`` by the two-loop recursion (Nocedal & Wright, Alg. 7.4).

    ``H`` is the BFGS update of ``H₀ = γ I`` with the pairs ``(s_i, y_i)``, oldest first,
    ``ρ_i = 1 / (y_iᵀ s_i)``. Returns a new vector; ``grad`` is not modified.
    """
    q = grad.clone()
    alphas = []
    for s, y, rho in zip(reversed(steps), reversed(grad_diffs), reversed(rhos)):
        alpha = rho * s.dot(q)
        q.addcmul_(y, alpha, value=-1)
        alphas.append(alpha)
    r = q.mul_(gamma)
    for s, y, rho, alpha in zip(steps, grad_diffs, rhos, reversed(alphas)):
        beta = rho * y.dot(r)
        r.addcmul_(s, alpha - beta)
    return r


def cubic_minimizer(
    x1: float,
    f1: float,
    g1: float,
    x2: float,
    f2: float,
    g2: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    """Minimiser of the cubic through ``(x1, f1, f1')`` and ``(x2, f2, f2')`` (Nocedal & Wright eq. 3.59),
    clipped to ``bounds`` (default: the interval between the points); the midpoint when the cubic has none
    or is not defined (an infinite ``f`` or a NaN slope: bisection)."""
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = d1 * d1 - g1 * g2
    if not disc >= 0:  # also NaN
        return (lo + hi) / 2
    d2 = disc**0.5
    if x1 <= x2:
        t = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        t = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(t, lo), hi) if math.isfinite(t) else (lo + hi) / 2


@dataclass
class LineSearchResult:
    step: float
    loss: float
    grad: Tensor
    evaluations: int


@dataclass
class _Point:
    t: float
    f: float
    g: Tensor
    slope: float


def strong_wolfe(
    evaluate: Callable[[float], tuple[float, Tensor]],
    direction: Tensor,
    loss: float,
    grad: Tensor,
    step: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance: float = 1e-9,
    max_evaluations: int = 25,  # trial points after the first, as torch's max_ls
    slope: float | None = None,  # f'(0) = gradᵀ direction when the caller has it already
) -> LineSearchResult:
    """Step length satisfying the strong Wolfe conditions along ``direction`` (Nocedal & Wright, Alg. 3.5-6).

    ``evaluate(t)`` returns the loss and gradient at ``θ + t d``. Sufficient decrease
    ``f(t) ≤ f(0) + c1 t f'(0)`` and curvature ``|f'(t)| ≤ c2 |f'(0)|``. The bracketing phase
    extrapolates by cubic interpolation within ``[t + 0.01 (t − t_prev), 10 t]``; the zoom phase
    interpolates cubically inside the bracket and falls back towards its middle when progress stalls
    (safeguards of Moré–Thuente / minFunc, the same choices as ``torch.optim.LBFGS``, which this
    reproduces step for step). Returns the best point found if the budget runs out — ``t = 0`` when no
    trial decreased ``f``, which callers treat as a rejected step. A non-finite ``f(t)`` (the model
    overflowed) counts as ``+∞``: such a point ends the bracketing phase and is never the best.
    """
    slope0 = grad.dot(direction).item() if slope is None else slope
    scale = direction.abs().max().item()
    start = _Point(0.0, loss, grad, slope0)

    def probe(t: float) -> _Point:
        f, g = evaluate(t)
        return _Point(t, f if math.isfinite(f) else math.inf, g, g.dot(direction).item())

    prev, new = start, probe(step)
    evaluations = 1
    bracket: list[_Point] | None = None
    while evaluations <= max_evaluations:
        if new.f > loss + c1 * new.t * slope0 or (evaluations > 2 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if abs(new.slope) <= -c2 * slope0:
            return LineSearchResult(new.t, new.f, new.g, evaluations)
        if new.slope >= 0:
            bracket = [prev, new]
            break
        t = cubic_minimizer(
            prev.t,
            prev.f,
            prev.slope,
            new.t,
            new.f,
            new.slope,
            bounds=(new.t + 0.01 * (new.t - prev.t), 10 * new.t),
        )
        prev, new = new, probe(t)
        evaluations += 1
    if bracket is None:
        bracket = [start, new]

    stalled = False
    while evaluations <= max_evaluations:
        low, high = (0, 1) if bracket[0].f <= bracket[1].f else (1, 0)
        a, b = bracket
        if abs(b.t - a.t) * scale < tolerance:
            break
        t = cubic_minimizer(a.t, a.f, a.slope, b.t, b.f, b.slope)
        lo_t, hi_t = min(a.t, b.t), max(a.t, b.t)
        margin = 0.1 * (hi_t - lo_t)
        if min(hi_t - t, t - lo_t) < margin:
            if stalled or t >= hi_t or t <= lo_t:
                t = hi_t - margin if abs(t - hi_t) < abs(t - lo_t) else lo_t + margin
                stalled = False
            else:
                stalled = True
        else:
            stalled = False
        new = probe(t)
        evaluations += 1
        if new.f > loss + c1 * t * slope0 or new.f >= bracket[low].f:
            bracket[high] = new
        else:
            if abs(new.slope) <= -c2 * slope0:
                return LineSearchResult(new.t, new.f, new.g, evaluations)
            if new.slope * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new
    best = bracket[0] if bracket[0].f <= bracket[1].f else bracket[1]
    return LineSearchResult(best.t, best.f, best.g, evaluations)


@dataclass
class ConjugateGradientResult:
    """What :func:`conjugate_gradient` returns: saved iterates and the quadratic model along the way."""

    iterates: list[Tensor]  # x_i at the iterations in ``iterations`` (oldest first; the last is the final x)
    iterations: list[int]  # their indices i (0 is the starting point)
    values: list[float]  # q(x_i) for every i = 0, 1, …, iterations[-1]
    stop: str  # "progress" | "max_iterations" | "non_positive_curvature"


#: Martens' relative-progress test compares q_i with q_{i−k}, k = max(MIN_GAP, ceil(GAP_RATIO · i)).
CG_MIN_GAP, CG_GAP_RATIO = 10, 0.1
#: Iterates are saved at i = ceil(SAVE_FIRST · SAVE_RATIO^j), j = 0, 1, … (5, 7, 9, 11, 15, 19, 25, …).
CG_SAVE_FIRST, CG_SAVE_RATIO = 5, 1.3


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    *,
    preconditioner: Tensor | None = None,
    max_iterations: int = 250,
    min_iterations: int = 1,
    tolerance: float = 5e-4,
    stop_sign: str = "current",
) -> ConjugateGradientResult:
    """Preconditioned conjugate gradient on ``q(x) = ½ xᵀAx − bᵀx`` (solves ``Ax = b``), as in HF.

    Martens (2010), §4.4–4.7 and the demo code's ``conjgrad_1.m``: ``A = matvec`` should be symmetric
    positive definite; ``preconditioner`` is the diagonal ``M`` (elementwise, ``M⁻¹r`` by division;
    None = identity); ``x0`` is the (warm) start, zero when None.

    * Stops when ``i ≥ max_iterations``; or when ``pᵀAp ≤ 0`` (or NaN) — the iteration is abandoned and
      ``x_{i−1}`` is the result; or, once ``i ≥ min_iterations``, by the relative-progress rule
      ``i > k``, ``q_i < 0`` and ``(q_i − q_{i−k}) / q_i < k·tolerance`` with ``k = max(10, ⌈0.1 i⌉)``
      (Martens' eq. in §4.4, ε = 5·10⁻⁴). The residual norm is no use here: the quadratic model, not
      the linear system, is what HF cares about, and float32 residuals stall. ``stop_sign="earlier"``
      requires ``q_{i−k} < 0`` instead of ``q_i < 0``, as ``conjgrad_1.m`` does; the two stop at the
      same iteration whenever ``k·tolerance ≤ 1`` (opposite signs make the ratio ≥ 1).
    * Saves copies of ``x_i`` at ``i = ⌈5·1.3^j⌉`` and the final iterate, for HF's CG backtracking.
    * ``q_i = ½ (r_i − b)ᵀ x_i`` with ``r_i = A x_i − b`` needs no extra product. One host
      synchronisation per iteration for ``pᵀAp`` and one for ``q_i``: the algorithm needs both as scalars.

    The matrix-vector product count is the number of iterations, plus one when ``x0`` is given.
    """
    if x0 is None:
        x, r = torch.zeros_like(b), b.neg()
    else:
        x = x0.clone()
        r = matvec(x) - b
    y = r if preconditioner is None else r / preconditioner
    p = y.neg()
    r_dot_y = r.dot(y)
    residual_minus_b = torch.sub(r, b)  # workspace for q_i = ½ (r_i − b)ᵀ x_i
    values = [0.5 * residual_minus_b.dot(x).item()]
    iterates: list[Tensor] = []
    iterations: list[int] = []
    saves = 0
    stop = "max_iterations"
    i = 0
    while i < max_iterations:
        product = matvec(p)
        curvature = p.dot(product)
        if not curvature.item() > 0:
            stop = "non_positive_curvature"
            break
        alpha = r_dot_y / curvature
        x.addcmul_(p, alpha)
        r.addcmul_(product, alpha)
        y = r if preconditioner is None else r / preconditioner
        r_dot_y, previous = r.dot(y), r_dot_y
        p.mul_(r_dot_y / previous).sub_(y)
        i += 1
        values.append(0.5 * torch.sub(r, b, out=residual_minus_b).dot(x).item())
        if i == math.ceil(CG_SAVE_FIRST * CG_SAVE_RATIO**saves):
            iterates.append(x.clone())
            iterations.append(i)
            saves += 1
        gap = max(CG_MIN_GAP, math.ceil(CG_GAP_RATIO * i))
        sign_test = i > gap and (values[i - gap] if stop_sign == "earlier" else values[i]) < 0
        progress = (
            sign_test and values[i] != 0 and (values[i] - values[i - gap]) / values[i] < gap * tolerance
        )
        if progress and i >= min_iterations:
            stop = "progress"
            break
    if not iterations or iterations[-1] != i:
        iterates.append(x)
        iterations.append(i)
    return ConjugateGradientResult(iterates, iterations, values, stop)


#: Entries per chunk of :func:`inner_products`: short enough that the float32 partial sums are accurate.
INNER_PRODUCT_CHUNK = 4096


def inner_products(rows: Tensor, columns: Tensor) -> Tensor:
    """``rows @ columns.T`` for ``(a, n)`` and ``(b, n)`` matrices, accumulated in float64: shape ``(a, b)``.

    The float32 products are summed over chunks of :data:`INNER_PRODUCT_CHUNK` entries by one batched
    matrix product, and the chunks' partial sums are added in float64. Plain float32 products over a
    few million entries are not accurate enough for orthogonality checks and Gram-Schmidt: MKL's
    ``sgemv``/``sgemm`` on the CPU were measured off by 5e-6 (Gram matrix of 21 orthonormal vectors of
    2.8 M) to 5e-4 (coefficients of a vector dominated by one row), relative; this is off by ~1e-7, for
    about the cost of one float32 Gram matrix. No copies of the inputs. Chunks of 4,096 entries keep the
    batched product at memory bandwidth on the CPU (1,024 took 1.5 times as long for a 20-row basis).
    """
    n = rows.shape[1]
    count = n // INNER_PRODUCT_CHUNK
    split = count * INNER_PRODUCT_CHUNK
    chunks = torch.bmm(
        rows[:, :split].view(len(rows), count, INNER_PRODUCT_CHUNK).transpose(0, 1),
        columns[:, :split].view(len(columns), count, INNER_PRODUCT_CHUNK).permute(1, 2, 0),
    )
    return chunks.sum(0, dtype=torch.float64) + rows[:, split:].double() @ columns[:, split:].double().T


@dataclass
class SteihaugResult:
    """What :func:`steihaug_cg` returns."""

    step: Tensor  # p, with ‖p‖_M ≤ Δ
    residual: Tensor  # r = B p + g (the model's gradient at p)
    model_change: float  # q(p) = gᵀp + ½ pᵀBp = ½ (gᵀp + rᵀp), no extra product
    iterations: int  # products with B
    stop: str  # "residual" | "boundary" | "negative_curvature" | "max_iterations" | "non_finite"

    @property
    def hits_boundary(self) -> bool:
        return self.stop in ("boundary", "negative_curvature")


def boundary_roots(p: Tensor, d: Tensor, radius: float, metric: Tensor | None = None) -> tuple[float, float]:
    """Both roots ``τ₋ ≤ 0 ≤ τ₊`` of ``‖p + τd‖_M = Δ`` for ``‖p‖_M ≤ Δ`` (``M = diag(metric)``, I if None).

    With ``a = dᵀMd``, ``b = pᵀMd``, ``c = pᵀMp − Δ²`` (≤ 0) and ``ρ = √(b² − ac)`` the roots are
    ``(−b ± ρ)/a``; each is computed in the form that avoids cancellation (Golub & Van Loan, §3.5's
    quadratic; the same forms as LIBLINEAR's ``trcg`` and SciPy's ``get_boundaries_intersections``):
    ``τ₊ = −c/(b + ρ)`` for ``b ≥ 0`` and ``(ρ − b)/a`` otherwise; ``τ₋ = c/τ₊ / a`` (product of the roots
    ``c/a``) unless ``τ₊ = 0``, where ``τ₋ = −2b/a``.
    """
    md = d if metric is None else metric * d
    a, b = d.dot(md).item(), p.dot(md).item()
    c = p.dot(p if metric is None else metric * p).item() - radius * radius
    root = math.sqrt(max(b * b - a * c, 0.0))
    plus = -c / (b + root) if b >= 0 else (root - b) / a
    minus = c / (a * plus) if plus != 0 else -2 * b / a
    return minus, plus


def steihaug_cg(
    matvec: Callable[[Tensor], Tensor],
    grad: Tensor,
    radius: float,
    *,
    tolerance: float = 0.1,
    preconditioner: Tensor | None = None,
    max_iterations: int = 250,
) -> SteihaugResult:
    """Steihaug–Toint truncated CG for ``min q(p) = gᵀp + ½ pᵀBp`` subject to ``‖p‖_M ≤ Δ``.

    Nocedal & Wright (2006), Algorithm 7.2 (Steihaug 1983; Toint 1981), with the diagonal preconditioner
    ``M = diag(preconditioner)`` (N&W §7.2, "preconditioning"; Lin & Moré 1999; LIBLINEAR's ``trpcg``):
    the region is measured in the M-norm ``‖p‖_M = √(pᵀMp)`` and ``z = M⁻¹r``. From ``p₀ = 0``,
    ``r₀ = g``, ``d₀ = −z₀``, for ``j = 0, 1, …``:

    1. ``dⱼᵀBdⱼ ≤ 0`` (or NaN): negative curvature — return ``pⱼ + τdⱼ`` on the boundary, the root of
       ``‖pⱼ + τdⱼ‖_M = Δ`` (:func:`boundary_roots`) with the lower model value
       ``q(pⱼ) + τ rⱼᵀdⱼ + ½τ² dⱼᵀBdⱼ`` (N&W Alg. 7.2, first test; as SciPy's ``trust-ncg``);
    2. ``αⱼ = rⱼᵀzⱼ / dⱼᵀBdⱼ``; if ``‖pⱼ + αⱼdⱼ‖_M ≥ Δ``: return ``pⱼ + τ₊dⱼ``, ``τ₊ ≥ 0`` (second test);
    3. ``pⱼ₊₁ = pⱼ + αⱼdⱼ``, ``rⱼ₊₁ = rⱼ + αⱼBdⱼ``; stop when ``‖rⱼ₊₁‖_{M⁻¹} ≤ ξ ‖g‖_{M⁻¹}``
       (``ξ = tolerance``; N&W eq. 7.3's residual test ``‖r‖ ≤ ε_k``; LIBLINEAR's
       ``√(zᵀr) ≤ eps_cg √(z₀ᵀr₀)``), the Euclidean ``‖r‖ ≤ ξ‖g‖`` without a preconditioner;
    4. ``βⱼ = rⱼ₊₁ᵀzⱼ₊₁ / rⱼᵀzⱼ``, ``dⱼ₊₁ = −zⱼ₊₁ + βⱼdⱼ``.

    A non-finite ``dⱼᵀBdⱼ`` stops with ``pⱼ`` (``stop = "non_finite"``); ``g = 0`` returns ``p = 0`` without a
    product. ``max_iterations`` products at most (LIBLINEAR: ``max(n, 5)``; SciPy: none). The residual is kept
    exact at the boundary points (``r += τ Bd``), so the model change ``q(p) = ½(gᵀp + rᵀp)`` needs no
    further product. ``‖p_j‖_M`` grows monotonically (N&W Theorem 7.3), so the first boundary crossing is
    the one to stop at. Three host synchronisations per iteration.
    """
    p = torch.zeros_like(grad)
    r = grad.clone()
    z = r if preconditioner is None else r / preconditioner
    d = z.neg()
    r_dot_z = r.dot(z).item()
    stop_at = tolerance * math.sqrt(max(r_dot_z, 0.0))
    metric = preconditioner
    iterations, stop = 0, "max_iterations"
    if not math.sqrt(max(r_dot_z, 0.0)) > stop_at:  # g = 0 (or ξ ≥ 1): p = 0, as LIBLINEAR's first test
        return SteihaugResult(p, r, 0.0, 0, "residual")
    while iterations < max_iterations:
        product = matvec(d)
        iterations += 1
        curvature = d.dot(product).item()
        if not math.isfinite(curvature):  # a NaN/inf product: keep p_j; the caller's ρ decides
            stop = "non_finite"
            break
        if curvature <= 0:
            minus, plus = boundary_roots(p, d, radius, metric)
            slope = r.dot(d).item()
            change_minus = minus * slope + 0.5 * minus * minus * curvature  # q(p + τd) − q(p)
            change_plus = plus * slope + 0.5 * plus * plus * curvature
            tau = minus if change_minus < change_plus else plus  # ties: τ₊, as SciPy
            p.add_(d, alpha=tau)
            r.add_(product, alpha=tau)
            stop = "negative_curvature"
            break
        alpha = r_dot_z / curvature
        trial = p + alpha * d
        norm = math.sqrt(trial.dot(trial if metric is None else metric * trial).item())
        if norm >= radius:
            _, tau = boundary_roots(p, d, radius, metric)
            p.add_(d, alpha=tau)
            r.add_(product, alpha=tau)
            stop = "boundary"
            break
        p = trial
        r.add_(product, alpha=alpha)
        z = r if preconditioner is None else r / preconditioner
        r_dot_z, previous = r.dot(z).item(), r_dot_z
        if math.sqrt(max(r_dot_z, 0.0)) <= stop_at:
            stop = "residual"
            break
        d.mul_(r_dot_z / previous).sub_(z)
    model = 0.5 * (grad.dot(p).item() + r.dot(p).item())
    return SteihaugResult(p, r, model, iterations, stop)
