"""The central flow (flowlab.central) and the sharpness recorder (flowlab.spectrum), float64.

Checked against independent computations: LOBPCG against a dense eigendecomposition; the
complementarity solver against a Burer–Monteiro solution by scipy (X = LLᵀ, BFGS from several starts)
and its own KKT conditions; the one-direction case against the closed form σ² = 2⟨−∇L, ∇S⟩/|∇S|²
(relaxed: X = (D/h + α)₋/B); the run's sharpness against a dense Hessian; the symmetry law of the
extra term against the field itself.
"""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import flowlab
from flowlab.central import CentralFlow, MinibatchWarning, solve_sdcp
from flowlab.central.sdcp import kkt_residuals, objective
from flowlab.errors import ConfigError
from flowlab.flows import Hyper, TorchOps
from flowlab.spectrum import EigenTracker, lobpcg_top

# ----------------------------------------------------------------------------- LOBPCG


def _spd(m: int, top: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor(top, dtype=torch.float64), torch.linspace(-2.0, 0.8 * min(top), m - len(top),
                                                                          dtype=torch.float64)])
    return (Q * ev) @ Q.T


@pytest.mark.parametrize("p", [1, 3])
def test_lobpcg_finds_the_top_eigenpairs_of_a_dense_matrix(p):
    A = _spd(300, [10.0, 9.7, 9.6, 8.0])
    tol = 1e-9
    out = lobpcg_top(lambda V: A @ V, torch.randn(300, p, generator=torch.Generator().manual_seed(1),
                                                  dtype=torch.float64), tol, 500)
    assert out.converged
    want = torch.linalg.eigvalsh(A).flip(0)[:p]
    # a Ritz value with relative residual r is within r²·λ²/gap of the eigenvalue (gap ≥ 0.1 here);
    # bound it by the residual itself times λ, which is looser
    assert torch.allclose(out.values, want, rtol=0, atol=tol * 10.0)
    R = A @ out.vectors - out.vectors * out.values
    assert float(torch.linalg.vector_norm(R, dim=0).max()) <= tol * 10.0 * 1.0001
    assert torch.allclose(out.vectors.T @ out.vectors, torch.eye(p, dtype=torch.float64), atol=1e-12)


def test_tracker_grows_until_every_eigenvalue_above_the_threshold_is_tracked_and_warm_starts():
    A = _spd(300, [10.0, 9.7, 9.6, 8.0])
    tr = EigenTracker(1, 1e-8, 500, max_k=8, seed=0)
    out = tr.solve(lambda V: A @ V, torch.zeros(300, dtype=torch.float64), grow_above=9.0)
    assert tr.k == 4 and out.values[-1] < 9.0 < out.values[-2]  # 10, 9.7, 9.6 tracked, 8 below
    cold = tr.matvecs
    B = A + 1e-4 * _spd(300, [1.0], seed=3)  # a nearby operator: the warm start needs far fewer products
    out2 = tr.solve(lambda V: B @ V, torch.zeros(300, dtype=torch.float64), grow_above=9.0)
    assert out2.converged and tr.matvecs - cold < cold / 2


def test_lobpcg_that_cannot_converge_says_so():
    A = _spd(300, [10.0, 9.99999, 9.99998])
    out = lobpcg_top(lambda V: A @ V, torch.ones(300, 1, dtype=torch.float64), 1e-14, 3)
    assert not out.converged and out.iterations == 3 and out.worst_residual > 1e-14


# ------------------------------------------------------------------------------ SDCP


def _random_sdcp(k: int, seed: int, rank: int | None = None):
    rng = np.random.default_rng(seed)
    m = 12
    a = rng.standard_normal((m, k, k))
    a = 0.5 * (a + a.transpose(0, 2, 1))  # a_ij vectors (symmetric in ij)
    if rank is not None:  # B of low rank: vectors a_ij in a small subspace
        a = np.einsum("rm,rij->mij", rng.standard_normal((rank, m)), a[:rank])
    Bmat = 0.5 * np.einsum("mij,mkl->ijkl", a, a).reshape(k * k, k * k)
    A = rng.standard_normal((k, k))
    A = 0.5 * (A + A.T) - 0.5 * np.eye(k)
    return A, Bmat


