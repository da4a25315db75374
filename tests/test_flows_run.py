"""Flows in a study run: lock step with SGD, full-batch L_λ, bad input, blow-ups, schedules, user
flows, and gradient-flow accuracy through conservation laws."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, small_study
from scipy.linalg import expm

import flowlab
from flowlab.cli import main as cli_main
from flowlab.errors import ConfigError
from flowlab.flows import Hyper, TorchOps, make_flow, make_integrator


def _run(tmp_path, raw, name="out"):
    return flowlab.run(flowlab.parse_study(raw), tmp_path / name).load()


def test_unknown_names_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="gradient_flow.*momentum_modified"):
        make_flow("gradiant_flow")
    with pytest.raises(ConfigError, match="did you mean 'gradient_flow'"):
        make_flow("gradiant_flow")
    with pytest.raises(ConfigError, match="torchdiffeq:dopri5.*flowlab:rk4|flowlab:rk4.*torchdiffeq:dopri5"):
        make_integrator("torchdiffeq:dopri7")
    with pytest.raises(ConfigError, match="flows.correctio = 'hvp': unknown option; allowed: correction, fd_step"):
        make_flow("modified_loss", {"correctio": "hvp"})
    with pytest.raises(ConfigError, match="fixed-step.*dt"):
        make_integrator("torchdiffeq:rk4")
    raw = small_study(flows=[{"name": "no_such_flow"}])
    with pytest.raises(ConfigError, match="^flows.0.name = 'no_such_flow'"):
        _run(tmp_path, raw)


def test_errors_name_the_field_as_set_accepts_it(tmp_path):
    """An error inside the second flow's integrator options names flows.1.integrator_options.max_steps,
    and ``--set`` takes that very path to fix it."""
    raw = small_study(optimizer={"steps": 2}, flows=[
        {"name": "gradient_flow", "integrator": "flowlab:rk4", "dt": 0.05, "label": "a"},
        {"name": "gradient_flow", "label": "b", "integrator_options": {"max_steps": -1}}])
    study = flowlab.parse_study(raw)
    with pytest.raises(ConfigError) as err:
        flowlab.run(study, tmp_path / "a")
    assert err.value.field == "flows.1.integrator_options.max_steps" and err.value.value == -1
    ds = flowlab.run(study.with_overrides([f"{err.value.field}=100"]), tmp_path / "b")
    assert list(ds.status.values) == ["ok", "ok", "ok"]
    with pytest.warns(DeprecationWarning, match="now named correction"):
        old = make_flow("modified_loss", {"hvp": "finite_difference"})
    assert old.correction == "finite_difference" and old.law(flowlab.flows.Hyper(0.1)) is None


def test_cli_lists_flows_and_integrators(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "flows:" in out and "modified_second_order" in out
    assert "integrators:" in out and "torchdiffeq:dopri5" in out and "flowlab:rk4" in out


def test_flows_beside_minibatch_sgd_integrate_the_full_batch_loss(tmp_path):
    flows = [{"name": "gradient_flow", "rtol": 1e-9, "atol": 1e-11},
             {"name": "modified_loss", "integrator": "flowlab:rk4", "dt": 0.05}]
    raw = small_study(optimizer={"lr": 0.1, "steps": 12, "batch_size": 32, "weight_decay": 1e-3},
                      record={"every": 3, "snapshot_every": 3, "projections": 4, "full_loss": True}, flows=flows,
                      # the theory's flow laws extend the ODE state (and so dopri5's error control): off here,
                      # so the run's flows are step-for-step the standalone ones below
                      theory={"flow_laws": False})
    ds = _run(tmp_path, raw)
    assert list(ds.dynamics.values) == ["sgd", "gradient_flow@torchdiffeq:dopri5", "modified_loss@flowlab:rk4"]
    assert list(ds.status.values) == ["ok", "ok", "ok"]
    # the same flows integrated alone over the full-batch L_λ give the same θ at the recording times:
    # the same steps, the same floating-point operations, so the same numbers bit for bit
    study = flowlab.parse_study(raw)
    problem = flowlab.build(study).problem
    hp = Hyper(lr=0.1, weight_decay=1e-3)
    for i, (name, integ) in enumerate([("gradient_flow", make_integrator("torchdiffeq:dopri5", rtol=1e-9, atol=1e-11)),
                                       ("modified_loss", make_integrator("flowlab:rk4", dt=0.05))], start=1):
        ops = TorchOps(problem)
        flow = make_flow(name)
        session = integ.start(flow, ops, hp, 0.0, flow.initial_state(problem.theta0.clone(), ops, hp))
        for j, t in enumerate(ds.snapshot.values):
            th = session.advance(float(t))[0]
            np.testing.assert_array_equal(ds.theta.isel(dynamics=i, snapshot=j).values, th.numpy())
            full = float(problem.full_loss(th))
            assert ds.loss.isel(dynamics=i).sel(time=t).item() == full
            assert ds.full_loss.isel(dynamics=i).sel(time=t).item() == full
    # bookkeeping: nfe grows, rk4 takes ⌈0.3/0.05⌉ = 6 steps of 4 evaluations per interval
    nfe = ds.nfe.values
    assert np.all(np.diff(nfe[1]) > 0)
    np.testing.assert_array_equal(nfe[2], 24 * np.arange(len(ds.time)))
    np.testing.assert_array_equal(nfe[0], ds.step.values + 1)
    # dopri5 (FSAL): 2 evaluations for its initial step (at the start, t = 0) + 6 per attempted step
    assert np.all((nfe[1] - 2) % 6 == 0), nfe[1]
    # what each dynamics computed: SGD one batch gradient per step and one at the last row (13);
    # each flow one full-batch gradient per field evaluation (modified_loss's HVPs are counted
    # apart), and none besides (the recorded losses are not gradient evaluations)
    np.testing.assert_array_equal(ds.n_grad_evals.values, [12 + 1, nfe[1, -1], nfe[2, -1]])


def test_a_flow_that_blows_up_is_stopped_and_the_others_go_on(tmp_path, monkeypatch):
    pkg = tmp_path / "userflows"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent('''
        from flowlab.flows import Flow

        class Explode(Flow):
            """θ' = c θ³ blows up in finite time t* = 1/(2c|θ0|²) (per coordinate)."""
            name = "explode"
            def __init__(self, c=1.0):
                self.c = c
            def vector_field(self, t, state, ops, hp):
                th = state[0]
                return (self.c * th * th * th,)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {
        "study": {"name": "boom", "dtype": "float64", "device": "cpu"},
        "model": {"name": "quadratic", "theta0": [1.0, 0.5]},
        "data": {"name": "points"},
        "optimizer": {"lr": 0.1, "steps": 10},
        "record": {"every": 1, "projections": 2},
        "flows": [
            {"name": "userflows:Explode", "label": "explode_dopri5", "c": 1.0, "integrator_options": {"max_steps": 2000}},
            {"name": "userflows:Explode", "label": "explode_rk4", "c": 1.0, "integrator": "flowlab:rk4", "dt": 0.1},
            {"name": "gradient_flow", "rtol": 1e-9},
        ],
    }
    ds = _run(tmp_path, raw)
    status = dict(zip(ds.dynamics.values, ds.status.values))
    assert status["sgd"] == "ok" and status["gradient_flow@torchdiffeq:dopri5"] == "ok"
    for label in ("explode_dopri5", "explode_rk4"):
        assert status[label].startswith(("blew up", "stopped")), status[label]
        i = list(ds.dynamics.values).index(label)
        d = ds.distance.isel(dynamics=i).values
        # t* = 0.5 for θ0 = 1: rows before t* are kept; from the stop on they are NaN
        stop = int(np.argmax(np.isnan(d)))
        assert stop > 0 and np.all(np.isfinite(d[:stop])) and np.all(np.isnan(d[stop:]))
        assert 0.5 - 1e-9 <= ds.time.values[stop] <= 0.7 + 1e-9, (label, ds.time.values[stop])
    assert np.all(np.isfinite(ds.distance.isel(dynamics=3).values))


