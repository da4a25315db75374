"""The theory's recursions against exact vector processes, closed forms and limits (float64)."""

import math

import numpy as np
import pytest
import torch

from flowlab.theory import Predictor

KINDS = ["scale", "translation", "rescale"]


class Toy:
    """Three groups with their symmetry's gradient constraint built in: a scale group u ∈ R⁵
    (ĝ ⟂ u), a translation group w ∈ R⁴ (⟨ĝ, 1⟩ = 0) and a rescale pair (a ∈ R³, b ∈ R²) with
    ⟨ĝ_a, a⟩ = ⟨ĝ_b, b⟩ — trained by PyTorch-style SGD with coupled weight decay and heavy ball."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.theta = self.rng.normal(size=14)
        self.buf = None

    def split(self, x):
        return x[:5], x[5:9], x[9:12], x[12:14]

    def quantities(self, x):
        u, w, a, b = self.split(x)
        return np.array([u @ u, w.sum(), a @ a - b @ b])

    def grad(self):
        g = self.rng.normal(size=14)
        u, w, a, b = self.split(self.theta)
        gu, gw, ga, gb = self.split(g)
        gu -= (gu @ u) / (u @ u) * u
        gw -= gw.mean()
        n = np.concatenate([a, -b])  # make ⟨g_a, a⟩ − ⟨g_b, b⟩ = 0
        gab = np.concatenate([ga, gb])
        gab -= (gab @ n) / (n @ n) * n
        return np.concatenate([gu, gw, gab[:3], gab[3:]])

    def terms(self, x):
        u, w, a, b = self.split(x)
        return np.array([u @ u, 0.0, a @ a - b @ b])

    def step(self, lr, wd, beta=0.0, damp=0.0):
        g = self.grad()
        G = self.terms(g)
        d = g + wd * self.theta
        if beta > 0:
            self.buf = d.copy() if self.buf is None else beta * self.buf + (1 - damp) * d
            d = self.buf
        self.theta = self.theta - lr * d
        W = self.terms(self.buf) if self.buf is not None else None
        if W is not None:
            W[1] = 0.0
        return G, W


@pytest.mark.parametrize("beta, damp", [(0.0, 0.0), (0.9, 0.0), (0.6, 0.25)])
def test_exact_discrete_matches_the_vector_process(beta, damp):
    toy = Toy(1)
    lam = 3e-2
    pred = Predictor(KINDS, torch.tensor(toy.quantities(toy.theta)), lam, beta, damp)
    idx = pred.variants.index("exact_discrete")
    worst = 0.0
    for k in range(400):
        lr = 0.1 * (0.5 if k >= 200 else 1.0)  # a step schedule: t = Σ η_k
        G, W = toy.step(lr, lam, beta, damp)
        pred.step(lr, torch.tensor(G), None if W is None else torch.tensor(W))
        q = toy.quantities(toy.theta)
        p = pred.predict()[idx].numpy()
        worst = max(worst, np.max(np.abs(p - q) / np.maximum(np.abs(q), 1.0)))
    assert worst <= 1e-12, worst


def test_runs_equal_single_steps():
    """``advance`` over runs of equal η (matrix powers) equals one ``step`` at a time."""
    rng = np.random.default_rng(2)
    etas = [0.1] * 37 + [0.05] * 20 + [0.07]
    G = torch.tensor(rng.random((len(etas), 3)))
    W = torch.tensor(rng.random((len(etas), 3)))
    a = Predictor(KINDS, torch.tensor([2.0, 0.5, -1.0]), 1e-2, 0.8, 0.1)
    b = Predictor(KINDS, torch.tensor([2.0, 0.5, -1.0]), 1e-2, 0.8, 0.1)
    a.advance(etas, G, W)
    for k, eta in enumerate(etas):
        b.step(eta, G[k], W[k])
    torch.testing.assert_close(a.predict(), b.predict(), rtol=1e-13, atol=1e-15)


def _gap(eta, variant, G, T=20.0, lam=0.02):
    steps = round(T / eta)
    pred = Predictor(["scale"], torch.tensor([1.0]), lam)
    pred.advance([eta] * steps, torch.full((steps, 1), G))
    p = pred.predict()
    return abs(p[pred.variants.index(variant), 0].item() - p[pred.variants.index("exact_discrete"), 0].item())


@pytest.mark.parametrize("variant, G, order", [("paper", 0.0, 1), ("paper_hat", 0.0, 2), ("paper_hat", 0.3, 2)])
def test_continuous_theory_converges_to_the_discrete_one(variant, G, order):
    """The continuous predictions differ from the exact discrete recursion by the theory's own
    discretisation error: e^{−2λt} vs (1−ηλ)^{2k} is O(ηλ); λ̂ = λ(1+ηλ/2) removes that term, so
    paper_hat is O(η²) (with the left-endpoint Riemann sum of the forcing, also O(η²))."""
    errs = [_gap(eta, variant, G) for eta in (0.2, 0.1, 0.05)]
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(s - order) < 0.1 for s in slopes), (errs, slopes)


def test_paper_hat_is_closer_than_paper_without_forcing():
    pred = Predictor(["scale"], torch.tensor([1.0]), 0.05)
    pred.advance([0.2] * 100, torch.zeros(100, 1))
    p = pred.predict()[:, 0]
    exact = p[pred.variants.index("exact_discrete")]
    assert abs(p[pred.variants.index("paper_hat")] - exact) < 0.05 * abs(p[pred.variants.index("paper")] - exact)


@pytest.mark.parametrize("beta, lam, eta", [(0.9, 5e-2, 0.01), (0.9, 0.0475, 0.1), (0.5, 1e-3, 0.1)])
def test_oscillator_propagator_matches_closed_forms(beta, lam, eta):
    """C(t) and G(s) of docs/theory.md#oscillator-regimes (under-, critically, over-damped) from the recursion."""
    gamma = (1 - beta) / (eta * (1 + beta))
    omega2 = 4 * lam / (eta * (1 + beta))
    steps = 300
    pred = Predictor(["scale"], torch.tensor([1.0]), lam, beta)
    pred.advance([eta] * steps, torch.zeros(steps, 1), torch.zeros(steps, 1))
    t = steps * eta
    C = pred.predict()[pred.variants.index("oscillator"), 0].item()
    disc = gamma * gamma - omega2
    if disc < -1e-9:
        Om = math.sqrt(-disc)
        C_exact = math.exp(-gamma * t) * (math.cos(Om * t) + gamma / Om * math.sin(Om * t))
        G_exact = lambda s: math.exp(-gamma * s) * math.sin(Om * s) / Om  # noqa: E731
    elif disc > 1e-9:
        ap, am = -gamma + math.sqrt(disc), -gamma - math.sqrt(disc)
        C_exact = (ap * math.exp(am * t) - am * math.exp(ap * t)) / (ap - am)
        G_exact = lambda s: (math.exp(ap * s) - math.exp(am * s)) / (ap - am)  # noqa: E731
    else:
        C_exact = math.exp(-gamma * t) * (1 + gamma * t)
        G_exact = lambda s: s * math.exp(-gamma * s)  # noqa: E731
    assert abs(C - C_exact) <= 1e-12 * max(1.0, abs(C_exact)) + 1e-14
    # a single impulse 2·W·η at t = 0 is G(t)·2Wη later (x(0) = 0 here)
    pulse = Predictor(["scale"], torch.tensor([0.0]), lam, beta)
    W = torch.zeros(steps, 1)
    W[0] = 1.0
    pulse.advance([eta] * steps, torch.zeros(steps, 1), W)
    x = pulse.predict()[pulse.variants.index("oscillator"), 0].item()
    assert abs(x - 2 * eta * G_exact(t)) <= 1e-12 * max(1.0, abs(2 * eta * G_exact(t))) + 1e-15


