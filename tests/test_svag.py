"""SVAG and the SGD modified loss (flowlab.stochastic.svag): SVAG's weights, its one-step law (exactly,
by enumerating every pair of batches, and by Monte Carlo on the ensemble path), l = 1 as SGD, SVAG
in a study at matched times, bad input; the SGD modified loss against IGR at B = N, against an
independent autograd gradient of L̃, against the epoch-averaged SGD iterate (the constant), and
its sampled estimator's mean."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_study
from torch import nn

import flowlab
from flowlab.data import Data
from flowlab.errors import ConfigError
from flowlab.flows import Hyper, TorchOps, make_flow
from flowlab.flows.library import ModifiedLoss
from flowlab.problem import Problem
from flowlab.stochastic.noise import NoiseSource
from flowlab.stochastic.sde import SamplingWarning
from flowlab.stochastic.svag import BUILTIN_EXTRA, SVAG, SGDModifiedLoss, batch_grad_hvp, svag_weights

# ------------------------------------------------------------------------------ helpers


class QuadOps:
    """Per-example quadratics ℓ_i = ½θᵀA_iθ − b_iᵀθ (g_i = A_iθ − b_i): exact batch gradients for one
    path (``batch_loss_grad``) and for K paths (``batch_grads``, the ensemble contract)."""

    def __init__(self, N=5, m=3, seed=0):
        g = torch.Generator().manual_seed(seed)
        M = torch.randn(N, m, m, generator=g, dtype=torch.float64)
        self.A = M @ M.transpose(1, 2) / m + 0.5 * torch.eye(m, dtype=torch.float64)
        self.b = torch.randn(N, m, generator=g, dtype=torch.float64)
        self.n = N
        self.counts = {"grad": 0}

    def per_example(self, theta):  # (N, m)
        return torch.einsum("nij,j->ni", self.A, theta) - self.b

    def grad(self, theta):
        return self.per_example(theta).mean(0)

    def loss_and_grad(self, theta):
        return None, self.grad(theta)

    def batch_loss_grad(self, theta, idx):
        self.counts["grad"] += 1
        return None, (torch.einsum("bij,j->bi", self.A[idx], theta) - self.b[idx]).mean(0)

    def batch_grads(self, thetas, idx):  # (K, m), (K, J, B) -> (K, J, m)
        self.counts["grad"] += idx.shape[0] * idx.shape[1]
        return (torch.einsum("kjbmn,kn->kjbm", self.A[idx], thetas) - self.b[idx]).mean(2)


class GivenBatches:
    """A noise source that hands out given batches (and checks the scheme asked for)."""

    def __init__(self, batches, scheme=None):
        self.batches, self.scheme = [torch.as_tensor(b) for b in batches], scheme

    def batch(self, n, size, scheme):
        assert self.scheme is None or scheme == self.scheme
        b = self.batches.pop(0)
        assert len(b) == size
        return b


def batches_of(N, B, scheme):
    """Every batch a scheme can draw, each equally likely."""
    if scheme == "with_replacement":
        return [list(t) for t in itertools.product(range(N), repeat=B)]
    return [list(c) for c in itertools.combinations(range(N), B)]


def sigma_B(ops, theta, B, scheme):
    """Σ_B = c·Σ₁/B from the per-example gradients (c = 1 with, (N−B)/(N−1) without replacement)."""
    g = ops.per_example(theta)
    d = g - g.mean(0)
    s1 = d.T @ d / ops.n
    c = 1.0 if scheme == "with_replacement" else (ops.n - B) / (ops.n - 1)
    return c * s1 / B


def tiny_problem(N=6, seed=0, lam_free=True):
    """A 3-5-2 tanh network with cross-entropy on N random points (float64); its θ layout is
    W1 (5×3), b1 (5), W2 (2×5), b2 (2)."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(seed + 1)
    X, y = torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (N,), generator=g)
    return Problem(module, F.cross_entropy, Data(X, y, 2), dtype=torch.float64, hvp="double_backward")


def manual_loss(theta, X, y):
    """The tiny network's mean cross-entropy written from θ's slices (independent of Problem)."""
    W1, b1 = theta[:15].view(5, 3), theta[15:20]
    W2, b2 = theta[20:30].view(2, 5), theta[30:32]
    return F.cross_entropy(torch.tanh(X @ W1.T + b1) @ W2.T + b2, y)