def test_flows_go_on_when_sgd_diverges(tmp_path):
    """GD on L = ½θᵀAθ (eigenvalues 1 and 4) from θ0 = s·(1, −1), an eigenvector of λ = 4, with
    η = 2.75: θ_k = (1 − ηλ)^k θ0 = (−10)^k θ0, so L_k = 100^k · L0 with L0 = ½·4·|θ0|² = 4s².  The
    first k with L_k above the largest float64 is k*, with a factor ≥ 5 on either side (the loss's
    partial sums, θ·Aθ before the ½, differ from it by less, so the way it is summed cannot move k*).
    SGD stops at k* with 'diverged: non-finite loss at step k* (t = 2.75 k*)' and its row k* is
    recorded off the grid; the flow, fine itself, goes on to the end of the clock on the grid's
    times: its status is ok, its rows are finite to the last, and its distance to the stopped SGD
    is NaN after SGD's last row."""
    s = math.sqrt(10.0 ** 201.25 / 4)  # L0 = 10^201.25: k* is reached in a few dozen steps
    log_l0, log_max = math.log10(4 * s * s), math.log10(np.finfo(np.float64).max)
    k_star = math.ceil((log_max - log_l0) / 2)
    margin = math.log10(5.0)
    assert log_l0 + 2 * (k_star - 1) <= log_max - margin and log_l0 + 2 * k_star >= log_max + margin
    steps = k_star + 30
    assert k_star % 10 != 0  # so that row k* is off the grid
    raw = {
        "study": {"name": "diverge", "dtype": "float64", "device": "cpu"},
        "model": {"name": "quadratic", "theta0": [s, -s]},
        "data": {"name": "points"},
        "optimizer": {"lr": 2.75, "steps": steps},
        "record": {"every": 10, "projections": 2, "snapshot_every": "ends"},
        # rk4 is stable for dt·λ ≤ 2.78: dt = 0.5 (dt·λ = 2); the flow decays like e^{-4t}
        "flows": [{"name": "gradient_flow", "integrator": "flowlab:rk4", "dt": 0.5, "label": "gf"}],
    }
    ds = _run(tmp_path, raw)
    t_star = math.fsum([2.75] * k_star)
    assert list(ds.status.values) == [f"diverged: non-finite loss at step {k_star} (t = {t_star:.6g})", "ok"]
    # the grid's rows, SGD's row k* among them, up to the end of the clock
    want = sorted(set(range(0, steps + 1, 10)) | {k_star, steps})
    np.testing.assert_array_equal(ds.step.values, want)
    np.testing.assert_array_equal(ds.snapshot_step.values, [0, k_star, steps])
    at = want.index(k_star)
    loss = ds.loss.values
    assert np.all(np.isfinite(loss[0, :at])) and np.isinf(loss[0, at]) and np.all(np.isnan(loss[0, at + 1:]))
    assert np.all(np.isfinite(loss[1])) and np.all(np.isfinite(ds.theta.isel(dynamics=1).values))
    assert np.all(np.isnan(ds.theta.values[0, -1]))  # SGD has no θ at the end: it stopped
    assert np.all(np.diff(loss[1]) < 0)  # gradient flow: the loss decreases
    assert ds.flow_time.values[1, -1] == pytest.approx(2.75 * steps, rel=1e-15, abs=0)  # it ran to t_K
    dist = ds.distance.values[1]
    # finite before k*, measured at k* (|θ_{k*}| ~ 1e154: its square overflows the norm), NaN after
    assert np.all(np.isfinite(dist[:at])) and not np.isnan(dist[at]) and np.all(np.isnan(dist[at + 1:]))
    assert int(ds.n_grad_evals.values[0]) == k_star + 1  # SGD evaluated θ_0 … θ_{k*}


