"""The small semidefinite complementarity problem of the central flow, solved without dependencies.

SDCP(A, B): find a symmetric k × k matrix X with

    X ⪰ 0,    A + B[X] ⪰ 0,    ⟨X, A + B[X]⟩ = 0,

where A is symmetric and B a self-adjoint positive semidefinite operator on symmetric matrices
(given as a (k², k²) matrix acting on vec(X)).  It is the optimality condition of the convex
quadratic program over the PSD cone

    minimise  f(X) = ⟨A, X⟩ + ½⟨X, B[X]⟩   subject to X ⪰ 0

(∇f = A + B[X]; the KKT conditions of a cone program are exactly the three lines above).  Cohen et
al. (ICLR 2025; their src/sdcp.py) solve the same program with CVXPY.  Here: accelerated projected
gradient (FISTA, Beck & Teboulle 2009) with step 1/‖B‖ and adaptive restart (O'Donoghue & Candès
2015), the projection onto the PSD cone by an eigendecomposition of the k × k iterate; k = 1 in closed
form, X = max(0, −A/B).  Converged when the projected-gradient residual
|X − Π(X − (A + B[X])/‖B‖)| ≤ tol · (|X| + |A|/‖B‖).  The problem has no solution when A has a
negative direction B does not see (the iterates grow without bound): the solver says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SDCPResult:
    """``X`` (k, k), ``converged``, ``iterations``, ``residual`` (relative, see the module
    docstring), ``reason`` (why it failed, "" when it converged)."""

    X: np.ndarray
    converged: bool
    iterations: int
    residual: float
    reason: str = ""


def psd_projection(X: np.ndarray) -> np.ndarray:
    """The nearest PSD matrix in Frobenius norm: negative eigenvalues set to 0."""
    S = 0.5 * (X + X.T)
    w, V = np.linalg.eigh(S)
    return (V * np.maximum(w, 0.0)) @ V.T


def _apply(B: np.ndarray, X: np.ndarray) -> np.ndarray:
    k = X.shape[0]
    Y = (B @ X.reshape(-1)).reshape(k, k)
    return 0.5 * (Y + Y.T)


def objective(A: np.ndarray, B: np.ndarray, X: np.ndarray) -> float:
    """f(X) = ⟨A, X⟩ + ½⟨X, B[X]⟩."""
    return float(np.sum(A * X) + 0.5 * np.sum(X * _apply(B, X)))


def kkt_residuals(A: np.ndarray, B: np.ndarray, X: np.ndarray) -> dict[str, float]:
    """How far X is from solving SDCP(A, B): ``primal`` = −min eig(X) (≤ 0 when X ⪰ 0), ``dual`` =
    −min eig(A + B[X]), ``complementarity`` = |⟨X, A + B[X]⟩| (all absolute)."""
    G = A + _apply(B, X)
    return {"primal": float(-np.linalg.eigvalsh(0.5 * (X + X.T)).min()),
            "dual": float(-np.linalg.eigvalsh(0.5 * (G + G.T)).min()),
            "complementarity": float(abs(np.sum(X * G)))}


def solve_sdcp(A: np.ndarray, B: np.ndarray, X0: np.ndarray | None = None, tol: float = 1e-10,
               maxiter: int = 20000) -> SDCPResult:
    """Solve SDCP(A, B) (module docstring).  ``A`` (k, k) symmetric, ``B`` (k², k²) symmetric PSD
    acting on vec(X) (row-major), ``X0`` a warm start."""
    A = 0.5 * (np.asarray(A, dtype=np.float64) + np.asarray(A, dtype=np.float64).T)
    k = A.shape[0]
    if k == 0:
        return SDCPResult(np.zeros((0, 0)), True, 0, 0.0)
    B = np.asarray(B, dtype=np.float64).reshape(k * k, k * k)
    B = 0.5 * (B + B.T)
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(B))):
        return SDCPResult(np.zeros((k, k)), False, 0, float("inf"), "non-finite data")
    if np.linalg.eigvalsh(A).min() >= 0:  # X = 0 is a solution: A ⪰ 0 and ⟨0, A⟩ = 0
        return SDCPResult(np.zeros((k, k)), True, 0, 0.0)
    # the norm of B on symmetric matrices (the symmetric part of B's action)
    L = float(np.linalg.eigvalsh(B).max()) if B.size else 0.0
    a_norm = float(np.linalg.norm(A))
    if not L > 1e-300 or L < 1e-14 * a_norm:
        return SDCPResult(np.zeros((k, k)), False, 0, float("inf"),
                          "A has a negative eigenvalue and B vanishes: no solution (unbounded)")
    if k == 1:
        x = max(0.0, -A[0, 0] / B[0, 0]) if B[0, 0] > 0 else 0.0
        X = np.array([[x]])
        if B[0, 0] <= 0 and A[0, 0] < 0:
            return SDCPResult(X, False, 0, float("inf"), "A < 0 and B = 0: no solution (unbounded)")
        return SDCPResult(X, True, 0, 0.0)
    step = 1.0 / L
    scale = a_norm / L
    X = psd_projection(X0) if X0 is not None and X0.shape == (k, k) and np.all(np.isfinite(X0)) else np.zeros((k, k))
    Y, t = X.copy(), 1.0
    residual = float("inf")
    it = 0
    for it in range(1, maxiter + 1):
        Xn = psd_projection(Y - step * (A + _apply(B, Y)))
        tn = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        if np.sum((Y - Xn) * (Xn - X)) > 0:  # the momentum points uphill: restart it
            Y, t = Xn.copy(), 1.0
        else:
            Y = Xn + ((t - 1.0) / tn) * (Xn - X)
            t = tn
        X = Xn
        if it % 10 == 0 or it == maxiter:
            G = A + _apply(B, X)
            residual = float(np.linalg.norm(X - psd_projection(X - step * G))) / (float(np.linalg.norm(X)) + scale)
            if residual <= tol:
                return SDCPResult(X, True, it, residual)
            if not np.all(np.isfinite(X)) or np.linalg.norm(X) > 1e12 * max(scale, 1e-300):
                return SDCPResult(X, False, it, residual, "iterates grow without bound: A has a negative direction "
                                  "B does not see (no solution)")
    return SDCPResult(X, False, it, residual, f"not converged after {maxiter} iterations (residual {residual:.2e} "
                      f"> tol {tol:.0e})")


__all__ = ["SDCPResult", "kkt_residuals", "objective", "psd_projection", "solve_sdcp"]
