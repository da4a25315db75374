"""Top Hessian eigenpairs from Hessian-vector products: a warm-started block LOBPCG, the Hessian of
a :class:`~flowlab.Problem` at one θ as an operator, and the ``sharpness`` recorder.

- :func:`lobpcg_top`: the p largest (algebraic) eigenvalues of a symmetric operator given only as
  ``apply(V) -> A V`` on blocks of vectors (Knyazev's locally optimal block preconditioned conjugate
  gradient without a preconditioner: each iteration a Rayleigh–Ritz step on span[X, R, P] — the
  current Ritz vectors, their residuals and the previous search directions).  Only the residual
  block is multiplied by A; A X and A P are carried as linear combinations.  Small problems
  (m ≤ 4p + 8) are solved densely from m products.
- :class:`EigenTracker`: keeps the last Ritz vectors and warm-starts the next solve from them
  (consecutive θ along a trajectory are close, so a few iterations suffice); optionally grows the
  block while its lowest eigenvalue is above a threshold, so that every eigenvalue above it is
  tracked (Cohen et al., "Understanding optimization in deep learning with central flows", ICLR
  2025, track the effective Hessian's eigenvalues above 1.5 the same way).
- :class:`HessianAt`: θ ↦ H_λ(θ) V for a problem at a fixed θ without touching the discrete run's
  gradient buffer (the R-operator engine where it applies, else the gradient's autograd graph kept,
  else chunked HVPs).
- :class:`SharpnessRecorder` (``[record] sharpness = true``): ``sharpness`` (dynamics, time), λ_max of
  the Hessian of the full-batch L_λ = L + (λ/2)|θ|² at every dynamics' θ(t), and its relative
  residual ``sharpness_residual``.

A solve that does not converge is not an error here: :class:`Eigenpairs` says so (``converged``,
``residuals``) and the caller decides (the central flow stops with the reason as its status; the
recorder records the residual beside the value).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .recording import Point, Recorder, Rows, RunContext, Variable

Tensor = torch.Tensor

#: default relative residual tolerance of the eigen-solver by dtype
DEFAULT_TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def default_tol(dtype: torch.dtype) -> float:
    return DEFAULT_TOL.get(dtype, 1e-4)


@dataclass
class Eigenpairs:
    """The top p eigenpairs found: ``values`` (p,) descending, ``vectors`` (m, p) orthonormal,
    ``products`` = A·vectors (m, p), ``residuals`` (p,) = |A v − λ v| ÷ max|λ|; ``iterations``,
    ``matvecs`` (operator applications, one per column), ``converged`` (every residual ≤ tol)."""

    values: Tensor
    vectors: Tensor
    products: Tensor
    residuals: Tensor
    iterations: int
    matvecs: int
    converged: bool
    tol: float

    @property
    def top(self) -> float:
        return float(self.values[0])

    @property
    def worst_residual(self) -> float:
        return float(self.residuals.max()) if self.residuals.numel() else 0.0


def _orthonormalize(V: Tensor, against: tuple[Tensor, ...] = ()) -> tuple[Tensor, Tensor, list[Tensor]]:
    """V made orthogonal to the orthonormal blocks ``against`` (two Gram–Schmidt passes), then
    orthonormal by QR: (Q, R, coefficients C_j) with V = Σ against_j C_j + Q R."""
    coeffs = [torch.zeros(Q.shape[1], V.shape[1], dtype=V.dtype, device=V.device) for Q in against]
    for _ in range(2):
        for j, Q in enumerate(against):
            c = Q.T @ V
            V = V - Q @ c
            coeffs[j] = coeffs[j] + c
    Q, R = torch.linalg.qr(V)
    return Q, R, coeffs


def _dense(apply: Callable[[Tensor], Tensor], m: int, p: int, dtype, device, tol: float) -> Eigenpairs:
    eye = torch.eye(m, dtype=dtype, device=device)
    A = apply(eye)
    A = 0.5 * (A + A.T)
    vals, vecs = torch.linalg.eigh(A)
    vals, vecs = vals.flip(0)[:p], vecs.flip(1)[:, :p]
    AV = A @ vecs
    scale = max(float(vals.abs().max()), torch.finfo(dtype).tiny)
    res = torch.linalg.vector_norm(AV - vecs * vals, dim=0) / scale
    return Eigenpairs(vals, vecs, AV, res, 1, m, bool((res <= tol).all()), tol)


def lobpcg_top(apply: Callable[[Tensor], Tensor], X0: Tensor, tol: float | None = None, maxiter: int = 200,
               strict_above: float | None = None, loose_tol: float = 1e-2) -> Eigenpairs:
    """The top p = X0.shape[1] eigenpairs of the symmetric operator ``apply`` (m × m, given on
    (m, q) blocks), started from the block X0 (module docstring).  ``tol``: relative residual
    |A v − λ v| ≤ tol · max|λ| (default by dtype: 1e-5 float64, 1e-4 float32) for the top pair and
    every pair whose value is ≥ ``strict_above`` (None: every pair); the others, kept to warm-start
    the next solve and to tell when another eigenvalue rises, need only ``loose_tol`` (their Ritz
    values are then still within (loose_tol·max|λ|)²/gap of the eigenvalues)."""
    m, p = X0.shape
    dtype, device = X0.dtype, X0.device
    tol = default_tol(dtype) if tol is None else float(tol)
    loose = max(float(loose_tol), tol)
    if m <= 4 * p + 8:
        return _dense(apply, m, p, dtype, device, tol)
    X, AX, lam = _ritz(*_fresh(apply, X0))
    matvecs = p
    P = AP = None
    res = torch.zeros(p, dtype=dtype, device=device)
    it = since_fresh = 0
    while True:
        R = AX - X * lam
        scale = max(float(lam.abs().max()), torch.finfo(dtype).tiny)
        res = torch.linalg.vector_norm(R, dim=0) / scale
        need = _needs(lam, tol, loose, strict_above)
        active = res > need
        if not bool(active.any()) or it >= maxiter:
            break
        it += 1
        W, _, _ = _orthonormalize(R[:, active], (X,))
        AW = apply(W)
        matvecs += W.shape[1]
        blocks, ablocks = [X, W], [AX, AW]
        if P is not None:
            Qp, Rp, (cx, cw) = _orthonormalize(P, (X, W))
            d = torch.diagonal(Rp).abs()
            if float(d.max()) > 0 and float(d.min()) > 1e-8 * float(d.max()):
                APq = torch.linalg.solve_triangular(Rp.T, (AP - AX @ cx - AW @ cw).T, upper=False).T
                blocks.append(Qp)
                ablocks.append(APq)
        S, AS = torch.cat(blocks, 1), torch.cat(ablocks, 1)
        T = S.T @ AS
        vals, C = torch.linalg.eigh(0.5 * (T + T.T))
        vals, C = vals.flip(0)[:p], C.flip(1)[:, :p]
        X, AX, lam = S @ C, AS @ C, vals
        P, AP = S[:, p:] @ C[p:], AS[:, p:] @ C[p:]
        since_fresh += 1
        if since_fresh >= 20:  # A X carried as combinations drifts by rounding: refresh and restart
            X, AX, lam = _ritz(*_fresh(apply, X))
            matvecs += p
            P = AP = None
            since_fresh = 0
    return Eigenpairs(lam, X, AX, res, it, matvecs, bool((res <= _needs(lam, tol, loose, strict_above)).all()), tol)


def _needs(lam: Tensor, tol: float, loose: float, strict_above: float | None) -> Tensor:
    """The residual each pair must reach: ``tol`` for the top one and those ≥ ``strict_above``."""
    need = torch.full_like(lam, tol)
    if strict_above is not None and lam.numel() > 1:
        need[1:] = torch.where(lam[1:] >= strict_above, tol, loose)
    return need


def _fresh(apply: Callable[[Tensor], Tensor], V: Tensor) -> tuple[Tensor, Tensor]:
    X, _, _ = _orthonormalize(V)
    return X, apply(X)


def _ritz(X: Tensor, AX: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh–Ritz on the orthonormal block X: Ritz vectors, their products, values descending."""
    T = X.T @ AX
    vals, C = torch.linalg.eigh(0.5 * (T + T.T))
    vals, C = vals.flip(0), C.flip(1)
    return X @ C, AX @ C, vals