def test_orders_engine_stops_flows_with_sgd():
    """``followers_outlive_discrete=False`` (flowlab orders): the same divergence stops the flow
    with SGD, its status saying so, and nothing is integrated past t_{k*}."""
    from flowlab.engine import Clock, LockStep, Recording
    from flowlab.flows import FlowFollower
    from flowlab.sgd import DiscreteSGD

    s = math.sqrt(10.0 ** 201.25 / 4)
    raw = {"study": {"name": "diverge", "dtype": "float64", "device": "cpu"},
           "model": {"name": "quadratic", "theta0": [s, -s]}, "data": {"name": "points"},
           "optimizer": {"lr": 2.75, "steps": 100}}
    built = flowlab.build(flowlab.parse_study(raw))
    sgd = DiscreteSGD(built.problem, built.study.optimizer, built.lrs, 0)
    flow = FlowFollower(make_flow("gradient_flow"), make_integrator("flowlab:rk4", dt=0.5), built.problem, built.lrs,
                        label="gf")
    clock = Clock.of_run(built.lrs, 10)
    summary = LockStep(clock, sgd, [flow], [], Recording.discard(2, built.problem.device),
                       followers_outlive_discrete=False).run()
    k = sgd.step
    assert summary.status[0].startswith(f"diverged: non-finite loss at step {k} ")
    assert summary.status[1] == f"stopped with sgd ({summary.status[0]})"
    assert flow.flow_time == pytest.approx(clock.times[k], rel=1e-15)


