"""Stochastic flows on diffrax (``diffrax:Euler`` on ``sme``, ``sme2``, ``sme_momentum``): the JAX
per-example weighted gradient, path agreement with ``flowlab:euler_maruyama`` given the same Brownian
increments, K paths by ``jax.vmap``, and what is refused.

Float64.  Path agreement: the torch path records its increments (``NoiseSource.drawn``) and the
diffrax path replays them (``NoiseSource(replay=...)`` → :class:`flowlab.jaxbackend.sde.IncrementPath`);
the same Euler–Maruyama steps on the same grid then differ only by round-off (the twin and torch
agree to a few eps per evaluation; a handful of steps of a contracting map): bound 1e-12 relative
(max |θ_torch − θ_jax| / max |θ_torch| over the recording times), measured ~1e-16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowlab import Run, losses, models, parse_study
from flowlab.data import Data
from flowlab.errors import ConfigError
from flowlab.problem import Problem

torch.set_num_threads(1)
jax = pytest.importorskip("jax")
pytest.importorskip("diffrax")
from test_jax_twin import CASES, build_case, random_theta  # noqa: E402

from flowlab.flows import Hyper, make_flow, make_integrator  # noqa: E402
from flowlab.jaxbackend import JaxProblem, sde  # noqa: E402
from flowlab.stochastic.noise import NoiseSource, weighted_loss_grad  # noqa: E402

BOUND = 1e-12
HP = Hyper(lr=0.1, weight_decay=1e-3, momentum=0.5, batch_size=8, sampling="with_replacement")
TIMES = [0.2, 0.4, 0.6]  # two steps of η = 0.1 per interval


def rel_max(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def paths(p: Problem, name: str, hp: Hyper = HP, times=TIMES, fuse: bool = True, seed: int = 0, replay=None):
    """(torch path, diffrax path fed the torch path's increments, torch session, diffrax session)."""
    flow = make_flow(name)
    em = make_integrator("flowlab:euler_maruyama")
    em.noise = NoiseSource(seed)
    em.noise.drawn = []
    a, sa = em.trajectory(flow, p, hp, times)
    dx = make_integrator("diffrax:Euler", options={"fuse": fuse})
    dx.noise = NoiseSource(seed, replay=em.noise.drawn if replay is None else replay(em.noise.drawn))
    b, sb = dx.trajectory(flow, p, hp, times)
    assert dx.noise.replay == []  # every increment was used, one per step
    return a, b, sa, sb


# the zoo of test_jax_twin without BatchNorm (per-example noise is not defined with it)
ZOO = [name for name in sorted(CASES) if "_bn" not in name] + ["vgg16_narrow_plain"]
FAST = {"quadratic_3d", "linear_nobias_mse", "mlp_tanh", "cnn_avg_plain"}


def zoo_problem(name: str) -> Problem:
    if name == "vgg16_narrow_plain":  # as test_jax_twin.test_vgg16_twins: 6 images of 3×32×32, chunks of 4
        torch.manual_seed(0)
        module = models.vgg16_narrow(batchnorm=False, num_outputs=3)
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 3, (6,), generator=g)
        p = Problem(module.double(), losses.cross_entropy, Data(X, y, 3), dtype=torch.float64, chunk_size=4)
    else:
        p = build_case(name, n=32)
    assert not p.has_batchnorm
    return p


# ------------------------------------------------------------------ the weighted gradient


@pytest.mark.parametrize("name,chunk", [("quadratic_fig4", None), ("linear_nobias_mse", 12), ("mlp_tanh", None),
                                        ("mlp_tanh", 12)])
def test_weighted_gradient_matches_torch(name, chunk):
    """JaxOps.weighted_loss_grad = (L, ∇Σ_i w_i ℓ_i) as flowlab.stochastic.noise's (chunked: 12 + 12 + 8)."""
    p = build_case(name, chunk_size=chunk, n=32)
    theta, _ = random_theta(p, 0)
    w = torch.randn(p.n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss, g = weighted_loss_grad(p, theta, w)
    jp = JaxProblem(p)
    assert jp.ops.n == p.n
    lj, gj = jp.ops.weighted_loss_grad(jp.theta(theta), jp.theta(w))
    assert rel_max(lj, loss) <= 1e-14 and rel_max(gj, g) <= 1e-14
    # torch tensors in, torch tensors out (as the other JaxOps methods)
    lt, gt = jp.ops.weighted_loss_grad(theta, w)
    assert isinstance(gt, torch.Tensor) and rel_max(gt, g) <= 1e-14
    # w = 1/N: the full-batch gradient
    _, g_mean = jp.ops.weighted_loss_grad(jp.theta(theta), jp.theta(torch.full((p.n,), 1.0 / p.n, dtype=torch.float64)))
    assert rel_max(g_mean, p.full_loss_and_grad(theta)[1]) <= 1e-14


# ------------------------------------------------------------------ path agreement


@pytest.mark.parametrize("model", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in ZOO])
def test_sme_path_agrees_with_torch_given_the_same_increments(model):
    p = zoo_problem(model)
    a, b, sa, sb = paths(p, "sme")
    assert sb.steps == sa.steps == 6 and sb.kernel.fused
    err = rel_max(b, a)
    print(f"{model}: {err:.2e}")
    assert err <= BOUND, (model, err)


def test_unfused_multiterm_agrees_and_the_metric_sees_wrong_increments():
    """fuse = false: drift by ODETerm, noise by ControlTerm with the lineax operator built from
    SME.diffusion; control: the same increments in another order move θ far beyond the bound."""
    p = zoo_problem("mlp_tanh")
    a, b, _, sb = paths(p, "sme", fuse=False)
    assert not sb.kernel.fused
    assert rel_max(b, a) <= BOUND
    _, c, _, _ = paths(p, "sme", replay=lambda drawn: drawn[::-1])
    assert rel_max(c, a) > 1e6 * BOUND