class EigenTracker:
    """Warm-started top eigenpairs along a trajectory (module docstring).

    ``k``: eigenpairs tracked at first; ``grow_above``: while the lowest tracked eigenvalue is above
    it (and fewer than ``max_k`` are tracked), track one more (a threshold given per solve
    overrides it); ``seed``: the random start of new columns."""

    def __init__(self, k: int = 1, tol: float | None = None, maxiter: int = 200, max_k: int = 8, seed: int = 0):
        self.k, self.tol, self.maxiter, self.max_k = int(k), tol, int(maxiter), int(max_k)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.V: Tensor | None = None
        self.matvecs = 0
        self.solves = 0

    def snapshot(self) -> dict:
        """The state as it is now, kept on the device (cheap: one copy of the block); :meth:`state_dict`
        of it is what a checkpoint stores."""
        return {"k": self.k, "V": None if self.V is None else self.V.clone(), "generator": self.generator.get_state(),
                "matvecs": self.matvecs, "solves": self.solves}

    def state_dict(self, snapshot: dict | None = None) -> dict:
        """The tracked block and the generator of new columns (:mod:`flowlab.checkpoint`)."""
        from .checkpoint import pack

        snap = self.snapshot() if snapshot is None else snapshot
        return {**pack({k: v for k, v in snap.items() if k != "generator"}), "generator": snap["generator"]}

    def load_state_dict(self, state: dict) -> None:
        from .checkpoint import unpack

        self.k, self.matvecs, self.solves = int(state["k"]), int(state["matvecs"]), int(state["solves"])
        self.V = unpack(state["V"], self.V)
        self.generator.set_state(state["generator"])

    def _random(self, m: int, q: int, like: Tensor) -> Tensor:
        return torch.randn(m, q, generator=self.generator, dtype=torch.float64).to(like.device, like.dtype)

    def solve(self, apply: Callable[[Tensor], Tensor], like: Tensor, grow_above: float | None = None,
              strict_above: float | None = None) -> Eigenpairs:
        """The top eigenpairs of ``apply`` (vectors like ``like``, shape (m,)); ``strict_above``: see
        :func:`lobpcg_top`."""
        m = like.shape[0]
        while True:
            if self.V is None or self.V.shape[0] != m:
                self.V = self._random(m, self.k, like)
            elif self.V.shape[1] < self.k:
                self.V = torch.cat([self.V, self._random(m, self.k - self.V.shape[1], like)], 1)
            out = lobpcg_top(apply, self.V, self.tol, self.maxiter, strict_above)
            self.matvecs += out.matvecs
            self.solves += 1
            self.V = out.vectors
            if (grow_above is None or self.k >= min(self.max_k, m) or not out.converged
                    or float(out.values[-1]) <= grow_above):
                return out
            self.k += 1