def _burer_monteiro(A, Bmat, k, starts=6):
    """min f(LLᵀ) over full k × k L by BFGS from several starts (independent of the solver)."""
    rng = np.random.default_rng(123)

    def f(x):
        L = x.reshape(k, k)
        return objective(A, Bmat, L @ L.T)

    best = None
    for _ in range(starts):
        r = minimize(f, rng.standard_normal(k * k), method="BFGS", options={"gtol": 1e-12, "maxiter": 20000})
        if best is None or r.fun < best.fun:
            best = r
    L = best.x.reshape(k, k)
    return L @ L.T, best.fun


@pytest.mark.parametrize("k,seed,rank", [(2, 0, None), (2, 1, None), (3, 2, None), (3, 3, 4), (4, 4, None)])
def test_sdcp_matches_an_independent_solution_and_its_kkt_conditions(k, seed, rank):
    A, Bmat = _random_sdcp(k, seed, rank)
    res = solve_sdcp(A, Bmat, tol=1e-12)
    assert res.converged, res.reason
    X_bm, f_bm = _burer_monteiro(A, Bmat, k)
    scale = np.linalg.norm(A) ** 2 / np.linalg.eigvalsh(Bmat).max()  # the objective's natural size
    assert objective(A, Bmat, res.X) <= f_bm + 1e-8 * scale
    kkt = kkt_residuals(A, Bmat, res.X)
    assert kkt["primal"] <= 1e-9 and kkt["dual"] <= 1e-6 * np.linalg.norm(A) and kkt["complementarity"] <= 1e-6 * scale
    if rank is None:  # B positive definite: the solution is unique
        np.testing.assert_allclose(res.X, X_bm, atol=1e-5 * max(1.0, np.linalg.norm(X_bm)))


def test_sdcp_one_direction_and_the_trivial_cases():
    assert solve_sdcp(np.array([[-3.0]]), np.array([[2.0]])).X[0, 0] == pytest.approx(1.5)
    assert solve_sdcp(np.array([[3.0]]), np.array([[2.0]])).X[0, 0] == 0.0
    res = solve_sdcp(np.diag([1.0, 2.0]), np.eye(4))  # A ⪰ 0: X = 0
    assert res.converged and not res.X.any()
    bad = solve_sdcp(np.diag([-1.0, 1.0]), np.zeros((4, 4)))  # a negative direction B does not see
    assert not bad.converged and "no solution" in bad.reason


# ----------------------------------------------------------------------- the flow


def _study(lr=0.2, steps=6, flows=None, model=None, loss="mse", n=64, **record):
    raw = {
        "study": {"name": "central", "dtype": "float64", "device": "cpu", "seed": 0},
        "model": model or {"name": "mlp", "widths": [8], "activation": "tanh"},
        "data": {"name": "digits", "n": n},
        "loss": {"name": loss},
        "optimizer": {"lr": lr, "steps": steps, "batch_size": "full"},
        "record": {"every": 1, "projections": 0, "snapshot_every": 1, **record},
        "symmetry": {"enabled": False},
        "flows": flows if flows is not None else [],
    }
    return flowlab.parse_study(raw)


def _dense_hessian(problem, theta):
    m = problem.dim
    return torch.stack([problem.full_hvp(theta, e) for e in torch.eye(m, dtype=torch.float64)], 1)


def test_below_the_edge_the_central_flow_is_gradient_flow(tmp_path):
    flows = [{"name": "central_flow", "integrator": "flowlab:rk4", "dt": 0.025, "label": "central"},
             {"name": "gradient_flow", "integrator": "flowlab:rk4", "dt": 0.025, "label": "gf"}]
    study = _study(lr=0.05, steps=10, flows=flows, sharpness=True)
    ds = flowlab.run(study, tmp_path / "run").load()
    assert list(ds.status.values) == ["ok"] * 3
    edge = 2 / 0.05
    assert float(ds.sharpness.max()) < 0.5 * edge  # far below the edge: no direction near 2/η
    th = ds.theta.sel(dynamics="central").values
    gf = ds.theta.sel(dynamics="gf").values
    # the same field −∇L evaluated by the same RK4 steps: equal up to the rounding of the gradient's
    # evaluation path (a few ulps per step, 20 steps)
    np.testing.assert_allclose(th, gf, rtol=0, atol=1e-12 * np.abs(gf).max())
    assert np.all(ds.critical_directions.sel(dynamics="central").values == 0)
    assert np.allclose(ds.sigma_trace.sel(dynamics="central").values, 0.0)
    assert np.all(np.isnan(ds.critical_directions.sel(dynamics="gf").values))