def test_momentum_flows_refuse_nesterov(tmp_path):
    raw = small_study(optimizer={"lr": 0.1, "steps": 2, "momentum": 0.5, "nesterov": True},
                      flows=[{"name": "momentum_second_order"}])
    with pytest.raises(ConfigError, match="heavy ball"):
        _run(tmp_path, raw)


def test_a_schedule_restarts_the_flow_with_the_new_lr(tmp_path):
    """IGR depends on η: with a step schedule, θ follows the piecewise closed form."""
    A = np.array([[2.5, -1.5], [-1.5, 2.5]])
    theta0 = np.array([1.0, 0.25])
    raw = {
        "study": {"name": "sched", "dtype": "float64", "device": "cpu"},
        "model": {"name": "quadratic", "A": A.tolist(), "theta0": theta0.tolist()},
        "data": {"name": "points"},
        "optimizer": {"lr": 0.1, "steps": 10, "schedule": {"name": "step", "step_size": 4, "gamma": 0.5}},
        "record": {"every": 3, "snapshot_every": 1, "projections": 2},
        "flows": [{"name": "modified_loss", "rtol": 1e-11, "atol": 1e-13}],
    }
    ds = _run(tmp_path, raw)
    lrs = [0.1] * 4 + [0.05] * 4 + [0.025] * 2
    times = np.concatenate([[0.0], np.cumsum(lrs)])

    def exact(t):
        th, s = theta0.copy(), 0.0
        for k, eta in enumerate(lrs):
            end = min(times[k + 1], t)
            if end > s:
                th = expm(-(end - s) * (A + eta / 2 * A @ A)) @ th
                s = end
        return th

    # dopri5 at rtol 1e-11 over t ≤ 0.85: global error ≤ 10·rtol·|θ0| (as in test_flows_quadratic;
    # measured 1.1e-12)
    for j, t in enumerate(ds.snapshot.values):
        np.testing.assert_allclose(ds.theta.isel(dynamics=1, snapshot=j).values, exact(t), rtol=0,
                                   atol=10 * 1e-11 * np.abs(theta0).max())


def _conserved(W1, b1, W2):
    """Rescale (per hidden neuron: |incoming|² − |outgoing|²) and translation (column sums of the
    softmax layer) quantities of a one-hidden-layer net."""
    rescale = (W1**2).sum(1) + b1**2 - (W2**2).sum(0)
    translation = W2.sum(0)
    return rescale, translation