class HessianAt:
    """V ↦ H_λ(θ) V = H(θ)V + λV for the full-batch loss of ``problem`` at a fixed θ (columns of V
    one product each).  Uses the R-operator engine when the model supports it, else the gradient's
    autograd graph (one chunk), else chunked HVPs; never writes the problem's gradient buffer (the
    discrete run's ĝ may live there) and counts its evaluations in ``problem.counts`` (so that flows
    that keep state at a θ notice the problem was evaluated elsewhere)."""

    def __init__(self, problem, theta: Tensor, weight_decay: float = 0.0, engine=None):
        self.problem, self.theta, self.wd = problem, theta.detach(), float(weight_decay)
        self.one = problem.chunk_size >= problem.n
        self.engine = engine if self.one else None
        self.graph = None
        if self.engine is not None:
            try:
                self.engine.grad(self.theta, problem.batch(), weights=False)
            except NotImplementedError:
                self.engine = None
        if self.engine is None and self.one:
            self.graph = problem.grad_graph(self.theta, problem.batch())[2]
            problem.counts["grad"] += 1

    def _hv(self, v: Tensor) -> Tensor:
        p = self.problem
        if self.engine is not None:
            p.counts["hvp"] += 1
            return self.engine.hvp(v)
        if self.graph is not None:
            p.counts["hvp"] += 1
            return self.graph.hvp(v, retain=True)
        return p.full_hvp(self.theta, v)

    def __call__(self, V: Tensor) -> Tensor:
        cols = [self._hv(V[:, j].contiguous()) for j in range(V.shape[1])]
        out = torch.stack(cols, 1)
        return out + self.wd * V if self.wd else out


