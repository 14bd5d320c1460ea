"""Limited-memory SR1 matrices in compact form, and their partial eigendecomposition.

The SR1 recursion ``B_{i+1} = B_i + r_i r_iᵀ / (r_iᵀ s_i)``, ``r_i = y_i − B_i s_i``, started from
``B_0 = γ I`` and applied to the pairs ``(s_i, y_i)`` oldest first, has the compact form
(Byrd, Nocedal & Schnabel 1994, §5; Nocedal & Wright 2006, §7.2)::

    B = γ I + Ψ M Ψᵀ,    Ψ = Y − γ S,    M = (D + L + Lᵀ − γ SᵀS)⁻¹,

where ``S = [s_1 … s_m]``, ``Y = [y_1 … y_m]`` (n × m) and ``SᵀY = L + D + U`` splits into its strictly
lower triangle, diagonal and strictly upper triangle. ``M⁻¹`` is the *middle matrix* here.

Its eigenvalues follow without an n × n matrix (Brust, Burdakov, Erway & Marcia 2019, the SC-SR1
paper; the same steps in the ARCs-LSR1 authors' code): with a thin factorisation ``Ψ = Q R``
(``Q`` n × k with orthonormal columns) and the k × k eigenproblem ``R M Rᵀ = U Λ̂ Uᵀ``,

    B = γ I + P_∥ Λ̂ P_∥ᵀ,    P_∥ = Q U,

so B has the eigenvalues ``γ + λ̂_i`` on the columns of ``P_∥`` and ``γ`` on their orthogonal
complement. ``Q`` is never formed: ``P_∥ = Ψ A`` for an m × k matrix ``A``, so every product with
``P_∥`` is a product with the stored pairs.

Our factorisation of Ψ comes from the m × m Gram matrix ``ΨᵀΨ = RᵀR`` (Cholesky-QR, the authors'
route, O(m³) on top of Gram entries that are updated incrementally at O(nm) per new pair), made
rank-revealing: we factor ``ΨᵀΨ = V W Vᵀ`` (eigenvalues W) and take ``R = W^½ Vᵀ`` on the
eigenvalues above ``rank_tolerance · max W``, so nearly dependent columns of Ψ are dropped instead of
breaking a Cholesky factorisation. All m × m work is float64 on the host; the n-vectors stay on the
device in the parameters' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def middle_inverse(ss: np.ndarray, sy: np.ndarray, gamma: float) -> np.ndarray:
    """``M⁻¹ = D + L + Lᵀ − γ SᵀS`` from ``SᵀS`` and ``SᵀY`` (pairs oldest first)."""
    lower = np.tril(sy, -1)
    return np.diag(np.diag(sy)) + lower + lower.T - gamma * ss


def smallest_generalized_eigenvalue(ss: np.ndarray, sy: np.ndarray) -> float | None:
    """``λ_min`` of the pencil ``(D + L + Lᵀ) u = λ SᵀS u``; None when ``SᵀS`` is not positive definite.

    Any ``γ < λ_min`` makes the middle matrix ``D + L + Lᵀ − γ SᵀS`` positive definite.
    """
    try:
        chol = np.linalg.cholesky(ss)
    except np.linalg.LinAlgError:
        return None
    whitened = np.linalg.solve(chol, np.linalg.solve(chol, middle_inverse(ss, sy, 0.0)).T)
    return float(np.linalg.eigvalsh(0.5 * (whitened + whitened.T))[0])


def eigen_scaling(lambda_min: float, floor: float = 1e-6) -> float:
    """The authors' choice of ``γ`` from ``λ_min`` of :func:`smallest_generalized_eigenvalue`.

    ``max(λ_min / 2, floor)`` when ``λ_min > 0``, else ``min(3 λ_min / 2, −floor)``: strictly below
    ``λ_min``, so the middle matrix is positive definite and ``B ⪰ γ I`` (rule of the authors'
    ``ARCLSR1.LSR1`` in github.com/aranganath/Adam-boosting and ``RL_ARCLSR1.py`` in
    github.com/aranganath/pytorch-trpo; it comes from the L-SR1 trust-region work of Erway, Griffin,
    Marcia & Omheni 2020 [recalled, not re-checked]).
    """
    return max(0.5 * lambda_min, floor) if lambda_min > 0 else min(1.5 * lambda_min, -floor)


@dataclass
class CompactEigen:
    """``B = γ I + P_∥ diag(λ − γ) P_∥ᵀ`` with ``P_∥ = Ψ A`` (orthonormal columns)."""

    gamma: float
    eigenvalues: np.ndarray  # (k,) eigenvalues of B on the columns of P_∥ (λ̂ + γ)
    basis: np.ndarray  # (m, k) A: P_∥ = Ψ A = (Y − γ S) A


def compact_eigendecomposition(
    ss: np.ndarray, sy: np.ndarray, yy: np.ndarray, gamma: float, rank_tolerance: float = 1e-10
) -> CompactEigen:
    """Eigenvalues and eigenvectors of the L-SR1 matrix from the m × m Gram blocks (float64).

    ``ΨᵀΨ = YᵀY − γ (SᵀY + YᵀS) + γ² SᵀS = V W Vᵀ``; on the k eigenvalues above ``rank_tolerance · max W``,
    ``Q = Ψ V W^{−½}`` is orthonormal and ``R = W^½ Vᵀ`` satisfies ``Ψ = Q R`` on range(Ψ). Then
    ``R M Rᵀ = U Λ̂ Uᵀ`` (M applied by a solve with the middle matrix) and ``A = V W^{−½} U``.
    """
    empty = CompactEigen(gamma, np.zeros(0), np.zeros((len(ss), 0)))
    if len(ss) == 0:
        return empty
    gram = yy - gamma * (sy + sy.T) + gamma**2 * ss
    w, v = np.linalg.eigh(0.5 * (gram + gram.T))
    keep = w > rank_tolerance * max(w[-1], 0.0)
    if not keep.any():
        return empty
    w, v = w[keep], v[:, keep]
    root = np.sqrt(w)
    core = root[:, None] * (v.T @ np.linalg.solve(middle_inverse(ss, sy, gamma), v)) * root[None, :]
    lam_hat, u = np.linalg.eigh(0.5 * (core + core.T))
    return CompactEigen(gamma, lam_hat + gamma, (v / root[None, :]) @ u)


class PairMemory:
    """The last ``capacity`` pairs ``(s_i, y_i)`` in a ring buffer on the device, Gram matrix on the host.

    ``vectors[0, j]`` is the step and ``vectors[1, j]`` the gradient difference stored in slot ``j``;
    ``gram`` holds the inner products of all 2·capacity rows (float64), updated with one
    ``(2·capacity × n) @ (n × 2)`` product per new pair. Unused slots take part in the device products
    (so no gather ever copies the buffer) and are ignored on the host.
    """

    def __init__(self, n: int, capacity: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self.capacity = capacity
        self.vectors = torch.zeros(2, capacity, n, dtype=dtype, device=device)
        self.gram = np.zeros((2 * capacity, 2 * capacity))
        self.start = 0  # slot of the oldest pair
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def rows(self) -> Tensor:
        """All stored vectors as a (2·capacity, n) matrix: steps, then gradient differences."""
        return self.vectors.view(2 * self.capacity, -1)

    @property
    def slots(self) -> list[int]:
        """Occupied slots, oldest pair first."""
        return [(self.start + i) % self.capacity for i in range(self.size)]

    def products(self, vectors: Tensor) -> Tensor:
        """Inner products of every stored row with each column of ``vectors`` (n × j): (2·capacity, j)."""
        return self.rows @ vectors

    def combine(self, coefficients: Tensor) -> Tensor:
        """``Σ_rows coefficients[row] · row``: the n × j matrix ``rowsᵀ @ coefficients``."""
        return self.rows.T @ coefficients.to(self.vectors.dtype)

    def append(self, step: Tensor, grad_diff: Tensor, products: np.ndarray, self_products: tuple) -> None:
        """Store a pair, replacing the oldest when full.

        ``products`` is :meth:`products` of ``[step, grad_diff]`` taken *before* this call (2·capacity × 2),
        ``self_products`` = ``(sᵀs, sᵀy, yᵀy)``.
        """
        c = self.capacity
        if self.size == c:
            self.drop_oldest()
        slot = (self.start + self.size) % c
        self.vectors[0, slot].copy_(step)
        self.vectors[1, slot].copy_(grad_diff)
        rows = (slot, c + slot)
        for i, row in enumerate(rows):
            self.gram[row, :] = products[:, i]
            self.gram[:, row] = products[:, i]
        ss, sy, yy = self_products
        self.gram[np.ix_(rows, rows)] = [[ss, sy], [sy, yy]]
        self.size += 1

    def drop_oldest(self) -> None:
        self.start = (self.start + 1) % self.capacity
        self.size -= 1

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(SᵀS, SᵀY, YᵀY)`` of the stored pairs, oldest first (float64)."""
        s = self.slots
        y = [self.capacity + j for j in s]
        g = self.gram
        return g[np.ix_(s, s)], g[np.ix_(s, y)], g[np.ix_(y, y)]

    def row_coefficients(self, eigen: CompactEigen) -> np.ndarray:
        """``C`` (2·capacity × k) with ``P_∥ = rowsᵀ C``, i.e. ``Ψ A`` written in the stored rows."""
        coefficients = np.zeros((2 * self.capacity, eigen.basis.shape[1]))
        s = self.slots
        coefficients[s] = -eigen.gamma * eigen.basis
        coefficients[[self.capacity + j for j in s]] = eigen.basis
        return coefficients

    def state_dict(self) -> dict:
        return {"vectors": self.vectors.detach().to("cpu", copy=True),
                "gram": torch.from_numpy(self.gram.copy()),
                "start": self.start, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        self.vectors.copy_(state["vectors"])
        self.gram = state["gram"].numpy().copy()
        self.start, self.size = int(state["start"]), int(state["size"])