def test_recorded_sharpness_is_the_top_eigenvalue_of_the_hessian(tmp_path):
    study = _study(lr=0.05, steps=3, flows=[{"name": "gradient_flow", "integrator": "flowlab:rk4", "dt": 0.05,
                                             "label": "gf"}], sharpness=True)
    ds = flowlab.run(study, tmp_path / "run").load()
    problem = flowlab.build(study).problem
    for label in ("sgd", "gf"):
        for s in (0, -1):
            theta = torch.as_tensor(ds.theta.sel(dynamics=label).values[s])
            want = float(torch.linalg.eigvalsh(_dense_hessian(problem, theta)).max())
            got = float(ds.sharpness.sel(dynamics=label).sel(time=ds.snapshot.values[s]).values)
            res = float(ds.sharpness_residual.sel(dynamics=label).sel(time=ds.snapshot.values[s]).values)
            assert res <= ds.sharpness_residual.attrs["tolerance"]
            # a Ritz value is below the eigenvalue by at most (residual·λ)²/gap ≤ residual·λ
            assert want - res * want * 1.01 <= got <= want * (1 + 1e-12), (label, got, want)


def _edge_problem(lr):
    """A tiny tanh net whose sharpness at θ0 is above 2/η: the central flow is at the edge from t = 0."""
    study = _study(lr=lr, steps=2)
    return study, flowlab.build(study).problem


def test_one_direction_is_the_relaxed_projection_of_gradient_flow():
    study, problem = _edge_problem(0.1)
    theta = problem.theta0.clone()
    H = _dense_hessian(problem, theta)
    evals, evecs = torch.linalg.eigh(H)
    S, u = float(evals[-1]), evecs[:, -1]
    lr = 2.0 / (S * 0.99)  # the top eigenvalue at 0.99·2/η: one candidate, the others far below
    flow = CentralFlow(eig_tol=1e-10)
    assert float(evals[-2]) < flow.critical * 2.0 / lr
    ops = TorchOps(problem)
    hp = Hyper(lr=lr)
    ev = flow.evaluate(theta, ops, hp)
    assert ev.k == 1
    g = problem.full_grad(theta)
    gradS = problem.full_d3(theta, u)  # ∇λ_max = ∇(uᵀHu), u the unit top eigenvector
    h = flow.relax * lr
    # X = max(0, −(D/h + ⟨∇S, g⟩) / (½|∇S|²)); with D = 0 it is the projection σ² = 2⟨−g, ∇S⟩/|∇S|²
    D = 2.0 / lr - S
    want = max(0.0, -(D / h + float(gradS @ g)) / (0.5 * float(gradS @ gradS)))
    assert ev.X[0, 0] == pytest.approx(want, rel=1e-6)
    field = -(g + 0.5 * want * gradS)
    assert torch.allclose(ev.field, field, rtol=0, atol=1e-6 * float(field.abs().max()))
    if want > 0:  # the sharpness moves at −D/h along the field: it reaches the edge after h
        assert float(gradS @ ev.field) == pytest.approx(D / h, rel=1e-6)


def test_central_flow_holds_the_edge_and_reports_its_extras(tmp_path):
    study, problem = _edge_problem(0.1)
    S0 = float(torch.linalg.eigvalsh(_dense_hessian(problem, problem.theta0)).max())
    lr = 2.5 / S0  # sharpness at θ0 is 1.25 × 2/η: the flow pulls it to the edge within ~h
    flows = [{"name": "central_flow", "label": "central"}]
    ds = flowlab.run(_study(lr=lr, steps=12, flows=flows, sharpness=True), tmp_path / "run").load()
    assert list(ds.status.values) == ["ok", "ok"], ds.status.values
    sc = ds.sharpness.sel(dynamics="central").values
    edge = 2.0 / lr
    assert sc[0] == pytest.approx(S0, rel=1e-4)
    assert np.all(np.abs(sc[4:] / edge - 1) < 0.01), sc / edge  # pulled to and held at the edge
    assert np.all(ds.critical_directions.sel(dynamics="central").values[1:] >= 1)
    tr = ds.sigma_trace.sel(dynamics="central").values
    L = ds.loss.sel(dynamics="central").values
    np.testing.assert_allclose(ds.predicted_loss.sel(dynamics="central").values, L + tr / lr, rtol=1e-12)
    assert np.all(tr[1:] > 0)