@pytest.mark.parametrize("name", ["sme2", "sme_momentum"])
def test_sme2_and_heavy_ball_sde_agree_with_torch(name):
    p = zoo_problem("mlp_tanh")
    a, b, _, _ = paths(p, name)
    assert rel_max(b, a) <= BOUND


def test_sme_with_a_schedule_of_uneven_intervals():
    """Intervals of 1, 2 and 3 steps and a dt that does not divide them (⌈Δt/dt⌉ equal steps each)."""
    p = zoo_problem("linear_nobias_mse")
    flow, times, dt = make_flow("sme"), [0.1, 0.3, 0.65], 0.1
    em = make_integrator("flowlab:euler_maruyama", dt=dt)
    em.noise = NoiseSource(4)
    em.noise.drawn = []
    a, sa = em.trajectory(flow, p, HP, times)
    dx = make_integrator("diffrax:Euler", dt=dt)
    dx.noise = NoiseSource(4, replay=em.noise.drawn)
    b, sb = dx.trajectory(flow, p, HP, times)
    assert sa.steps == sb.steps == 1 + 2 + 4
    assert rel_max(b, a) <= BOUND


# ------------------------------------------------------------------ diffrax's Brownian motion, K paths


def test_sample_paths_are_sessions_and_have_the_sde_covariance():
    """On the quadratic ½(θ−x)ᵀA(θ−x): one step from θ0 has covariance h·η c/(B N)·A S A
    (S = Σ_i (x_i − x̄)(x_i − x̄)ᵀ); 4000 vmapped paths estimate it within 10% (sampling error
    ~√(2/K) = 2%).  A sampled path with a session's key is that session's path."""
    p = build_case("quadratic_fig4", n=32)
    flow = make_flow("sme")
    hp = Hyper(lr=0.1, batch_size=8, sampling="with_replacement")
    K = 4000
    out = np.asarray(sde.sample_paths(flow, p, hp, [0.1], K, seed=3))
    assert out.shape == (K, 1, 2)
    A = np.asarray(p.module.A, dtype=np.float64)
    X = p.X.numpy()
    S = (X - X.mean(0)).T @ (X - X.mean(0))
    expected = 0.1 * 0.1 / (8 * 32) * A @ S @ A
    cov = np.cov(out[:, 0, :].T)
    assert np.abs(cov - expected).max() <= 0.1 * np.abs(expected).max(), (cov, expected)
    mean_drift = out[:, 0, :].mean(0) - (p.theta0.numpy() - 0.1 * p.full_loss_and_grad(p.theta0)[1].numpy())
    assert np.abs(mean_drift).max() <= 4 * np.sqrt(np.diag(expected).max() / K)

    # a path of the vmap with the key of a session's seed is that session's path
    times = [0.2, 0.45]
    dx = make_integrator("diffrax:Euler", options={"seed": 7})
    b, _ = dx.trajectory(flow, p, hp, times)
    keys = jax.numpy.stack([sde.path_key(8), sde.path_key(7)])
    both = np.asarray(sde.sample_paths(flow, p, hp, times, keys=keys))
    assert rel_max(both[1], b) <= BOUND and rel_max(both[0], b) > 1e-3


# ------------------------------------------------------------------ refused


def test_batches_diffusion_and_other_solvers_are_refused():
    p = zoo_problem("linear_nobias_mse")
    with pytest.raises(ConfigError, match=r"^diffusion = 'batches': diffrax:Euler integrates per-example noise only"):
        make_integrator("diffrax:Euler").trajectory(make_flow("sme", {"diffusion": "batches"}), p, HP, TIMES)
    with pytest.raises(ConfigError, match=r"sme is stochastic: integrate it with diffrax:Euler"):
        make_integrator("diffrax:Tsit5").trajectory(make_flow("sme"), p, HP, TIMES)
    with pytest.raises(ConfigError, match=r"integrator_options.seed"):
        make_integrator("diffrax:Euler", options={"seed": -1})


def test_study_with_sme_on_both_backends(tmp_path):
    """Through a study's [[flows]]: the follower's derived seed keys the diffrax path (a seed option
    overrides it), its statistics are recorded, and it runs beside the torch path."""
    study = parse_study({
        "study": {"name": "sde", "dtype": "float64", "device": "cpu", "seed": 0},
        "model": {"name": "mlp", "widths": [5], "activation": "tanh"},
        "data": {"name": "gaussian_mixture", "n": 24, "dim": 3, "classes": 2},
        "optimizer": {"lr": 0.1, "steps": 6, "batch_size": 8, "sampling": "with_replacement"},
        "record": {"every": 2, "projections": 2},
        "theory": {"flow_laws": False},
        "flows": [
            {"name": "sme", "integrator": "flowlab:euler_maruyama", "label": "torch"},
            {"name": "sme", "integrator": "diffrax:Euler", "label": "jax"},
            {"name": "sme", "integrator": "diffrax:Euler", "label": "jax_seeded", "integrator_options": {"seed": 11}},
        ],
    })
    ds = Run(study, tmp_path / "run", overwrite=True).execute()
    assert [str(m) for m in ds.dynamics.values] == ["sgd", "torch", "jax", "jax_seeded"]
    assert all(str(s) == "ok" for s in ds.status.values)
    th = ds.theta.values
    assert np.isfinite(th).all() and rel_max(th[2], th[3]) > 1e-3
    assert ds.accepted_steps.values[2, -1] == 6
