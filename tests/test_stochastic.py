"""The stochastic models (issue 11): sampling schemes, the matrix-free SGD noise, the SDE flows on
Euler–Maruyama, ensembles, the Itô law along paths, and the closed forms of the noisy quadratic
(docs/theory.md#stochastic-models).  Every tolerance comes from round-off (exact identities) or from
the Monte Carlo standard error of the ensemble (z-scores)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import small_study

import flowlab
from flowlab.build import build
from flowlab.config import parse_study
from flowlab.errors import ConfigError
from flowlab.flows.base import Hyper
from flowlab.flows.torch_ops import TorchOps
from flowlab.seeds import derive_seed
from flowlab.sgd import BatchSampler, DiscreteSGD
from flowlab.stochastic import SME, noise_constant
from flowlab.stochastic.ensemble import EnsembleOps, ReplicaSGD
from flowlab.stochastic.sde import SamplingWarning


def _problem(**over):
    over.setdefault("optimizer", {"batch_size": 4})
    st = parse_study(small_study(**over))
    return st, build(st).problem


def _per_example_grads(problem, theta):
    """g_i by a loop over single examples (independent of the code under test)."""
    out = []
    for i in range(problem.n):
        idx = torch.tensor([i])
        out.append(problem.grad(theta, problem.batch(idx)))
    return torch.stack(out)


# ------------------------------------------------------------------ sampling schemes and Σ_B


def test_batch_samplers_per_scheme():
    w = BatchSampler(50, 8, seed=3, scheme="with_replacement")
    wo = BatchSampler(50, 8, seed=3, scheme="without_replacement")
    draws_w = torch.stack([w.next() for _ in range(400)])
    draws_wo = torch.stack([wo.next() for _ in range(400)])
    assert draws_w.shape == draws_wo.shape == (400, 8)
    # without replacement: no repeats inside a batch; with replacement: repeats happen (P ≈ 0.44 per batch)
    assert all(len(set(b.tolist())) == 8 for b in draws_wo)
    assert sum(len(set(b.tolist())) < 8 for b in draws_w) > 100
    # each step draws afresh (not an epoch's permutation): the first 7 batches of 8 from 50 overlap
    assert len(set(draws_wo[:6].flatten().tolist())) < 48
    # uniform over examples (chi-square against 400·8/50 = 64 per example)
    for d in (draws_w, draws_wo):
        counts = torch.bincount(d.flatten(), minlength=50).double()
        chi2 = float(((counts - 64) ** 2 / 64).sum())
        assert chi2 < 100  # 49 dof: P(chi2 > 100) < 1e-4
    with pytest.raises(ConfigError, match="optimizer.sampling"):
        BatchSampler(50, 8, seed=0, scheme="shuffle")


@pytest.mark.parametrize("scheme", ["with_replacement", "without_replacement"])
def test_noise_constant_is_the_exact_batch_covariance(scheme):
    """Σ_B = c·Σ₁/B: enumerate every batch of B = 2 from N = 6 scalar 'gradients'."""
    g = np.array([0.3, -1.2, 2.0, 0.7, -0.4, 1.1])
    N, B = len(g), 2
    sigma1 = np.mean((g - g.mean()) ** 2)
    if scheme == "with_replacement":
        batches = list(itertools.product(range(N), repeat=B))
    else:
        batches = list(itertools.combinations(range(N), B))
    means = np.array([g[list(b)].mean() for b in batches])
    assert np.mean(means) == pytest.approx(g.mean(), abs=1e-15)
    cov = np.mean((means - g.mean()) ** 2)
    assert cov == pytest.approx(noise_constant(scheme, B, N) * sigma1 / B, rel=1e-12)


def test_weighted_gradient_is_the_weighted_sum_of_per_example_gradients():
    _, p = _problem(data={"n": 24})
    theta = p.theta0 + 0.01 * torch.randn(p.dim, generator=torch.Generator().manual_seed(0), dtype=p.dtype)
    w = torch.randn(p.n, generator=torch.Generator().manual_seed(1), dtype=p.dtype)
    G = _per_example_grads(p, theta)
    loss, g = TorchOps(p).weighted_loss_grad(theta, w)
    assert torch.allclose(g, w @ G, rtol=0, atol=1e-13 * float(G.abs().max()))
    assert float(loss) == pytest.approx(float(p.full_loss(theta)), rel=1e-14)
    # chunked evaluation: the same sum
    _, p2 = _problem(data={"n": 24, "chunk_size": 7})
    _, g2 = TorchOps(p2).weighted_loss_grad(theta, w)
    assert torch.allclose(g2, g, rtol=0, atol=1e-13 * float(G.abs().max()))
    # K paths at once (torch.func.vmap): the same as one at a time
    thetas = torch.stack([theta, theta * 1.01])
    ws = torch.stack([w, -w])
    _, gk = EnsembleOps(p).weighted_loss_grad(thetas, ws)
    assert torch.allclose(gk[0], g, atol=1e-13 * float(G.abs().max()), rtol=0)
    assert torch.allclose(gk[1], -(w @ _per_example_grads(p, thetas[1])), atol=1e-13 * float(G.abs().max()), rtol=0)


@pytest.mark.parametrize("scheme,B", [("with_replacement", 4), ("without_replacement", 4), ("without_replacement", 24)])
def test_matrix_free_diffusion_has_covariance_eta_sigma_b(scheme, B):
    """σ built column by column from σ(e_i) satisfies σσᵀ = η c Σ₁/B (Σ₁ from per-example gradients)."""
    _, p = _problem(data={"n": 24})
    theta = p.theta0.clone()
    hp = Hyper(lr=0.1, batch_size=B, sampling=scheme)
    flow, ops = SME(sampling=scheme), TorchOps(p)
    S = torch.stack([flow.noise_vector(theta, ops, hp, torch.eye(p.n, dtype=p.dtype)[i]) for i in range(p.n)], 1)
    G = _per_example_grads(p, theta)
    D = G - G.mean(0)
    sigma1 = D.T @ D / p.n
    expected = 0.1 * noise_constant(scheme, B, p.n) * sigma1 / B
    scale = float(expected.abs().max()) if B < p.n else float((0.1 * sigma1 / B).abs().max())
    assert torch.allclose(S @ S.T, expected, rtol=0, atol=1e-12 * scale)


def test_per_example_noise_is_refused_on_batchnorm_and_batches_run():
    raw = small_study(model={"name": "mlp", "widths": [8], "batchnorm": True}, optimizer={"steps": 4},
                      flows=[{"name": "sme"}])
    with pytest.raises(ConfigError) as exc:
        flowlab.run(parse_study(raw), out=None)
    line = str(exc.value)
    assert "\n" not in line and "flows.0.diffusion" in line and "BatchNorm" in line and "batches" in line
    raw["flows"] = [{"name": "sme", "diffusion": "batches", "batches": 4, "label": "sme_b"}]
    raw["optimizer"]["sampling"] = "with_replacement"
    ds = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-bn", overwrite=True)
    assert list(ds.status.values) == ["ok", "ok"]
    assert np.isfinite(ds.loss.sel(dynamics="sme_b").values).all()


def test_bad_options_are_one_line():
    for opts, field in (({"diffusion": "gaussian"}, "diffusion"), ({"batches": 1}, "batches"),
                        ({"sampling": "reshuffle"}, "sampling")):
        with pytest.raises(ConfigError) as exc:
            SME(**opts)
        assert exc.value.field == field and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="ensemble.size"):
        parse_study(small_study(ensemble={"size": 0}))
    with pytest.raises(ConfigError, match="ensemble.colour"):
        parse_study(small_study(ensemble={"size": 2, "colour": 1}))


def test_reshuffling_discrete_run_warns_not_refuses():
    raw = small_study(optimizer={"steps": 2}, flows=[{"name": "sme"}])
    with pytest.warns(SamplingWarning, match="reshuffles"):
        ds = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-warn", overwrite=True)
    assert list(ds.status.values) == ["ok", "ok"]


# ---------------------------------------------------------------------------- ensembles


def test_replicas_are_the_single_runs():
    """Looping (vectorise = false): replica s is bitwise DiscreteSGD with seed derive_seed(seed, "sgd", s);
    vectorised: the same to round-off."""
    st, p = _problem(optimizer={"steps": 6, "momentum": 0.9, "weight_decay": 1e-3})
    lrs = np.full(6, 0.1)
    singles = []
    for s in range(3):
        d = DiscreteSGD(p, st.optimizer, lrs, derive_seed(0, "sgd", s))
        for _ in range(6):
            d.evaluate()
            d.keep_grad()
            d.update()
        singles.append(d.theta.clone())
    assert derive_seed(0, "sgd", 0) == 0
    for vec in (False, True):
        r = ReplicaSGD(p, st.optimizer, lrs, 0, 3, vectorise=vec)
        for _ in range(6):
            r.evaluate()
            r.update()
        for s in range(3):
            if vec:
                assert torch.allclose(r.theta[s], singles[s], rtol=0, atol=1e-13)
            else:
                assert torch.equal(r.theta[s], singles[s])


def test_ensemble_dataset_has_a_sample_dim():
    raw = small_study(optimizer={"steps": 4, "sampling": "with_replacement", "weight_decay": 1e-3},
                      flows=[{"name": "sme", "label": "sme"}, {"name": "gradient_flow", "integrator": "flowlab:rk4",
                                                               "label": "gf"}],
                      record={"every": 2, "projections": 3}, ensemble={"size": 3})
    ds = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-ens", overwrite=True)
    assert ds.sizes["sample"] == 3
    for name in ("loss", "distance", "projection", "quantity", "drift", "theta", "flow_law"):
        assert ds[name].dims[:2] == ("dynamics", "sample"), name
    for name in ("grad_term", "grad_term_acc", "theory"):
        assert ds[name].dims[0] == "sample", name
    loss = ds.loss.isel(time=-1)
    assert float(loss.sel(dynamics="sgd").std("sample")) > 0  # different batch orders
    assert float(loss.sel(dynamics="sme").std("sample")) > 0  # different Brownian paths
    assert float(loss.sel(dynamics="gf").std("sample")) == 0  # deterministic: repeated
    seeds = __import__("json").loads(ds.attrs["seeds"])
    assert seeds["sgd"][0] == 0 and len(set(seeds["sgd"])) == 3 and "sme" in seeds
    # distance of sample s is against SGD replica s
    th = ds.theta.isel(snapshot=-1)
    d = np.linalg.norm(th.sel(dynamics="gf").values - th.sel(dynamics="sgd").values, axis=-1)
    assert np.allclose(ds.distance.sel(dynamics="gf").isel(time=-1).values, d, rtol=1e-12)


def test_same_study_same_numbers():
    raw = small_study(optimizer={"steps": 3, "sampling": "without_replacement"}, flows=[{"name": "sme"}],
                      ensemble={"size": 2})
    a = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-det-a", overwrite=True)
    b = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-det-b", overwrite=True)
    assert np.array_equal(a.theta.values, b.theta.values)
    raw["study"]["seed"] = 1
    c = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-det-c", overwrite=True)
    assert not np.array_equal(a.theta.values, c.theta.values)


# ------------------------------------------------------------------- the noisy quadratic


H = np.array([1.0, 0.25])
X0 = np.array([3.0, -2.0])


def quadratic_study(eta, steps, K, flows, seed=1):
    return parse_study({
        "study": {"name": "q", "seed": seed, "dtype": "float64"},
        "model": {"name": "quadratic", "A": [[1.0, 0.0], [0.0, 0.25]], "theta0": X0.tolist()},
        "data": {"name": "whitened", "n": 4}, "loss": {"name": "identity"},
        "optimizer": {"lr": eta, "steps": steps, "batch_size": 1, "sampling": "with_replacement"},
        "record": {"every": steps, "projections": 0, "full_loss": True, "snapshot_every": "ends"},
        "flows": flows, "ensemble": {"size": K}})


def em_second_moment(a, s2, h, n):
    """E X_n² of Euler–Maruyama with step h on dX = −aX dt + s dW (docs/theory.md#noisy-quadratic)."""
    q = (1 - a * h) ** (2 * n)
    return q * X0 ** 2 + s2 * h * (1 - q) / (1 - (1 - a * h) ** 2)


def expected_loss(m):
    return 0.5 * float((H * m).sum()) + 0.5 * float(H.sum())


def test_whitened_data_is_exactly_white():
    from flowlab.data import whitened

    d = whitened(n=4, dim=2, seed=0)
    X = d.X.numpy()
    assert np.allclose(X.mean(0), 0, atol=1e-15) and np.allclose(X.T @ X / 4, np.eye(2), atol=1e-14)


def test_noisy_quadratic_expected_losses_match_closed_forms():
    """E L of SGD (B = 1 with replacement), and of sme / sme2 on Euler–Maruyama (steps η and η/2), equal
    their closed forms within 4.5 standard errors (K = 20000 replicas)."""
    eta, steps, K = 0.1, 10, 20000
    flows = [{"name": "sme", "label": "sme"}, {"name": "sme2", "label": "sme2"},
             {"name": "sme", "label": "sme_half", "dt": eta / 2}]
    ds = flowlab.run(quadratic_study(eta, steps, K, flows), out="/tmp/lead-pytest-quad", overwrite=True)
    sgd_m = (1 - eta * H) ** (2 * steps) * X0 ** 2 + eta * H / (2 - eta * H) * (1 - (1 - eta * H) ** (2 * steps))
    pred = {"sgd": expected_loss(sgd_m),
            "sme": expected_loss(em_second_moment(H, eta * H ** 2, eta, steps)),
            "sme2": expected_loss(em_second_moment(H + eta * H ** 2 / 2, eta * H ** 2, eta, steps)),
            "sme_half": expected_loss(em_second_moment(H, eta * H ** 2, eta / 2, 2 * steps))}
    L = ds.full_loss.isel(time=-1)
    for label, value in pred.items():
        v = L.sel(dynamics=label).values
        z = (v.mean() - value) / (v.std(ddof=1) / math.sqrt(K))
        assert abs(z) < 4.5, (label, v.mean(), value, z)
    # the closed forms differ from each other by many standard errors: the test can tell them apart
    se = L.sel(dynamics="sgd").values.std() / math.sqrt(K)
    assert abs(pred["sme2"] - pred["sgd"]) > 10 * se


# ---------------------------------------------------------------------- symmetry under noise


def test_ito_martingale_term_vanishes_for_every_kind():
    """Each column of σ obeys the group's gradient constraint: ⟨θ_A, (σv)_A⟩ = 0 (rescale: A1 − A2)
    and ⟨(σv)_A, 1⟩ = 0 (translation), to round-off, for random v."""
    from flowlab.symmetry.build import study_groups

    st, p = _problem(model={"name": "mlp", "widths": [12], "activation": "relu"}, data={"n": 30})
    groups = study_groups(st, p)
    proj = groups.projector(p.device)
    kinds = set(groups.kinds.tolist())
    assert {"translation", "rescale"} <= kinds
    theta = p.theta0.clone()
    hp = Hyper(lr=0.1, batch_size=5, sampling="with_replacement")
    v = torch.randn(p.n, generator=torch.Generator().manual_seed(2), dtype=p.dtype)
    sv = SME().noise_vector(theta, TorchOps(p), hp, v)
    scale = proj.norms_sq(theta).sqrt() * proj.norms_sq(sv).sqrt()
    dots = proj.dots(theta, sv)
    is_t = proj.is_translation
    assert torch.all(dots[~is_t].abs() <= 1e-12 * scale[~is_t])
    lin = proj.lin(sv)
    assert torch.all(lin[is_t].abs() <= 1e-12 * proj.norms_sq(sv).sqrt()[is_t] * 10)


def test_ito_law_holds_along_sde_paths():
    """flow_law (the Itô law integrated beside each path, with the exact tr Σ_{B,A}) tracks the measured
    rescale quantities of every path: the gap is the solver's, O(h^{1/2}) per path (it shrinks ≈ 2× when
    dt is divided by 4); averaged over paths it is far below the noise's own contribution η∫tr Σ_{B,A}
    (the law minus GF's)."""
    raw = small_study(model={"name": "mlp", "widths": [10], "activation": "relu"}, data={"n": 30},
                      optimizer={"lr": 0.1, "steps": 10, "batch_size": 2, "sampling": "with_replacement",
                                 "weight_decay": 0.01},
                      flows=[{"name": "sme", "label": "coarse"}, {"name": "sme", "label": "fine", "dt": 0.025},
                             {"name": "gradient_flow", "integrator": "flowlab:rk4", "label": "gf"}],
                      record={"every": 10, "projections": 0}, ensemble={"size": 48})
    ds = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-ito", overwrite=True)
    resc = np.flatnonzero(ds.group_kind.values == "rescale")
    assert resc.size > 3
    end = {"time": -1, "symmetry_group": resc}
    gap = {k: (ds.quantity - ds.flow_law).sel(dynamics=k).isel(end).values for k in ("coarse", "fine")}
    noise = (ds.flow_law.sel(dynamics="fine") - ds.flow_law.sel(dynamics="gf")).isel(end).values
    rms = {k: float(np.sqrt(np.mean(v ** 2))) for k, v in gap.items()}
    assert rms["coarse"] / rms["fine"] > 1.5, rms
    # in expectation (mean over the 48 paths) the law holds far closer than the noise term's size
    mean_gap = float(np.mean(np.abs(gap["fine"].mean(0))))
    assert mean_gap < 0.15 * float(np.mean(np.abs(noise))), (mean_gap, float(np.mean(np.abs(noise))))


# ------------------------------------------------------------------------------- weak errors


def _quadratic_toml(tmp_path, flows: str, extra: str = "") -> str:
    path = tmp_path / "q.toml"
    path.write_text(f"""
[study]
name = "q"
seed = 1
dtype = "float64"
[model]
name = "quadratic"
A = [[1.0, 0.0], [0.0, 0.25]]
theta0 = [3.0, -2.0]
[data]
name = "whitened"
n = 4
[loss]
name = "identity"
[optimizer]
lr = 0.1
steps = 10
batch_size = 1
sampling = "with_replacement"
[record]
projections = 0
{extra}
{flows}
""")
    return str(path)


def test_orders_weak_cli(tmp_path, capsys):
    from flowlab.cli import main

    flows = '[[flows]]\nname = "sme"\nlabel = "sme"\n[[flows]]\nname = "gradient_flow"\nintegrator = "flowlab:rk4"\nlabel = "gf"'
    study = _quadratic_toml(tmp_path, flows)
    assert main(["orders", study, "--weak", "--lr", "0.2,0.1", "--horizon", "0.4", "--samples", "1"]) == 2
    assert "ensemble.size" in capsys.readouterr().err
    out = tmp_path / "w"
    assert main(["orders", study, "--weak", "--lr", "0.2,0.1", "--horizon", "0.4", "--samples", "2000",
                 "--extrapolate", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "weak errors at T=0.4, K=2000" in text and "sme" in text and "gf" in text
    import xarray as xr

    ds = xr.open_dataset(out / "weak.nc", engine="h5netcdf")
    assert set(ds.flow.values) == {"sme", "gf"} and (out / "weak.png").exists()
    assert "Regenerate: `flowlab orders" in (out / "summary.md").read_text()
    assert np.all(ds.se_loss.values > 0) and np.all(np.isfinite(ds.weak_loss.values))


def test_extrapolation_couples_the_two_paths():
    """With extrapolate, the h and h/2 paths share their Brownian path: the coarse path with
    substeps = 2 is the fine path's increments summed in pairs (a quadratic with η = 0.2: the two
    paths end within O(h) of each other, independent paths would not)."""
    from flowlab.stochastic.weak import HALF, study_at

    flows = [{"name": "sme", "label": "sme"}]
    st = study_at(quadratic_study(0.2, 5, 64, flows), 0.2, 1.0, 64, extrapolate=True)
    specs = {s.label: s for s in st.flows}
    assert specs["sme"].integrator_options["substeps"] == 2 and specs["sme" + HALF].dt == pytest.approx(0.1)
    ds = flowlab.run(st, out="/tmp/lead-pytest-couple", overwrite=True)
    th = ds.theta.isel(snapshot=-1)
    gap = np.abs(th.sel(dynamics="sme") - th.sel(dynamics="sme" + HALF)).mean()
    spread = np.abs(th.sel(dynamics="sme") - th.sel(dynamics="sme").mean("sample")).mean()
    assert float(gap) < 0.3 * float(spread)


@pytest.mark.slow
def test_weak_orders_of_sme_and_sme2_on_the_noisy_quadratic():
    """Weak-error slopes against η: sme 1, sme2 2 (Talay–Tubaro extrapolated, coupled paths), each within
    ±0.2 and with its 95 % interval excluding the other's order (K = 400000 replicas; ~10 min)."""
    from flowlab.stochastic.weak import measure_weak, slope_ci

    flows = [{"name": "sme", "label": "sme"}, {"name": "sme2", "label": "sme2"}]
    ds = measure_weak(quadratic_study(0.1, 10, 2, flows), [0.2, 0.1, 0.05, 0.025], 2.0, samples=400000,
                      extrapolate=True)
    lr = ds.lr.values
    e, se = ds.weak_loss.sel(flow="sme").values, ds.se_loss.sel(flow="sme").values
    s1, ci1 = slope_ci(lr[1:], e[1:], se[1:])  # η ≤ 0.1: past the pre-asymptotic bend at 0.2
    e2, se2 = ds.weak_loss.sel(flow="sme2").values, ds.se_loss.sel(flow="sme2").values
    s2, ci2 = slope_ci(lr[:3], e2[:3], se2[:3])  # η ≥ 0.05: where e ≫ se
    assert abs(s1 - 1) <= 0.2 and abs(s2 - 2) <= 0.2, (s1, ci1, s2, ci2)
    assert s1 + ci1 < 2 and s2 - ci2 > 1


def test_svag_weak_error_falls_like_one_over_l():
    """SVAG's weak error against SME-1, whose E L(T) is known in closed form on the noisy quadratic
    (docs/theory.md#noisy-quadratic): |E L(SVAG_l(T)) − E L(SME(T))| ∝ 1/l (slope −1 ± 0.25 in l)."""
    from flowlab.stochastic.weak import slope_ci

    eta, T, K = 0.25, 1.0, 20000
    steps = int(T / eta)
    ls = [1, 2, 4, 8]
    flows = [{"name": "svag", "l": ell, "label": f"svag{ell}"} for ell in ls]
    ds = flowlab.run(quadratic_study(eta, steps, K, flows), out="/tmp/lead-pytest-svag", overwrite=True)
    m_sme = np.exp(-2 * H * T) * X0 ** 2 + (eta * H / 2) * (1 - np.exp(-2 * H * T))
    exact = expected_loss(m_sme)
    L = ds.full_loss.isel(time=-1)
    err = np.array([abs(float(L.sel(dynamics=f"svag{ell}").mean()) - exact) for ell in ls])
    se = np.array([float(L.sel(dynamics=f"svag{ell}").std()) / math.sqrt(K) for ell in ls])
    assert np.all(err > 3 * se), (err, se)
    slope, ci = slope_ci(np.array(ls, dtype=float), err, se)
    assert abs(slope + 1) <= 0.25, (slope, ci, err)


def test_report_on_an_ensemble_splits_sgds_symmetry_breaking(tmp_path, capsys):
    """``flowlab report`` on an ensemble: mean ± se per dynamics, and SGD's forcing beside its
    finite-step and noise parts, whose sum is the forcing in expectation (E|ĝ_A|² = |g_A|² + tr Σ_{B,A})."""
    from flowlab.cli import main
    from flowlab.stochastic.report import breaking_split

    raw = small_study(model={"name": "mlp", "widths": [10], "activation": "relu"}, data={"n": 40},
                      optimizer={"lr": 0.1, "steps": 12, "batch_size": 4, "sampling": "with_replacement"},
                      flows=[{"name": "sme", "label": "sme", "dt": 0.025}], record={"every": 1, "projections": 0},
                      theory={"flow_laws": False}, ensemble={"size": 24})
    out = tmp_path / "ens"
    ds = flowlab.run(parse_study(raw), out=out)
    assert {"grad_term_full", "grad_term_noise"} <= set(ds.data_vars)
    split = breaking_split(ds)
    measured, finite, noise = split["measured"], split["finite_step"], split["noise"]
    # the measured forcing and the sum of its parts agree within the ensemble's standard errors
    z = (measured[0] - finite[0] - noise[0]) / math.sqrt(measured[1] ** 2 + finite[1] ** 2 + noise[1] ** 2)
    assert abs(z) < 4, (measured, finite, noise)
    assert noise[0] > 0 and finite[0] > 0
    assert main(["report", str(out), "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "ensemble: 24 replicas" in text and "noise part" in text and "finite-step part" in text


def test_sme_momentum_without_noise_is_the_momentum_flow_on_euler():
    """A full batch has no noise (c = 0): sme_momentum's Euler–Maruyama path is then explicit Euler on
    momentum_second_order, from the same θ'(0) = −∇L_λ(θ0)/(1+β), to round-off; with minibatches it
    runs beside heavy-ball SGD and its paths differ."""
    base = dict(optimizer={"steps": 8, "momentum": 0.9, "weight_decay": 1e-3, "batch_size": "full"},
                record={"every": 4, "projections": 0}, theory={"flow_laws": False})
    raw = small_study(**base, flows=[{"name": "sme_momentum", "label": "smom", "sampling": "with_replacement"},
                                     {"name": "momentum_second_order", "integrator": "flowlab:euler",
                                      "integrator_options": {"land": "exact"}, "label": "ode"}])
    with pytest.warns(SamplingWarning, match="with_replacement"):  # the study reshuffles: warned, not refused
        ds = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-smom", overwrite=True)
    a, b = ds.theta.sel(dynamics="smom").values, ds.theta.sel(dynamics="ode").values
    assert np.abs(a - b).max() <= 1e-13 * np.abs(b).max()
    raw = small_study(**{**base, "optimizer": {**base["optimizer"], "batch_size": 8,
                                               "sampling": "with_replacement"}},
                      flows=[{"name": "sme_momentum", "label": "smom"}], ensemble={"size": 3})
    ds = flowlab.run(parse_study(raw), out="/tmp/lead-pytest-smom2", overwrite=True)
    assert list(ds.status.values) == ["ok", "ok"]
    th = ds.theta.sel(dynamics="smom").isel(snapshot=-1).values
    assert np.abs(th[0] - th[1]).max() > 0