def test_failures_are_statuses_not_crashes(tmp_path):
    study, problem = _edge_problem(0.1)
    S0 = float(torch.linalg.eigvalsh(_dense_hessian(problem, problem.theta0)).max())
    lr = 2.5 / S0
    flows = [{"name": "central_flow", "label": "lanczos", "eig_maxiter": 1, "eig_tol": 1e-9},
             {"name": "central_flow", "label": "sdcp", "sdcp_maxiter": 1, "sdcp_tol": 1e-15, "max_directions": 2,
              "critical": 0.6, "track": 0.6}]
    ds = flowlab.run(_study(lr=lr, steps=3, flows=flows, n=200), tmp_path / "run").load()
    status = dict(zip(ds.dynamics.values, ds.status.values))
    assert status["sgd"] == "ok"
    assert "top eigenpairs not converged" in status["lanczos"]
    assert "complementarity problem" in status["sdcp"] and "not converged" in status["sdcp"]


def test_refusals_and_the_minibatch_warning(tmp_path):
    for integ, field in (("torchdiffeq:dopri5", "flows.0.integrator"), ("diffrax:Euler", "flows.0.integrator")):
        with pytest.raises(ConfigError) as err:
            flowlab.run(_study(flows=[{"name": "central_flow", "integrator": integ, "dt": 0.05}]), tmp_path / "a",
                        overwrite=True)
        assert err.value.field == field and "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        flowlab.run(_study(lr=0.2, flows=[{"name": "central_flow", "dt": 0.2}]), tmp_path / "b", overwrite=True)
    assert err.value.field == "flows.0.dt"
    with pytest.raises(ConfigError) as err:
        flowlab.run(_study(flows=[{"name": "central_flow", "critical": 1.5}]), tmp_path / "c", overwrite=True)
    assert err.value.field == "flows.0.critical"
    study = _study(lr=0.05, steps=2, flows=[{"name": "central_flow"}]).with_overrides(["optimizer.batch_size=16"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flowlab.run(study, tmp_path / "d", overwrite=True)
    hits = [w for w in caught if issubclass(w.category, MinibatchWarning)]
    assert len(hits) == 1 and "full-batch GD" in str(hits[0].message)


def test_symmetry_law_of_the_extra_term(tmp_path):
    """Rescale groups (ReLU units) and translation groups (softmax): the extra term ½∇⟨H, Σ⟩ moves
    Q = |θ_A1|² − |θ_A2|² at exactly 2 tr(Π_A H Σ) and leaves ⟨θ_A, 1⟩ alone (docs/theory.md)."""
    model = {"name": "mlp", "widths": [6], "activation": "relu"}
    study = _study(lr=0.1, steps=2, model=model, loss="cross_entropy", n=48)
    problem = flowlab.build(study).problem
    S0 = float(torch.linalg.eigvalsh(_dense_hessian(problem, problem.theta0)).max())
    lr = 2.4 / S0
    study = _study(lr=lr, steps=4, model=model, loss="cross_entropy", n=48,
                   flows=[{"name": "central_flow", "label": "central", "eig_tol": 1e-8}]).with_overrides(
        ["symmetry.enabled=true"])
    ds = flowlab.run(study, tmp_path / "run").load()
    assert list(ds.status.values) == ["ok", "ok"], ds.status.values
    kinds = set(ds.group_kind.values)
    assert {"rescale", "translation"} <= kinds
    term = ds.central_term.sel(dynamics="central").values
    law = ds.central_law.sel(dynamics="central").values
    tr = ds.group_kind.values == "translation"
    assert np.abs(term[1:, ~tr]).max() > 0  # the term breaks the rescale quantities...
    scale = np.abs(law[1:, ~tr]).max()
    # ...by exactly the law: an identity of exact derivatives, up to rounding and the eigen-solver's
    # residual (H u_i are the solver's products; X from the same u_i)
    np.testing.assert_allclose(term[1:, ~tr], law[1:, ~tr], rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(term[1:, tr], 0.0, atol=1e-8 * scale)
    assert np.all(np.isnan(ds.central_term.sel(dynamics="sgd").values))


@pytest.mark.slow
def test_study_gd_hovers_at_the_edge_and_the_central_flow_holds_it(tmp_path):
    """studies/central_flow.toml (first 320 steps, the central flow alone beside GD): GD's sharpness
    rises to 2/η and, once its oscillation is established, hovers about 2/η; the central flow holds
    its own at 2/η within 5 % from the moment it reaches the edge."""
    from pathlib import Path

    from flowlab.flows import FlowsSection

    root = Path(__file__).resolve().parents[1]
    study = flowlab.load_study(root / "studies" / "central_flow.toml", ["optimizer.steps=320"])
    study = study.replace(sections={**study.sections, "flows": FlowsSection(study.sections["flows"].specs[:1])})
    ds = flowlab.run(study, tmp_path / "run").load()
    assert list(ds.status.values) == ["ok", "ok"], ds.status.values
    edge = 2.0 / study.optimizer.lr
    s_gd = ds.sharpness.sel(dynamics="sgd").values / edge
    s_c = ds.sharpness.sel(dynamics="central").values / edge
    onset = int(np.flatnonzero(s_gd >= 0.95)[0])
    assert s_gd[0] < 0.6  # it rises (progressive sharpening) ...
    # ... to the edge; after a possible overshoot (the unstable component grows from rounding level),
    # GD comes back within 5 % of 2/η and hovers there
    over = np.flatnonzero(s_gd[onset:] > 1.1)
    start = onset + 10
    if over.size:
        start = onset + over[0] + int(np.flatnonzero(s_gd[onset + over[0]:] <= 1.05)[0])
    hover = s_gd[start:-1]
    assert hover.size >= 40, (onset, start)
    assert 0.97 <= hover.mean() <= 1.2 and hover.min() >= 0.9 and hover.max() <= 1.3, (hover.mean(), hover.min(),
                                                                                          hover.max())
    # the central flow: at the edge from its first critical direction on, within 5 %
    crit = np.flatnonzero(ds.critical_directions.sel(dynamics="central").values >= 1)
    assert crit.size and abs(crit[0] - onset) <= 10
    assert np.max(np.abs(s_c[crit[0]:] - 1)) <= 0.05, np.max(np.abs(s_c[crit[0]:] - 1))


def test_a_resumed_central_flow_run_is_bitwise_the_uninterrupted_one(tmp_path):
    """Checkpoint and resume (flowlab.checkpoint) with the central flow's own state — the
    eigen-tracker's warm start, the last complementarity solution and the cached evaluation at the
    recorded θ (rebuilt from the tracker's state before it) — and the sharpness recorder's trackers:
    stopped at a safe point past the edge and resumed, every variable equals the uninterrupted run's."""
    import os
    import signal

    _, problem = _edge_problem(0.1)
    S0 = float(torch.linalg.eigvalsh(_dense_hessian(problem, problem.theta0)).max())
    lr = 2.5 / S0
    flows = [{"name": "central_flow", "label": "central"}]
    study = _study(lr=lr, steps=10, flows=flows, sharpness=True).with_overrides(["checkpoint.every=3",
                                                                                 "checkpoint.seconds=0"])
    full = flowlab.run(study, tmp_path / "full").load()
    assert full.critical_directions.sel(dynamics="central").max() >= 1

    class Term(flowlab.Recorder):
        def after_update(self, info):
            if info.step + 1 == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        flowlab.run(study, tmp_path / "cut", recorders=[Term()])
    resumed = flowlab.run(study, tmp_path / "cut", resume=True).load()
    bad = {}
    for name in full.data_vars:
        if name not in ("wall_seconds", "compile_seconds"):
            a, b = full[name].values, resumed[name].values
            if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                bad[name] = (float(np.nanmax(np.abs(a - b))), np.argwhere(~((a == b) | (np.isnan(a) & np.isnan(b))))[:3].tolist()) if a.dtype.kind == "f" else "differs"
    assert not bad, bad


def test_orders_refuses_the_central_flow_on_an_adaptive_integrator(tmp_path, capsys):
    """``flowlab orders`` builds its followers itself: the flow's own check runs there too (one line)."""
    from flowlab.cli import main

    study = tmp_path / "s.toml"
    study.write_text(textwrap.dedent("""
        [study]
        name = "o"
        dtype = "float64"
        device = "cpu"
        [model]
        name = "mlp"
        widths = [6]
        activation = "tanh"
        [data]
        name = "digits"
        n = 40
        [optimizer]
        lr = 0.1
        steps = 2
    """))
    rc = main(["orders", str(study), "--lr", "0.1,0.05", "--horizon", "0.2", "--flows", "central_flow",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "fixed-step integrator" in err, err