class SharpnessRecorder(Recorder):
    """``sharpness`` (dynamics, time): λ_max of the Hessian of the full-batch L_λ at each dynamics'
    θ(t), by warm-started LOBPCG (one tracker per dynamics and path); ``sharpness_residual``: its
    relative residual |H v − λ v| / λ (the solve converged when it is ≤ the tolerance, attrs).  A flow
    that already computed its top eigenpair at θ(t) (the central flow) hands it over in
    ``point.extras["sharpness"]`` and nothing is recomputed.  Cost: a few HVPs per dynamics and
    recorded row once warm (the first solve from a random start takes more)."""

    def __init__(self, tol: float | None = None, maxiter: int = 300, block: int = 2):
        self.tol, self.maxiter, self.block = tol, maxiter, block
        self.trackers: dict[tuple[int, int], EigenTracker] = {}

    def variables(self, ctx: RunContext) -> list[Variable]:
        tol = self.tol if self.tol is not None else default_tol(ctx.problem.dtype)
        return [
            ctx.per_path("sharpness", ("dynamics", "time"), attrs={
                "long_name": "sharpness: largest eigenvalue of the Hessian of the full-batch L + (wd/2)|θ|² at θ(t)",
                "method": "warm-started block LOBPCG on Hessian-vector products (flowlab.spectrum)",
                "edge_of_stability": "GD with step η is stable along a direction while η·λ < 2 (2/η: the edge)"}),
            ctx.per_path("sharpness_residual", ("dynamics", "time"), attrs={
                "long_name": "relative residual |Hv - λv| / max|λ| of the sharpness eigenpair",
                "tolerance": tol, "converged": f"residual <= {tol:g}"}),
        ]

    def start(self, ctx: RunContext) -> None:
        from .flows.rop import engine_for

        self.problem = ctx.problem
        self.wd = float(ctx.study.optimizer.weight_decay)
        self.engine = engine_for(ctx.problem)
        self.seed = int(ctx.study.study.seed)

    def state_dict(self) -> dict:
        return {"trackers": [[i, p, t.state_dict()] for (i, p), t in self.trackers.items()]}

    def load_state_dict(self, state: dict) -> None:
        for i, p, st in state["trackers"]:
            self._tracker(int(i), int(p)).load_state_dict(st)

    def _tracker(self, index: int, path: int) -> EigenTracker:
        key = (index, path)
        if key not in self.trackers:
            self.trackers[key] = EigenTracker(self.block, self.tol, self.maxiter, max_k=self.block,
                                              seed=self.seed + 7 * index + 1013 * path)
        return self.trackers[key]

    def sharpness_at(self, theta: Tensor, index: int = 0, path: int = 0) -> Eigenpairs:
        op = HessianAt(self.problem, theta, self.wd, self.engine)
        return self._tracker(index, path).solve(op, theta, strict_above=math.inf)

    def record(self, rows: Rows, point: Point) -> None:
        given = point.extras.get("sharpness") if point.extras else None
        if given is not None:
            value, residual = given
            rows.put("sharpness", point.index, value)
            rows.put("sharpness_residual", point.index, residual)
            return
        theta = point.theta
        with torch.no_grad():
            if theta.dim() == 1:
                e = self.sharpness_at(theta, point.index)
                rows.put("sharpness", point.index, float(e.values[0]))
                rows.put("sharpness_residual", point.index, float(e.residuals[0]))
                return
            vals, ress = [], []
            for s in range(theta.shape[0]):
                e = self.sharpness_at(theta[s], point.index, s)
                vals.append(float(e.values[0]))
                ress.append(float(e.residuals[0]))
            rows.put("sharpness", point.index, torch.tensor(vals, dtype=torch.float64))
            rows.put("sharpness_residual", point.index, torch.tensor(ress, dtype=torch.float64))


__all__ = ["EigenTracker", "Eigenpairs", "HessianAt", "SharpnessRecorder", "default_tol", "lobpcg_top"]
