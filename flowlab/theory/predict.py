"""Exact dynamics of the broken conservation laws (Kunin et al., ICLR 2021, §5 and App. C–E), as
per-step recursions on decaying state — vectorised over symmetry groups.

For every group A the once-conserved quantity is Q = ⟨θ_A, 1⟩ (translation), |θ_A|² (scale) or
|θ_A1|² − |θ_A2|² (rescale).  A :class:`Predictor` starts from the measured Q(0) and, fed the
per-update group scalars of the discrete run, predicts Q(t_k) under each *variant*:

``conservation``          gradient flow without weight decay: Q(t) = Q(0).
``gradient_flow``         weight decay only: Q(0)e^{−λ't} (translation), Q(0)e^{−2λ't} (scale, rescale);
                          λ' = λ/(1−β) with momentum β (the gradient-flow limit of heavy ball).
``paper``                 the paper's continuous exact dynamics for SGD,
                          Q(t) = e^{−2λt}Q(0) + η∫_0^t e^{−2λ(t−τ)} G(τ) dτ, G = |ĝ_A|² or |ĝ_A1|² − |ĝ_A2|²,
                          the integral a Riemann sum over the actual steps: Σ_j η_j² e^{−2λ(t−t_j)} G_j.
``paper_hat``             the same with λ̂_j = λ(1 + η_jλ/2) in every exponent (the IGR flow of L_λ).
``exact_discrete``        the exact discrete recursions (docs/theory.md#exact-discrete-recursions): plain SGD
                          S_{k+1} = (1−η_kλ)S_k, Q_{k+1} = (1−η_kλ)²Q_k + η_k²G_k; heavy ball (dampening τ,
                          c_0 = 1, c_k = 1−τ) driven by the measured W_{k+1} (V = |v_A|² resp. |v_A1|²−|v_A2|²):
                          Q_{k+1} = Q_k − 2η_k(βP_k + c_kλQ_k) + η_k²V_{k+1},  P_{k+1} = βP_k + c_kλQ_k − η_kV_{k+1};
                          translation U_{k+1} = βU_k + c_kλS_k, S_{k+1} = S_k − η_kU_{k+1}.
``oscillator``            (momentum) the paper's damped oscillator for (η(1+β)/2)θ'' + (1−β)θ' = −∇L_λ:
                          x'' + 2γx' + ω²x = 2|θ_A'|², γ = (1−β)/(η(1+β)), ω² = 4λ/(η(1+β)) (translation:
                          ω_tr² = 2λ/(η(1+β)), no forcing), x'(0) = 0, θ' = the momentum buffer v_{k+1}; the
                          Green's-function integral is carried as a 2-state linear recursion (an impulse
                          2V_{k+1}η at t_k, then the exact propagator e^{ηM}) — all three damping regimes.
``momentum_first_order``  (momentum) the projection of the first-order modified momentum flow
                          θ' = −(1/(1−β))∇[L_λ + c|∇L_λ|²], c = η(1+β)/(4(1−β)²) [derived]:
                          Q(t) = e^{−2λ̃t}Q(0) + (η(1+β)/(1−β)³)∫e^{−2λ̃(t−τ)} G dτ, λ̃ = λ(1+2cλ)/(1−β);
                          translation e^{−λ̃t}S(0).

Every accumulator decays (no growing exponentials): 10⁶ steps stay finite in float32 and float64.
State is kept in float64 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

TRANSLATION, SCALE, RESCALE = 0, 1, 2
KIND_CODES = {"translation": TRANSLATION, "scale": SCALE, "rescale": RESCALE}

SGD_VARIANTS = ("conservation", "gradient_flow", "paper", "paper_hat", "exact_discrete")
MOMENTUM_VARIANTS = ("conservation", "gradient_flow", "exact_discrete", "oscillator", "momentum_first_order")


def variants_for(momentum: float) -> tuple[str, ...]:
    return MOMENTUM_VARIANTS if momentum > 0 else SGD_VARIANTS


# rows of the state matrices: decayed forcing integrals, exact-discrete (Q, P), oscillator (x, x')
I_PAPER, I_HAT, I_MFO, Q_EX, P_EX, X_OSC, Y_OSC = range(7)
N_ROWS = 7


class Predictor:
    """Predictions of every group's quantity, advanced over discrete updates.

    All variants are linear recursions s_{k+1} = A_k s_k + B_k F_k in a small state s (7 rows per
    group) with F_k = (G_k, W_{k+1}); translation groups have no forcing.  ``advance`` applies a run
    of updates at once (runs of equal η by matrix powers: a 10⁶-step run costs ~10³ small products);
    every A_k is a contraction or neutral, so no exponential ever grows.  The state is a float64
    numpy array on the host (tiny: 7 × groups); inputs may be torch tensors on any device.

    Parameters
    ----------
    kinds: the group kinds (``translation``/``scale``/``rescale`` or codes 0/1/2), one per group.
    q0: the measured quantities at t = 0.
    weight_decay, momentum, dampening: the optimizer's λ, β, τ (coupled L2, PyTorch heavy ball).
    nesterov: Nesterov momentum has no closed recursion here; its ``exact_discrete`` is NaN.
    """

    def __init__(self, kinds, q0, weight_decay: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, variants: Sequence[str] | None = None):
        self.device = q0.device if isinstance(q0, torch.Tensor) else torch.device("cpu")
        if isinstance(kinds, torch.Tensor):
            codes = kinds.detach().cpu().numpy().astype(np.int64)
        else:
            codes = np.array([KIND_CODES[k] if isinstance(k, str) else int(k) for k in kinds], dtype=np.int64)
        self.tr = np.flatnonzero(codes == TRANSLATION)
        self.sc = np.flatnonzero(codes != TRANSLATION)
        self.n = len(codes)
        self.q0 = _np(q0).copy()
        self.lam, self.beta, self.damp, self.nesterov = float(weight_decay), float(momentum), float(dampening), nesterov
        self.variants = tuple(variants or variants_for(self.beta))
        unknown = set(self.variants) - set(SGD_VARIANTS) - set(MOMENTUM_VARIANTS)
        if unknown:
            raise ValueError(f"unknown theory variant(s): {sorted(unknown)}")
        self.s_tr = self._initial(self.q0[self.tr])
        self.s_sc = self._initial(self.q0[self.sc])
        self.E = {"gf": 0.0, "paper": 0.0, "hat": 0.0, "mfo": 0.0}  # Σ rate_j η_j, only used as e^{−E}
        self.k = 0
        self._mats: dict[tuple[float, bool], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._powers: dict[tuple[float, bool, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @staticmethod
    def _initial(q: np.ndarray) -> np.ndarray:
        s = np.zeros((N_ROWS, q.size))
        s[Q_EX] = q
        s[X_OSC] = q
        return s

    # ------------------------------------------------------------ matrices
    def _matrices(self, eta: float, first: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A_translation, A_scale, B_scale) for one update with learning rate η."""
        key = (eta, first)
        if key in self._mats:
            return self._mats[key]
        lam, beta = self.lam, self.beta
        A_tr, A_sc, B = np.eye(N_ROWS), np.eye(N_ROWS), np.zeros((N_ROWS, 2))
        a = math.exp(-2 * lam * eta)
        A_sc[I_PAPER, I_PAPER], B[I_PAPER, 0] = a, a * eta * eta
        rate = lam * (1 + eta * lam / 2)
        a = math.exp(-2 * rate * eta)
        A_sc[I_HAT, I_HAT], B[I_HAT, 0] = a, a * eta * eta
        if beta < 1:
            c = eta * (1 + beta) / (4 * (1 - beta) ** 2)
            rate = lam * (1 + 2 * c * lam) / (1 - beta)
            a = math.exp(-2 * rate * eta)
            A_sc[I_MFO, I_MFO], B[I_MFO, 0] = a, a * eta * eta * (1 + beta) / (1 - beta) ** 3
        if beta == 0:  # exact discrete, plain SGD
            A_tr[Q_EX, Q_EX] = 1 - eta * lam
            A_sc[Q_EX, Q_EX], B[Q_EX, 0] = (1 - eta * lam) ** 2, eta * eta
        elif not self.nesterov:  # heavy ball: inner = βP + cλQ = ⟨θ_k, v_{k+1}⟩ (translation: U_{k+1})
            c = 1.0 if first else 1 - self.damp
            for A in (A_tr, A_sc):
                A[P_EX, Q_EX], A[P_EX, P_EX] = c * lam, beta
            A_tr[Q_EX, Q_EX], A_tr[Q_EX, P_EX] = 1 - eta * c * lam, -eta * beta
            A_sc[Q_EX, Q_EX], A_sc[Q_EX, P_EX], B[Q_EX, 1] = 1 - 2 * eta * c * lam, -2 * eta * beta, eta * eta
            B[P_EX, 1] = -eta
        if beta > 0:  # oscillator: impulse 2ηW on x', then the exact propagator e^{ηM}
            gamma = (1 - beta) / (eta * (1 + beta))
            for A, w2 in ((A_tr, 2 * lam / (eta * (1 + beta))), (A_sc, 4 * lam / (eta * (1 + beta)))):
                M = torch.tensor([[0.0, 1.0], [-w2, -2 * gamma]], dtype=torch.float64)
                A[X_OSC:Y_OSC + 1, X_OSC:Y_OSC + 1] = torch.linalg.matrix_exp(eta * M).numpy()
            B[X_OSC:Y_OSC + 1, 1] = 2 * eta * A_sc[X_OSC:Y_OSC + 1, Y_OSC]
        self._mats[key] = (A_tr, A_sc, B)
        return self._mats[key]

    def _run_powers(self, eta: float, first: bool, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A_tr^L, A_sc^L, [A_sc^{L−1−j} B]_j) for a run of L equal updates."""
        key = (eta, first, L)
        if key not in self._powers:
            A_tr, A_sc, B = self._matrices(eta, first)
            kernels = np.empty((L, N_ROWS, 2))
            kernels[L - 1] = B
            P_sc = np.eye(N_ROWS)
            for j in range(L - 2, -1, -1):
                P_sc = A_sc @ P_sc
                kernels[j] = P_sc @ B
            self._powers[key] = (np.linalg.matrix_power(A_tr, L), A_sc @ P_sc, kernels)
            if len(self._powers) > 64:
                self._powers.pop(next(iter(self._powers)))
        return self._powers[key]

    # ------------------------------------------------------------ updates
    def step(self, eta: float, G, W=None) -> None:
        """Advance over one update: η_k, the gradient terms G_k (per group; 0 for translation) and,
        with momentum, W_{k+1} = V_{k+1} (scale/rescale) from the buffer v_{k+1}."""
        self.advance([eta], _np(G).reshape(1, -1), None if W is None else _np(W).reshape(1, -1))

    def advance(self, etas: Sequence[float], G, W=None) -> None:
        """Advance over ``len(etas)`` updates; ``G``/``W`` are (updates, groups) arrays or tensors."""
        if len(etas) == 0:
            return
        self._advance_forcing(etas, self._forcing(G, W))

    def advance_marked(self, etas: Sequence[float], G, W, at: Sequence[int]) -> np.ndarray:
        """Advance over ``len(etas)`` updates and return the predictions (len(at), variant, group)
        after the first ``at[i]`` of them (``at`` non-decreasing): one vectorised evaluation of
        every variant at all the marks, instead of one :meth:`predict_numpy` per mark."""
        L = len(etas)
        F = self._forcing(G, W) if L else None
        snaps, done = [], 0
        for a in at:
            if a > done:
                self._advance_forcing(etas[done:a], F[done:a])
                done = a
            snaps.append((self.s_tr.copy(), self.s_sc.copy(), dict(self.E)))
        if L > done:
            self._advance_forcing(etas[done:], F[done:])
        return self._predict_states(snaps)

    def _forcing(self, G, W) -> np.ndarray:
        G = _np(G)[:, self.sc]
        W = np.zeros_like(G) if W is None else _np(W)[:, self.sc]
        return np.stack([G, W], axis=1)  # (L, 2, n_sc)

    def _advance_forcing(self, etas: Sequence[float], F: np.ndarray) -> None:
        L = len(etas)
        start = 0
        while start < L:
            first = self.k == 0 and self.beta > 0
            stop = start + 1
            if not first:
                while stop < L and etas[stop] == etas[start]:
                    stop += 1
            self._apply_run(float(etas[start]), first, F[start:stop])
            start = stop

    def _apply_run(self, eta: float, first: bool, F: np.ndarray) -> None:
        L = F.shape[0]
        P_tr, P_sc, kernels = self._run_powers(eta, first, L)
        self.s_tr = P_tr @ self.s_tr
        forcing = kernels[0] @ F[0] if L == 1 else np.einsum("jrc,jcn->rn", kernels, F)
        self.s_sc = P_sc @ self.s_sc + forcing
        lam, beta = self.lam, self.beta
        self.E["gf"] += L * lam * eta / (1 - beta)
        self.E["paper"] += L * lam * eta
        self.E["hat"] += L * lam * (1 + eta * lam / 2) * eta
        if beta < 1:
            c = eta * (1 + beta) / (4 * (1 - beta) ** 2)
            self.E["mfo"] += L * lam * (1 + 2 * c * lam) / (1 - beta) * eta
        self.k += L

    # ------------------------------------------------------------ predictions
    def predict_numpy(self) -> np.ndarray:
        """(variant, group) predictions of Q at the current time (after ``k`` updates), float64."""
        out = np.empty((len(self.variants), self.n))
        q0 = self.q0
        for i, v in enumerate(self.variants):
            if v == "conservation":
                out[i] = q0
                continue
            if v in ("gradient_flow", "paper", "paper_hat", "momentum_first_order"):
                key = {"gradient_flow": "gf", "paper": "paper", "paper_hat": "hat", "momentum_first_order": "mfo"}[v]
                E = self.E[key]
                out[i, self.tr] = q0[self.tr] * math.exp(-E)
                out[i, self.sc] = q0[self.sc] * math.exp(-2 * E)
                row = {"paper": I_PAPER, "paper_hat": I_HAT, "momentum_first_order": I_MFO}.get(v)
                if row is not None:
                    out[i, self.sc] += self.s_sc[row]
                continue
            row = Q_EX if v == "exact_discrete" else X_OSC
            out[i, self.tr] = self.s_tr[row]
            out[i, self.sc] = self.s_sc[row]
            if v == "exact_discrete" and self.beta > 0 and self.nesterov:
                out[i] = math.nan
        return out

    def _predict_states(self, snaps: list) -> np.ndarray:
        """:meth:`predict_numpy` of several saved states (s_tr, s_sc, E) at once: (states, variant, group)."""
        M = len(snaps)
        out = np.empty((M, len(self.variants), self.n))
        if M == 0:
            return out
        s_tr = np.stack([a for a, _, _ in snaps])  # (M, rows, n_tr)
        s_sc = np.stack([b for _, b, _ in snaps])
        q0 = self.q0
        for i, v in enumerate(self.variants):
            if v == "conservation":
                out[:, i] = q0
                continue
            if v in ("gradient_flow", "paper", "paper_hat", "momentum_first_order"):
                key = {"gradient_flow": "gf", "paper": "paper", "paper_hat": "hat", "momentum_first_order": "mfo"}[v]
                E = np.array([e[key] for _, _, e in snaps])[:, None]
                out[:, i, self.tr] = q0[self.tr] * np.exp(-E)
                out[:, i, self.sc] = q0[self.sc] * np.exp(-2 * E)
                row = {"paper": I_PAPER, "paper_hat": I_HAT, "momentum_first_order": I_MFO}.get(v)
                if row is not None:
                    out[:, i, self.sc] += s_sc[:, row]
                continue
            row = Q_EX if v == "exact_discrete" else X_OSC
            out[:, i, self.tr] = s_tr[:, row]
            out[:, i, self.sc] = s_sc[:, row]
            if v == "exact_discrete" and self.beta > 0 and self.nesterov:
                out[:, i] = math.nan
        return out

    def predict(self) -> torch.Tensor:
        """(variant, group) predictions of Q at the current time, as a float64 tensor."""
        return torch.from_numpy(self.predict_numpy()).to(self.device)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