@pytest.mark.parametrize("activation", ["identity", "tanh"])
def test_gradient_flow_conserves_the_symmetry_quantities(tmp_path, activation):
    """GF at rtol 1e-10 (float64, λ = 0) conserves every rescale (deep linear) / translation
    (softmax layer) quantity.  Translation: the column sums of W2 are linear invariants (the
    gradient's column sums vanish: Σ_i (p_i − y_i) = 0), which every Runge–Kutta step keeps
    exactly, so they drift by round-off only, ≤ nfe·eps·scale.  Rescale: per hidden neuron i a
    quadratic invariant Q_i = |θ_in(i)|² − |θ_out(i)|², which Runge–Kutta steps keep only as well as
    they keep θ: |Q_i(θ) − Q_i(θ_exact)| ≤ 2|θ(i)||Δθ(i)| + |Δθ(i)|², with Δθ the global error,
    measured against the same flow integrated alone at a 100× tighter tolerance (whose own error,
    ~100× smaller, is allowed as 10% more).  (ReLU-type nets: see the integrators' note on kinks.)"""
    flows = [{"name": "gradient_flow", "rtol": 1e-10, "atol": 1e-12}]
    raw = small_study(model={"name": "mlp", "widths": [6], "activation": activation},
                      data={"name": "digits", "n": 64},
                      optimizer={"lr": 0.2, "steps": 20, "batch_size": "full"},
                      record={"every": 5, "snapshot_every": 5, "projections": 2}, flows=flows)
    ds = _run(tmp_path, raw)
    assert ds.status.values[1] == "ok"
    layout = flowlab.ParamLayout.from_dict(__import__("json").loads(ds.attrs["param_layout"]))
    thetas = ds.theta.isel(dynamics=1).values

    def parts(th):
        d = {e.name: th[e.slice].reshape(e.shape) for e in layout.entries}
        return d["1.weight"], d["1.bias"], d["3.weight"]

    def per_neuron_norm(th):  # |θ(i)|: neuron i's incoming row, bias and outgoing column
        W1, b1, W2 = parts(th)
        return np.sqrt((W1**2).sum(1) + b1**2 + (W2**2).sum(0))

    r0, t0 = _conserved(*parts(thetas[0]))
    nfe = int(ds.nfe.values[1, -1])
    eps = np.finfo(np.float64).eps
    problem = flowlab.build(flowlab.parse_study(raw)).problem
    ref, _ = make_integrator("torchdiffeq:dopri5", rtol=1e-12, atol=1e-14).trajectory(
        make_flow("gradient_flow"), problem, Hyper(lr=0.2), [float(t) for t in ds.snapshot.values[1:]])
    for th, th_ref in zip(thetas[1:], ref.numpy()):
        # the global error itself: dopri5 at rtol keeps it below 10·rtol·|θ| (as on the quadratic)
        assert np.abs(th - th_ref).max() <= 10 * 1e-10 * np.abs(th_ref).max()
        r, tr = _conserved(*parts(th))
        if activation == "identity":  # rescale symmetry needs a positively homogeneous activation
            d = per_neuron_norm(th - th_ref)
            assert np.all(np.abs(r - r0) <= 1.1 * (2 * per_neuron_norm(th_ref) * d + d * d)), (np.abs(r - r0), d)
        assert np.abs(tr - t0).max() <= nfe * eps * max(np.abs(t0).max(), 1.0)
    # and the parameters did move (the check is not vacuous)
    assert np.abs(thetas[-1] - thetas[0]).max() > 1e-2


def test_quickstart_study_parses_with_its_flows():
    study = flowlab.load_study(ROOT / "studies" / "quickstart.toml")  # from any working directory
    names = [f.name for f in study.flows]
    # heavy-ball SGD beside its own models (and gradient flow, the naive baseline): make demo's point
    assert study.optimizer.momentum > 0 and "gradient_flow" in names and "momentum_second_order" in names
    for f in study.flows:
        make_flow(f.name, {k: v for k, v in f.options.items() if k != "integrator_options"})
        make_integrator(f.integrator, f.rtol, f.atol, f.dt, f.options.get("integrator_options", {}))


def test_user_flow_class_in_memory():
    """A user flow only needs the interface (vector_field etc.): torch tensors in, tuples out."""
    flow = make_flow("flowlab.flows.library:GradientFlow")
    assert flow.order == 1 and flow.state_size == 1
    th = torch.ones(2, dtype=torch.float64)

    class Ops:
        def loss_and_grad(self, theta):
            return 0.5 * (theta @ theta), theta.clone()

    (d,) = flow.vector_field(0.0, (th,), Ops(), Hyper(lr=0.1, weight_decay=0.5))
    torch.testing.assert_close(d, -1.5 * th, rtol=0, atol=0)  # −(1 + 0.5·1): exact in binary
