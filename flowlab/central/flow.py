"""The central flow: a continuous model of full-batch GD that holds at the edge of stability.

Cohen, Damian, Talwalkar, Kolter & Lee, "Understanding optimization in deep learning with central
flows", ICLR 2025 (docs/theory.md#the-central-flow).  In flowlab's time t = Σ η (their time is
steps, dw/ds = −η[…]; with t = ηs the η goes):

    θ' = −[∇L_λ(θ) + ½ ∇_θ⟨H(θ), Σ(t)⟩],     Σ = U X Uᵀ,

U (m × k) the orthonormal top eigenvectors of H_λ whose eigenvalues λ_i are near 2/η (above
``critical`` · 2/η), X ⪰ 0 (k × k) the solution of the complementarity problem that keeps them at or
below 2/η.  With a_ij = ∇_θ(u_iᵀ H u_j) (third-derivative contractions, by polarisation of
``ops.d3``: a_ii = d3(u_i), a_ij = ½[d3(u_i + u_j) − a_ii − a_jj]), the velocity of UᵀH_λU along the
flow is (d/dt UᵀH_λU)_ij = ⟨a_ij, θ'⟩ = −α_ij − B[X]_ij with α_ij = ⟨a_ij, ∇L_λ⟩ and
B[X]_ij = ½ Σ_kl ⟨a_ij, a_kl⟩ X_kl.  X solves

    X ⪰ 0,   D/h + α + B[X] ⪰ 0,   ⟨X, D/h + α + B[X]⟩ = 0,     D = diag(2/η − λ_i),

i.e. the margins 2/η − λ of the critical directions, linearised over a time h = ``relax`` · η, stay
≥ 0 — the discretisation of Cohen et al.'s reference code, whose Euler substep of a quarter step
(h = η/4) is the default here.  As h → 0 this is their continuous SDCP on the directions exactly at
2/η; with one direction, σ² = X = 2⟨−∇L_λ, ∇λ⟩/|∇λ|² (gradient flow projected onto λ_max = 2/η).  With
no eigenvalue above ``critical`` · 2/η the field is −∇L_λ: the central flow is gradient flow below the
edge of stability.

Each evaluation: a gradient; the top eigenpairs of H_λ by warm-started block LOBPCG on HVPs
(:class:`flowlab.spectrum.EigenTracker`; every eigenvalue above ``track`` · 2/η is tracked, the block
grows as more cross it, up to ``max_directions``); k(k+1)/2 third-derivative contractions; one
k × k complementarity problem (:func:`flowlab.central.sdcp.solve_sdcp`).  Torch only: integrate it
with a fixed-step integrator (``flowlab:euler`` — the reference's scheme —, ``flowlab:midpoint``,
``flowlab:rk4``; ``dt`` defaults to η/4 and must be < η).  A failed eigen-solve or complementarity
solve stops the flow with the reason as its status.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from ..flows.base import Flow, FlowStopped, Hyper, hvp_l, loss_grad_l
from ..spectrum import Eigenpairs, EigenTracker
from .sdcp import SDCPResult, solve_sdcp


class MinibatchWarning(UserWarning):
    """The central flow is compared with a minibatch run (it models full-batch GD)."""


@dataclass
class CentralPoint:
    """One evaluation of the central flow at θ (what its vector field and its extras are made of).

    ``loss`` L(θ) (without weight decay), ``field`` θ', ``eig`` the tracked eigenpairs of H_λ,
    ``U`` (m, k) the candidate directions (eigenvalues ``lam`` above critical·2/η), ``HU`` = H U
    (without weight decay), ``X`` (k, k) the complementarity solution, ``c`` = ∇⟨H, Σ⟩ (m,),
    ``failure`` why the evaluation failed ("" when it did not)."""

    theta: torch.Tensor
    loss: torch.Tensor
    field: torch.Tensor
    eig: Eigenpairs | None
    U: torch.Tensor
    HU: torch.Tensor
    lam: torch.Tensor
    X: np.ndarray
    c: torch.Tensor
    eta: float
    sdcp: SDCPResult | None = None
    failure: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.U.shape[1])

    @property
    def sigma_trace(self) -> float:
        """tr Σ = tr X (U orthonormal)."""
        return float(np.trace(self.X)) if self.X.size else 0.0

    @property
    def critical_directions(self) -> int:
        """The rank of X: directions held at the edge (X's eigenvalues above 1e-9 of its largest)."""
        if not self.X.size:
            return 0
        w = np.linalg.eigvalsh(0.5 * (self.X + self.X.T))
        top = float(w.max())
        return int(np.sum(w > max(1e-9 * top, 0.0))) if top > 0 else 0

    @property
    def predicted_loss(self) -> float:
        """GD's time-averaged loss as the central flow predicts it: L + ½⟨H, Σ⟩ = L + tr(Σ)/η on
        directions at 2/η (Cohen et al. 2025)."""
        return float(self.loss) + self.sigma_trace / self.eta


def _number(name: str, value: Any, low: float, high: float, what: str, low_open: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ConfigError(name, value, what)
    return float(value)


def _count(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(name, value, f"expected an integer >= {low}")
    return int(value)


class CentralFlow(Flow):
    """Central flow θ' = −∇L_λ − ½∇⟨H, Σ⟩ (Cohen et al. 2025): GD's time average at the edge of stability.

    Σ = UXUᵀ on the top eigenvectors held at 2/η (module docstring).  Options: ``relax`` (h/η, default 0.25),
    ``critical`` (fraction of 2/η above which a direction enters the complementarity problem, 0.975),
    ``track`` (fraction of 2/η above which eigenvalues are tracked, 0.75), ``max_directions`` (8),
    ``eig_tol`` (relative residual, default 1e-5 in float64, 1e-4 in float32), ``eig_maxiter`` (300),
    ``sdcp_tol`` (1e-10), ``sdcp_maxiter`` (20000), ``window`` (steps of GD's loss averaged in the
    recorded ``loss_window_mean``, 11), ``seed`` (the eigen-solver's random start)."""

    name = "central_flow"
    order = 1  # below the edge of stability it is gradient flow
    needs = frozenset({"loss_and_grad", "hvp", "d3"})
    discrete = "gd"
    default_integrator: ClassVar[str] = "flowlab:euler"
    #: the default step is η / this (the reference's four Euler substeps per GD step)
    DT_DEFAULT_DIVISOR: ClassVar[float] = 4.0
    #: eigenpairs above this fraction of critical·2/η are converged to eig_tol (the others, tracked
    #: below the candidates, only loosely: flowlab.spectrum.lobpcg_top)
    STRICT: ClassVar[float] = 0.9

    def __init__(self, relax: float = 0.25, critical: float = 0.975, track: float = 0.75, max_directions: int = 8,
                 eig_tol: float | None = None, eig_maxiter: int = 300, sdcp_tol: float = 1e-10,
                 sdcp_maxiter: int = 20000, window: int = 11, seed: int = 0):
        self.relax = _number("relax", relax, 0.0, 10.0, "expected a number in (0, 10] (h = relax·η, the time over "
                             "which the margins 2/η − λ are linearised; the reference: 0.25)")
        self.critical = _number("critical", critical, 0.5, 1.0, "expected a fraction of 2/η in (0.5, 1]")
        self.track = _number("track", track, 0.0, 1.0, "expected a fraction of 2/η in (0, 1]")
        if self.track > self.critical:
            raise ConfigError("track", track, f"must be <= critical = {critical} (every candidate must be tracked)")
        self.max_directions = _count("max_directions", max_directions, 1)
        self.eig_tol = None if eig_tol is None else _number("eig_tol", eig_tol, 0.0, 0.1, "expected a number in (0, 0.1]")
        self.eig_maxiter = _count("eig_maxiter", eig_maxiter, 1)
        self.sdcp_tol = _number("sdcp_tol", sdcp_tol, 0.0, 0.1, "expected a number in (0, 0.1]")
        self.sdcp_maxiter = _count("sdcp_maxiter", sdcp_maxiter, 1)
        self.window = _count("window", window, 1)
        self.seed = _count("seed", seed, 0)
        self.tracker = EigenTracker(1, self.eig_tol, self.eig_maxiter, self.max_directions, self.seed)
        self._cache: CentralPoint | None = None
        self._before: tuple | None = None  # the tracker's state and X_prev before the cached evaluation
        self._X_prev: np.ndarray | None = None
        self._ops: Any = None
        self._hp: Hyper | None = None
        self.evaluations = 0

    def options(self) -> dict:
        return {"relax": self.relax, "critical": self.critical, "track": self.track,
                "max_directions": self.max_directions, "eig_tol": self.eig_tol, "eig_maxiter": self.eig_maxiter,
                "sdcp_tol": self.sdcp_tol, "sdcp_maxiter": self.sdcp_maxiter, "window": self.window, "seed": self.seed}

    # ---------------------------------------------------------------- checks
    def check_run(self, integrator: Any, hp: Hyper, problem: Any, field: str = "flows") -> None:
        """Refuse what it cannot integrate (one ConfigError line, fields relative to the flow's
        table); default the step to η/4; warn once on a minibatch run."""
        name = getattr(integrator, "name", type(integrator).__name__)
        if getattr(integrator, "backend", "torch") != "torch":
            raise ConfigError("integrator", name, "central_flow runs on torch only (its eigen-solver and "
                              "complementarity step are torch code): use flowlab:euler, flowlab:midpoint or flowlab:rk4")
        if getattr(integrator, "kind", "adaptive") != "fixed" or hasattr(integrator, "noise"):
            raise ConfigError("integrator", name, "central_flow needs a fixed-step integrator (its field switches "
                              "where directions become critical): flowlab:euler (the reference's), flowlab:midpoint "
                              "or flowlab:rk4, with dt < η")
        if integrator.dt is None:
            integrator.dt_divisor = self.DT_DEFAULT_DIVISOR * getattr(integrator, "dt_divisor", 1.0)
        elif not float(integrator.dt) < hp.lr:
            raise ConfigError("dt", integrator.dt, f"central_flow needs dt < η = {hp.lr:g} (the sharpness it holds, "
                              f"2/η, makes a step ≥ η unstable); leave dt unset for η/4")
        if hp.batch_size is not None and int(hp.batch_size) < int(problem.n):
            warnings.warn(f"central_flow models full-batch GD; this run takes minibatches of {hp.batch_size} of "
                          f"{problem.n} examples, so it is compared with SGD, which it does not model",
                          MinibatchWarning, stacklevel=2)

    # -------------------------------------------------------------- dynamics
    def initial_state(self, theta0, ops, hp):
        self._ops, self._hp = ops, hp
        return (theta0,)

    def vector_field(self, t, state, ops, hp):
        self._ops, self._hp = ops, hp
        ev = self.evaluate(state[0], ops, hp)
        if ev.failure:
            raise FlowStopped(f"central_flow at t={float(t):.6g}: {ev.failure}")
        return (ev.field,)

    def observe(self, state: tuple) -> dict[str, Any]:
        """The extras of a recording time: ``sharpness`` (λ_max of H_λ, residual), and ``central``
        (the :class:`CentralPoint`; the central recorder reads Σ, the loss prediction and the
        symmetry terms from it)."""
        if self._ops is None:
            return {}
        with torch.no_grad():
            ev = self.evaluate(state[0], self._ops, self._hp)
        if ev.failure or ev.eig is None:
            return {"central": ev}
        return {"sharpness": (float(ev.eig.values[0]), float(ev.eig.residuals[0])), "central": ev}

    def _hvps(self, ops, theta, V, hp) -> torch.Tensor:
        return torch.stack([hvp_l(ops, theta, V[:, j].contiguous(), hp) for j in range(V.shape[1])], 1)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """The eigen-tracker, the last complementarity solution, the count and the cached
        evaluation — kept as its θ and the tracker's state before it, so that a resumed run
        recomputes it exactly (:mod:`flowlab.checkpoint`)."""
        from ..checkpoint import pack

        out = {"tracker": self.tracker.state_dict(), "X_prev": pack(self._X_prev), "evaluations": self.evaluations}
        c = self._cache
        if c is not None and self._before is not None:
            out["cache"] = {"theta": pack(c.theta), "eta": c.eta, "tracker": self.tracker.state_dict(self._before[0]),
                            "X_prev": pack(self._before[1])}
        return out

    def load_state_dict(self, state: dict) -> None:
        from dataclasses import replace

        from ..checkpoint import unpack

        cache = state.get("cache")
        if cache is not None and self._ops is not None and self._hp is not None:
            self.tracker.load_state_dict(cache["tracker"])
            self._X_prev = unpack(cache["X_prev"])
            self._cache = None
            theta = unpack(cache["theta"], self._ops.problem.theta0 if hasattr(self._ops, "problem") else None)
            self.evaluate(theta, self._ops, replace(self._hp, lr=float(cache["eta"])))
        self.tracker.load_state_dict(state["tracker"])
        self._X_prev = unpack(state["X_prev"])
        self.evaluations = int(state["evaluations"])

    @torch.no_grad()
    def evaluate(self, theta: torch.Tensor, ops: Any, hp: Hyper) -> CentralPoint:
        """The central flow's field and its parts at θ (cached: the last θ by value)."""
        c = self._cache
        if c is not None and c.eta == hp.lr and c.theta.shape == theta.shape and torch.equal(c.theta, theta):
            return c
        self._before = (self.tracker.snapshot(), None if self._X_prev is None else self._X_prev.copy())
        self.evaluations += 1
        eta = float(hp.lr)
        edge = 2.0 / eta
        loss, G = loss_grad_l(ops, theta, hp)
        empty = theta.new_zeros(theta.shape[0], 0)
        eig = self.tracker.solve(lambda V: self._hvps(ops, theta, V, hp), theta, grow_above=self.track * edge,
                                 strict_above=self.STRICT * self.critical * edge)
        base = dict(theta=theta.detach().clone(), loss=loss.detach().clone() if torch.is_tensor(loss) else loss,
                    eig=eig, eta=eta)
        if not eig.converged:
            ev = CentralPoint(field=-G, U=empty, HU=empty, lam=theta.new_zeros(0), X=np.zeros((0, 0)),
                              c=torch.zeros_like(theta), **base,
                              failure=f"top eigenpairs not converged ({eig.iterations} LOBPCG iterations, worst "
                                      f"relative residual {eig.worst_residual:.2e} > eig_tol {eig.tol:.0e})")
            self._cache = ev
            return ev
        cand = eig.values > self.critical * edge
        k = int(cand.sum())
        if k == 0:
            ev = CentralPoint(field=-G, U=empty, HU=empty, lam=theta.new_zeros(0), X=np.zeros((0, 0)),
                              c=torch.zeros_like(theta), **base)
            self._cache = ev
            self._X_prev = None
            return ev
        U = eig.vectors[:, cand]
        lam = eig.values[cand]
        HU = eig.products[:, cand] - hp.weight_decay * U if hp.weight_decay else eig.products[:, cand]
        # a_ij = ∇(u_iᵀ H u_j) by polarisation of d3(v) = ∇(vᵀ H v)
        diag = [ops.d3(theta, U[:, i].contiguous()) for i in range(k)]
        pairs, vecs = [], []
        for i in range(k):
            pairs.append((i, i))
            vecs.append(diag[i])
        for i in range(k):
            for j in range(i + 1, k):
                s = ops.d3(theta, (U[:, i] + U[:, j]).contiguous())
                pairs.append((i, j))
                vecs.append(0.5 * (s - diag[i] - diag[j]))
        Amat = torch.stack(vecs, 1)  # (m, npairs)
        gram = (Amat.T @ Amat).double().cpu().numpy()
        alpha = (Amat.T @ G).double().cpu().numpy()
        lam_np = lam.double().cpu().numpy()
        A = np.zeros((k, k))
        B = np.zeros((k, k, k, k))
        for p, (i, j) in enumerate(pairs):
            A[i, j] = A[j, i] = alpha[p]
            for q, (a, b) in enumerate(pairs):
                v = 0.5 * gram[p, q]
                B[i, j, a, b] = B[j, i, a, b] = B[i, j, b, a] = B[j, i, b, a] = v
        h = self.relax * eta
        A[np.diag_indices(k)] += (edge - lam_np) / h
        X0 = self._X_prev if self._X_prev is not None and self._X_prev.shape == (k, k) else None
        res = solve_sdcp(A, B.reshape(k * k, k * k), X0, self.sdcp_tol, self.sdcp_maxiter)
        coef = [res.X[i, i] if i == j else 2.0 * res.X[i, j] for (i, j) in pairs]
        cvec = Amat @ torch.tensor(coef, dtype=Amat.dtype, device=Amat.device)
        failure = "" if res.converged else f"the complementarity problem (k={k}) was not solved: {res.reason}"
        ev = CentralPoint(field=-(G + 0.5 * cvec), U=U, HU=HU, lam=lam, X=res.X, c=cvec, sdcp=res, failure=failure,
                          **base)
        self._cache = ev
        if res.converged:
            self._X_prev = res.X
        return ev


__all__ = ["CentralFlow", "CentralPoint", "MinibatchWarning"]