def field(flow, ops, theta, hp):
    return flow.vector_field(0.0, (theta,), ops, hp)[0]


# --------------------------------------------------------------------------------- SVAG


@pytest.mark.parametrize("ell", [1, 1.5, 2, 4, 16, 100.0])
def test_svag_weights(ell):
    r1, r2 = svag_weights(ell)
    assert r1 + r2 == pytest.approx(1.0, abs=1e-14)
    assert r1 * r1 + r2 * r2 == pytest.approx(ell, rel=1e-14)
    assert r1 == pytest.approx((1 + math.sqrt(2 * ell - 1)) / 2, rel=1e-15)
    if ell == 1:
        assert (r1, r2) == (1.0, 0.0)
    assert SVAG(l=ell).r1 == r1 and SVAG(l=ell).r2 == r2
    assert SVAG(l=ell).step_size(Hyper(0.3, batch_size=2)) == pytest.approx(0.3 / ell, rel=1e-15)


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan"), float("inf"), True, "4"])
def test_svag_l_below_one_is_refused_in_one_line(bad):
    with pytest.raises(ConfigError) as err:
        make_flow("svag", {"l": bad})
    msg = str(err.value)
    assert "\n" not in msg and err.value.field == "flows.l"
    assert "expected a number >= 1" in msg


def test_registry_entries():
    assert BUILTIN_EXTRA == {"svag": SVAG, "sgd_modified_loss": SGDModifiedLoss}
    assert isinstance(make_flow("svag", {"l": 4}), SVAG) and make_flow("svag").l == 4.0
    flow = make_flow("sgd_modified_loss")
    assert isinstance(flow, SGDModifiedLoss) and flow.options() == {"correction": "epoch", "samples": None, "seed": 0}
    svag = SVAG(l=3)
    assert svag.stochastic and svag.weak_order == 1 and svag.default_integrator == "flowlab:euler_maruyama"
    assert SVAG.takes_dt is False
    assert svag.law(Hyper(0.1, batch_size=4)) is None and svag.options() == {"l": 3.0, "sampling": None}


def test_svag_drift_is_minus_grad_l():
    ops, theta = QuadOps(), torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    hp = Hyper(0.1, weight_decay=0.2, batch_size=2)
    torch.testing.assert_close(field(SVAG(l=4), ops, theta, hp), -(ops.grad(theta) + 0.2 * theta), rtol=0, atol=0)


def test_svag_l1_is_the_sgd_update_on_given_batches():
    """l = 1: one batch per step and torch.optim.SGD's update θ − η(ĝ + λθ), bitwise."""
    p = tiny_problem(N=8)
    ops, hp = TorchOps(p), Hyper(0.3, weight_decay=0.05, batch_size=3, sampling="with_replacement")
    batches = [[0, 3, 3], [7, 1, 2], [5, 5, 6], [4, 0, 1]]
    flow, noise = SVAG(l=1), GivenBatches(batches, "with_replacement")
    theta = p.theta0.clone()
    for _ in batches:
        theta = flow.step(0.0, (theta,), ops, hp, 0.3, noise)[0]
    assert noise.batches == []  # one batch per step
    ref = tiny_problem(N=8)
    params = list(ref.module.parameters())
    opt = torch.optim.SGD(params, lr=0.3, weight_decay=0.05, foreach=False)
    for b in batches:
        opt.zero_grad()
        F.cross_entropy(ref.module(ref.X[b]), ref.y[b]).backward()
        opt.step()
    expected = torch.cat([q.detach().reshape(-1) for q in params])
    assert torch.equal(theta, expected)


def test_svag_step_uses_two_weighted_batches():
    """l = 4 on given batches: θ − (η/l)(r₁ĝ₁ + r₂ĝ₂ + λθ), the first batch with weight r₁."""
    ops, theta = QuadOps(N=6), torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64)
    hp = Hyper(0.2, weight_decay=0.1, batch_size=2, sampling="without_replacement")
    r1, r2 = svag_weights(4)
    out = SVAG(l=4).step(0.0, (theta,), ops, hp, 0.05, GivenBatches([[0, 1], [2, 5]], "without_replacement"))[0]
    g1, g2 = ops.batch_loss_grad(theta, [0, 1])[1], ops.batch_loss_grad(theta, [2, 5])[1]
    torch.testing.assert_close(out, theta - 0.05 * (r1 * g1 + r2 * g2 + 0.1 * theta), rtol=1e-15, atol=1e-15)
    swapped = theta - 0.05 * (r2 * g1 + r1 * g2 + 0.1 * theta)
    assert (out - swapped).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", ["with_replacement", "without_replacement"])