class SmoothToy:
    """Heavy ball (PyTorch arithmetic, coupled λ) on a smooth, autonomous gradient field with the
    three symmetries: ĝ = ∇L of L = ½ nᵀKn (n = u/|u|: scale), ½|Pw − Pc|² (P = I − 11ᵀ/4:
    translation) and ½|abᵀ − M|² (rescale).  The constraints hold identically in θ, so the
    projected laws of docs/theory.md#derivation-of-the-laws hold along the modified flow, and
    heavy ball follows that flow (Ghosh et al. 2023) — unlike :class:`Toy`'s random gradients."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.theta = rng.normal(size=14)
        self.theta[9:] *= 0.6  # |a|², |b|² ~ 1: the rescale Hessian stays ~2, η·2/(1−β) ≪ 1
        K = rng.normal(size=(5, 5))
        self.K, self.c, self.M = K + K.T, rng.normal(size=4), 0.3 * rng.normal(size=(3, 2))
        self.buf = None

    split, quantities, terms = Toy.split, Toy.quantities, Toy.terms

    def grad(self):
        u, w, a, b = self.split(self.theta)
        n = u / np.linalg.norm(u)
        gu = (self.K @ n - (n @ self.K @ n) * n) / np.linalg.norm(u)
        gw = (w - w.mean()) - (self.c - self.c.mean())
        R = np.outer(a, b) - self.M
        return np.concatenate([gu, gw, R @ b, R.T @ a])

    def step(self, lr, wd, beta):
        g = self.grad()
        d = g + wd * self.theta
        self.buf = d.copy() if self.buf is None else beta * self.buf + d
        self.theta = self.theta - lr * self.buf
        W = self.terms(self.buf)
        W[1] = 0.0
        return self.terms(g), W


def test_continuous_momentum_predictions_approach_the_discrete_run():
    """With momentum, the oscillator and the first-order momentum law part from the exact discrete
    recursion at first order in η, with a leading coefficient derived here (λ' = λ/(1−β), fixed T).

    Heavy ball lags its modified flow by s = ηβ/(1−β) (docs/theory.md#start-up-and-time-shift):
    Q_exact(t) = Q_flow(t − s) + O(η²), and Q_flow obeys the momentum_modified law, whose forcing
    gain is O(η).  ``momentum_first_order`` is that law started at t = 0 (no shift), so
    mfo − exact = −s·2λ'Q(0)e^{−2λ'T} + O(η²) (translation: −s·λ'S(0)e^{−λ'T}).  The oscillator
    (x(0) = Q(0), x'(0) = 0) relaxes onto the same law within O(η) time, but its slow part starts at
    Q(0)(1 + 2λ'/(2γ)), as if it lagged by η(1+β)/(2(1−β)); so osc − exact = η·λ'Q(0)e^{−2λ'T} + O(η²)
    (translation, ω²/2: η·λ'S(0)e^{−λ'T}/2).  So gap(η) = Cη + Dη²: the gap is first order, and
    r(η) = gap/(Cη) − 1 = (D/C)η, whose Richardson remainder 2r(η) − r(2η) is O(η²).  A wrong gain,
    rate or forcing changes C and leaves a constant remainder instead."""
    lam, beta, T = 0.05, 0.5, 4.0
    lp = lam / (1 - beta)
    etas = (0.01, 0.005, 0.0025)
    ratio, gap = {}, {}
    for eta in etas:
        toy = SmoothToy(3)
        q0 = toy.quantities(toy.theta)
        pred = Predictor(KINDS, torch.tensor(q0), lam, beta)
        for _ in range(round(T / eta)):
            G, W = toy.step(eta, lam, beta)
            pred.step(eta, torch.tensor(G), torch.tensor(W))
        p = pred.predict().numpy()
        exact = p[pred.variants.index("exact_discrete")]
        q = toy.quantities(toy.theta)  # the recursion is exact: its own test bounds it by 1e-12
        assert np.all(np.abs(exact - q) <= 1e-12 * np.maximum(np.abs(q), 1.0))
        decay = np.exp(-np.array([2, 1, 2]) * lp * T)  # KINDS: scale, translation, rescale
        C = {"momentum_first_order": -np.array([2, 1, 2]) * lp * beta / (1 - beta) * q0 * decay,
             "oscillator": np.array([1, 0.5, 1]) * lp * q0 * decay}
        for v, c in C.items():
            gap[v, eta] = p[pred.variants.index(v)] - exact
            ratio[v, eta] = gap[v, eta] / (c * eta) - 1
    for v in C:
        # first order: log2(gap(2η)/gap(η)) = 1 + log2((1 + 2kη)/(1 + kη)), ≤ 0.1 off while |kη| ≲ 0.07
        slope = np.log2(gap[v, etas[1]] / gap[v, etas[2]])
        assert np.all(np.abs(slope - 1) < 0.1), (v, slope)
        # the leading coefficient is C: the Richardson remainder falls at second order
        rem = [2 * ratio[v, etas[i + 1]] - ratio[v, etas[i]] for i in range(2)]
        order = np.log2(np.abs(rem[0] / rem[1]))
        assert np.all(np.abs(order - 2) < 0.2), (v, rem, order)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_million_steps_stay_finite_and_right(dtype):
    """10⁶ updates (η = 0.1, λ = 5e-4): decaying state only, no overflow, no silent NaN; constant
    forcing has closed forms for the paper integral and the exact recursion."""
    K, eta, lam, Gv = 1_000_000, 0.1, 5e-4, 0.7
    pred = Predictor(["scale", "translation", "rescale"], torch.tensor([2.0, 1.5, -0.5]), lam)
    chunk = 10_000
    G = torch.full((chunk, 3), Gv, dtype=dtype)
    for _ in range(K // chunk):
        pred.advance([eta] * chunk, G)
    p = pred.predict()
    assert torch.isfinite(p).all()
    a = math.exp(-2 * lam * eta)
    paper = 2.0 * a**K + eta * eta * Gv * a * (1 - a**K) / (1 - a)
    A = (1 - eta * lam) ** 2
    exact = 2.0 * A**K + eta * eta * Gv * (1 - A**K) / (1 - A)
    tol = 1e-9 if dtype == torch.float64 else 1e-6  # float32 input G carries its own rounding
    assert abs(p[pred.variants.index("paper"), 0].item() - paper) / paper < tol
    assert abs(p[pred.variants.index("exact_discrete"), 0].item() - exact) / exact < tol
    assert abs(p[pred.variants.index("exact_discrete"), 1].item() - 1.5 * (1 - eta * lam) ** K) < 1e-12