@pytest.mark.parametrize("ell", [1, 2, 4, 9.5])
def test_svag_one_step_law_exactly(scheme, ell):
    """Every pair of batches, each equally likely: one step has mean θ − h∇L_λ and covariance
    h²·l·Σ_B with h = η/l, i.e. per unit time drift −∇L_λ and covariance ηΣ_B for every l."""
    ops, theta = QuadOps(N=5), torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    eta, lam, B = 0.3, 0.05, 2
    hp, h = Hyper(eta, weight_decay=lam, batch_size=B, sampling=scheme), eta / ell
    flow, every = SVAG(l=ell), batches_of(5, B, scheme)
    pairs = [(a,) for a in every] if ell == 1 else list(itertools.product(every, every))
    noise = GivenBatches([b for pair in pairs for b in pair], scheme)
    steps = torch.stack([flow.step(0.0, (theta,), ops, hp, h, noise)[0] for _ in pairs])
    assert noise.batches == []
    mean = steps.mean(0)
    d = steps - mean
    cov = d.T @ d / len(pairs)
    torch.testing.assert_close((mean - theta) / h, -(ops.grad(theta) + lam * theta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov / h, eta * sigma_B(ops, theta, B, scheme), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("scheme", ["with_replacement", "without_replacement"])
def test_svag_one_step_law_monte_carlo_on_the_ensemble_path(scheme):
    """K paths at once (θ (K, m), ``ops.batch_grads``) with the real NoiseSource: the sample mean and
    covariance of one step agree with h∇L_λ and (η²/l)Σ_B within 5 standard errors (the two schemes'
    covariances differ by 25% here, about 35 standard errors)."""
    ops, theta = QuadOps(N=5), torch.tensor([0.7, -0.4, 1.3], dtype=torch.float64)
    K, eta, ell, B = 40_000, 0.3, 4, 2
    hp, h = Hyper(eta, batch_size=B, sampling=scheme), eta / ell
    out = SVAG(l=ell).step(0.0, (theta.expand(K, -1).clone(),), ops, hp, h, NoiseSource(7))[0]
    assert out.shape == (K, 3) and ops.counts["grad"] == 2 * K
    mean_exact = theta - h * ops.grad(theta)
    cov_exact = (eta * eta / ell) * sigma_B(ops, theta, B, scheme)
    mean = out.mean(0)
    se_mean = (cov_exact.diagonal() / K).sqrt()
    assert ((mean - mean_exact).abs() < 5 * se_mean).all()
    d = out - mean_exact
    prods = d[:, :, None] * d[:, None, :]
    cov = prods.mean(0)
    se_cov = prods.std(0) / math.sqrt(K)
    assert ((cov - cov_exact).abs() < 5 * se_cov).all()
    other = "without_replacement" if scheme == "with_replacement" else "with_replacement"
    cov_other = (eta * eta / ell) * sigma_B(ops, theta, B, other)
    assert ((cov - cov_other).abs() > 5 * se_cov).any()


def test_svag_ensemble_path_is_k_single_paths():
    """θ (K, m) draws its K·2 batches path by path, as K single paths sharing one generator do."""
    ops, K = QuadOps(N=7), 5
    thetas = torch.randn(K, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hp, flow = Hyper(0.2, weight_decay=0.1, batch_size=3, sampling="without_replacement"), SVAG(l=4)
    batched = flow.step(0.0, (thetas,), ops, hp, 0.05, NoiseSource(11))[0]
    noise = NoiseSource(11)
    single = torch.stack([flow.step(0.0, (t,), ops, hp, 0.05, noise)[0] for t in thetas])
    torch.testing.assert_close(batched, single, rtol=1e-14, atol=1e-14)


def test_svag_refuses_a_step_that_is_not_eta_over_l():
    ops, theta, hp = QuadOps(), torch.zeros(3, dtype=torch.float64), Hyper(0.1, batch_size=2)
    flow = SVAG(l=4)
    flow.step(0.0, (theta,), ops, hp, 0.025 * (1 + 1e-9), NoiseSource(0))  # round-off is fine
    with pytest.raises(ConfigError, match=r"^flows.dt = 0.05: svag steps by η/l = 0.025"):
        flow.step(0.0, (theta,), ops, hp, 0.05, NoiseSource(0))
    integ = flowlab.flows.make_integrator("flowlab:euler_maruyama", dt=0.05)
    with pytest.raises(ConfigError, match=r"^flows.0.dt = 0.05: svag steps by η/l = 0.025: leave dt unset$"):
        flow.check_integrator(integ, hp, "flows.0")
    flow.check_integrator(flowlab.flows.make_integrator("flowlab:euler_maruyama"), hp, "flows.0")
    flow.check_integrator(flowlab.flows.make_integrator("flowlab:euler_maruyama", dt=0.025), hp, "flows.0")


# ----------------------------------------------------------------------- SVAG in a study


def _run(tmp_path, raw, name="out"):
    return flowlab.run(flowlab.parse_study(raw), tmp_path / name).load()


@pytest.mark.parametrize("scheme", ["with_replacement", "without_replacement"])
def test_svag_l1_in_a_study_is_the_studys_sgd(tmp_path, scheme):
    """With l = 1 and the path seeded with the study's seed, SVAG draws SGD's very batches (the same
    generator calls) and makes SGD's update: the recorded θ equal SGD's bitwise."""
    raw = small_study(optimizer={"steps": 6, "weight_decay": 0.01, "sampling": scheme},
                      record={"every": 2, "snapshot_every": 1},
                      flows=[{"name": "svag", "l": 1, "label": "svag1", "integrator_options": {"seed": 0}}])
    ds = _run(tmp_path, raw)
    assert list(ds.status.values) == ["ok", "ok"]
    th = ds.theta.sel(dynamics="svag1").values
    assert np.array_equal(th, ds.theta.sel(dynamics="sgd").values)
    assert np.abs(th[-1] - th[0]).max() > 1e-3


def test_svag_in_a_study_at_matched_times(tmp_path):
    raw = small_study(optimizer={"steps": 6, "sampling": "with_replacement"}, record={"every": 2},
                      flows=[{"name": "svag", "l": 4}])
    ds = _run(tmp_path, raw)
    label = "svag@flowlab:euler_maruyama"
    assert list(ds.dynamics.values) == ["sgd", label] and list(ds.status.values) == ["ok", "ok"]
    np.testing.assert_allclose(ds.time.values, 0.1 * np.arange(0, 7, 2), rtol=1e-12)
    np.testing.assert_allclose(ds.flow_time.sel(dynamics=label).values, ds.time.values, rtol=1e-12)
    np.testing.assert_array_equal(ds.nfe.sel(dynamics=label).values, 4 * ds.step.values)  # l steps per SGD step
    seeds = __import__("json").loads(ds.attrs["seeds"])
    assert label in seeds and seeds[label] != seeds["study"]
    th = ds.theta.sel(dynamics=label).values
    assert np.isfinite(th).all() and np.abs(th[-1] - ds.theta.sel(dynamics="sgd").values[-1]).max() > 1e-6


def test_svag_full_batch_study_is_refused_in_one_line(tmp_path):
    raw = small_study(optimizer={"steps": 2, "batch_size": "full"}, flows=[{"name": "svag"}])
    with pytest.raises(ConfigError) as err:
        _run(tmp_path, raw)
    assert err.value.field == "flows.0.name" and "\n" not in str(err.value)
    assert "needs optimizer.batch_size" in str(err.value)


def test_svag_given_dt_is_refused(tmp_path):
    raw = small_study(optimizer={"steps": 2, "sampling": "with_replacement"},
                      flows=[{"name": "svag", "l": 4, "dt": 0.05}])
    with pytest.raises(ConfigError, match=r"^flows.0.dt = 0.05: svag steps by η/l = 0.025"):
        _run(tmp_path, raw, "a")
    raw["flows"][0]["dt"] = 0.025  # η/l itself is accepted
    assert list(_run(tmp_path, raw, "b").status.values) == ["ok", "ok"]


def test_svag_reshuffled_study_warns(tmp_path):
    raw = small_study(optimizer={"steps": 2}, flows=[{"name": "svag", "l": 2}])
    with pytest.warns(SamplingWarning, match="reshuffles"):
        ds = _run(tmp_path, raw)
    assert list(ds.status.values) == ["ok", "ok"]


# ------------------------------------------------------------------ the SGD modified loss


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_sgd_modified_loss_at_full_batch_is_igr(lam):
    """B = N (one batch, a permutation of the data, through the batch HVP) and a full-batch study
    (B = None) both give modified_loss's field (correction hvp) to round-off."""
    p = tiny_problem(N=6)
    ops = TorchOps(p)
    igr = ModifiedLoss(correction="hvp")
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        theta = p.theta0 + 0.3 * torch.randn(p.dim, generator=g, dtype=torch.float64)
        want = field(igr, ops, theta, Hyper(0.2, weight_decay=lam))
        for B in (6, None):
            got = field(SGDModifiedLoss(), ops, theta, Hyper(0.2, weight_decay=lam, batch_size=B))
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    part = SGDModifiedLoss().partition(6, 6)
    assert part.shape == (1, 6) and sorted(part[0].tolist()) == list(range(6))


@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_sgd_modified_loss_field_is_the_gradient_of_the_modified_loss(lam):
    """−field = ∇L̃ with L̃ = L_λ + (η/4m)Σ_k|∇L̂_{k,λ}|² over the flow's partition, differentiated by
    torch.func from the network written out by hand (no Problem, no graph reuse)."""
    N, B, eta = 9, 3, 0.4
    p = tiny_problem(N=N)
    ops, flow = TorchOps(p), SGDModifiedLoss(seed=3)
    part = flow.partition(N, B)
    assert part.shape == (3, 3) and sorted(part.reshape(-1).tolist()) == list(range(N))
    X, y = p.X, p.y

    def batch_l(theta, idx):
        return manual_loss(theta, X[idx], y[idx]) + 0.5 * lam * theta.dot(theta)

    def modified(theta):
        base = manual_loss(theta, X, y) + 0.5 * lam * theta.dot(theta)
        gs = [torch.func.grad(batch_l)(theta, idx) for idx in part]
        return base + eta / (4 * len(gs)) * sum(gk.dot(gk) for gk in gs)

    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        theta = p.theta0 + 0.5 * torch.randn(p.dim, generator=g, dtype=torch.float64)
        want = -torch.func.grad(modified)(theta)
        got = field(flow, ops, theta, Hyper(eta, weight_decay=lam, batch_size=B))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
        gl = -torch.func.grad(lambda th: manual_loss(th, X, y) + 0.5 * lam * th.dot(th))(theta)
        assert (got - gl).norm() > 1e-3 * gl.norm()  # the correction is not negligible here
    assert ops.counts["grad"] >= 3 * (1 + 3) and ops.counts["hvp"] >= 3 * 3


def test_sgd_modified_loss_constant_against_epoch_averaged_sgd():
    """One epoch of SGD (weight decay coupled) from θ0, averaged over all m! orders of the flow's
    partition, against the flow over time mη (RK4, negligible error): the gap falls as η³ with
    Smith et al.'s constant η/4m, and only as η² with IGR's correction alone."""
    N, B, lam = 6, 2, 0.05
    p = tiny_problem(N=N)
    ops, theta0 = TorchOps(p), p.theta0.clone()

    def epoch_mean(part, eta):
        ends = []
        for order in itertools.permutations(range(len(part))):
            th = theta0.clone()
            for k in order:
                th = th - eta * (p.grad(th, p.batch(part[k])) + lam * th)
            ends.append(th)
        return torch.stack(ends).mean(0)

    def rk4(flow, hp, T, n=12):
        h, y = T / n, theta0.clone()
        f = lambda z: field(flow, ops, z, hp)  # noqa: E731
        for _ in range(n):
            k1 = f(y)
            k2 = f(y + 0.5 * h * k1)
            k3 = f(y + 0.5 * h * k2)
            k4 = f(y + h * k3)
            y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        return y

    smith = SGDModifiedLoss()
    part = smith.partition(N, B)
    ratios = {}
    for name, flow in (("smith", smith), ("igr", ModifiedLoss())):
        errs = []
        for eta in (0.1, 0.05):
            hp = Hyper(eta, weight_decay=lam, batch_size=B)
            errs.append(float((epoch_mean(part, eta) - rk4(flow, hp, len(part) * eta)).norm()))
        ratios[name] = errs[0] / errs[1]
    assert ratios["smith"] > 6.5  # η³: 8
    assert ratios["igr"] < 5.0  # η²: 4


def test_sgd_modified_loss_sampled_is_unbiased():
    """The sampled correction averaged over many evaluations matches the exact shuffle average
    E_S[H_{S,λ}∇L̂_{S,λ}] over all B-subsets S (within 5 standard errors), and differs per call."""
    N, B, eta, lam, K, reps = 6, 2, 0.4, 0.05, 4, 300
    p = tiny_problem(N=N)
    ops = TorchOps(p)
    hp = Hyper(eta, weight_decay=lam, batch_size=B)
    theta = p.theta0.clone()
    G = ops.grad(theta) + lam * theta
    subsets = [torch.tensor(c) for c in itertools.combinations(range(N), B)]
    exact = torch.stack([batch_grad_hvp(p, theta, s, lam)[1] for s in subsets]).mean(0)
    flow = SGDModifiedLoss(correction="sampled", samples=K, seed=1)
    corr = torch.stack([(-field(flow, ops, theta, hp) - G) / (0.5 * eta) for _ in range(reps)])
    assert (corr[0] - corr[1]).abs().max() > 1e-6  # a random field
    se = corr.std(0) / math.sqrt(reps)
    assert ((corr.mean(0) - exact).abs() < 5 * se + 1e-12).all()
    # the fixed-partition correction is not the shuffle average: a bias the test above would see
    fixed = (-field(SGDModifiedLoss(), ops, theta, hp) - G) / (0.5 * eta)
    assert ((fixed - exact).abs() > 5 * se).any()


def test_batch_grad_hvp_against_torch_func():
    p = tiny_problem(N=6)
    theta, idx, lam = p.theta0 + 0.1, torch.tensor([4, 0, 2]), 0.3

    def f(th):
        return manual_loss(th, p.X[idx], p.y[idx]) + 0.5 * lam * th.dot(th)

    v, hv = batch_grad_hvp(p, theta, idx, lam)
    torch.testing.assert_close(v, torch.func.grad(f)(theta), rtol=1e-13, atol=1e-14)
    _, want = torch.func.jvp(torch.func.grad(f), (theta,), (v,))
    torch.testing.assert_close(hv, want, rtol=1e-12, atol=1e-13)


def test_sgd_modified_loss_bad_options_in_one_line():
    cases = [({"correction": "exact"}, "flows.correction", "allowed: epoch, sampled"),
             ({"samples": 4}, "flows.samples", "only with correction"),
             ({"correction": "sampled", "samples": 0}, "flows.samples", "integer >= 1"),
             ({"seed": -1}, "flows.seed", "integer >= 0")]
    for options, fieldname, text in cases:
        with pytest.raises(ConfigError) as err:
            make_flow("sgd_modified_loss", options)
        assert err.value.field == fieldname and text in str(err.value) and "\n" not in str(err.value)
    assert make_flow("sgd_modified_loss", {"correction": "sampled"}).samples == 8


def test_sgd_modified_loss_in_a_study(tmp_path):
    """Reshuffled minibatches (the scheme it models): integrated by dopri5 alongside SGD, recorded at
    the matched times; the batch-variance term moves it away from IGR's path."""
    raw = small_study(data={"n": 60}, model={"widths": [6]}, optimizer={"steps": 4, "batch_size": 20},
                      flows=[{"name": "sgd_modified_loss", "label": "smith", "rtol": 1e-9},
                             {"name": "modified_loss", "label": "igr", "rtol": 1e-9}])
    ds = _run(tmp_path, raw)
    assert list(ds.status.values) == ["ok", "ok", "ok"]
    np.testing.assert_allclose(ds.flow_time.sel(dynamics="smith").values, ds.time.values, rtol=1e-12)
    a, b = ds.theta.sel(dynamics="smith").values, ds.theta.sel(dynamics="igr").values
    assert np.abs(a[-1] - b[-1]).max() > 1e-8 and np.abs(a[-1] - b[-1]).max() < 1e-2


def test_sgd_modified_loss_warns_on_iid_sampling():
    p = tiny_problem(N=6)
    flow = SGDModifiedLoss()
    with pytest.warns(SamplingWarning, match="random reshuffling"):
        field(flow, TorchOps(p), p.theta0, Hyper(0.1, batch_size=2, sampling="with_replacement"))
