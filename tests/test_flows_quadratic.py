"""Every flow against its closed form on the quadratic L = ½θᵀAθ (the paper's Fig. 4 A), float64.

On a quadratic every flow is a linear ODE: θ(t) = expm(tM) θ0 (or the (θ, θ') system), with M
written here from docs/theory.md#continuous-models-of-sgd independently of the flow code.  Tolerances follow from the solver's:
dopri5 at rtol 1e-10 / atol 1e-12 over t ≤ 2.5 (a few dozen steps, each held to rtol) keeps the
global error below 10·rtol·|θ0| (measured: ~1e-11); fixed-step RK4 must show its order 4 when dt halves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import expm

import flowlab
from flowlab.flows import FLOWS, Hyper, TorchOps, make_flow, make_integrator

A = np.array([[2.5, -1.5], [-1.5, 2.5]])
THETA0 = np.array([1.0, 0.25])
I2 = np.eye(2)
RTOL, ATOL = 1e-10, 1e-12


def system(name: str, hp: Hyper) -> tuple[np.ndarray, np.ndarray, float]:
    """(M, initial state, time shift) of the linear ODE each flow is on this quadratic."""
    eta, lam, beta = hp.lr, hp.weight_decay, hp.momentum
    Al = A + lam * I2
    G0 = Al @ THETA0
    if name == "gradient_flow":
        return -Al, THETA0, 0.0
    if name == "modified_loss":
        return -(Al + eta / 2 * Al @ Al), THETA0, 0.0
    if name == "modified_second_order":  # ∇³L = 0 on a quadratic
        return -(Al + eta / 2 * Al @ Al + eta**2 / 3 * Al @ Al @ Al), THETA0, 0.0
    if name == "modified_temporal":  # (η/2)θ'' + θ' = −Aλθ, θ'(0) = −Aλθ0
        M = np.block([[np.zeros((2, 2)), I2], [-2 / eta * Al, -2 / eta * I2]])
        return M, np.concatenate([THETA0, -G0]), 0.0
    if name == "momentum_first_order":
        return -Al / (1 - beta), THETA0, eta * beta / (1 - beta)
    if name == "momentum_second_order":  # (η(1+β)/2)θ'' + (1−β)θ' = −Aλθ, θ'(0) = −Aλθ0/(1+β)
        m, c = eta * (1 + beta) / 2, 1 - beta
        M = np.block([[np.zeros((2, 2)), I2], [-Al / m, -c / m * I2]])
        return M, np.concatenate([THETA0, -G0 / (1 + beta)]), 0.0
    if name == "momentum_modified":
        return -(Al + eta * (1 + beta) / (2 * (1 - beta) ** 2) * Al @ Al) / (1 - beta), THETA0, eta * beta / (1 - beta)
    raise KeyError(name)


def closed_form(name: str, hp: Hyper, t: float) -> np.ndarray:
    M, y0, shift = system(name, hp)
    tau = max(t - shift, 0.0)
    return (expm(tau * M) @ y0)[:2]


def quadratic_study(flows: list[dict], lr=0.1, steps=20, weight_decay=0.05, momentum=0.0, every=1, **opt):
    raw = {
        "study": {"name": "quad", "dtype": "float64", "device": "cpu"},
        "model": {"name": "quadratic", "A": A.tolist(), "theta0": THETA0.tolist()},
        "data": {"name": "points"},
        "optimizer": {"lr": lr, "steps": steps, "weight_decay": weight_decay, "momentum": momentum, **opt},
        "record": {"every": every, "snapshot_every": 1, "projections": 2},
        "flows": flows,
    }
    return flowlab.parse_study(raw)


ALL = sorted(FLOWS)


def test_registry_has_the_contract_names():
    for name in ("gradient_flow", "modified_loss", "modified_temporal", "modified_second_order",
                 "momentum_first_order", "momentum_second_order", "momentum_modified"):
        assert name in FLOWS


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_every_flow_in_a_run_matches_its_closed_form(tmp_path, beta):
    flows = [{"name": n, "rtol": RTOL, "atol": ATOL} for n in ALL]
    flows.append({"name": "modified_loss", "correction": "finite_difference", "label": "igr_fd", "rtol": RTOL, "atol": ATOL})
    study = quadratic_study(flows, momentum=beta)
    ds = flowlab.run(study, tmp_path / "out").load()
    hp = Hyper(lr=0.1, weight_decay=0.05, momentum=beta)
    times = ds.snapshot.values
    assert len(times) == 21
    for i, label in enumerate(ds.dynamics.values[1:], start=1):
        name = "modified_loss" if label == "igr_fd" else label.split("@")[0]
        assert ds.status.values[i] == "ok", (label, ds.status.values[i])
        want = np.stack([closed_form(name, hp, t) for t in times])
        got = ds.theta.isel(dynamics=i).values
        err = np.abs(got - want).max()
        dtheta = 10 * RTOL * np.abs(THETA0).max()
        assert err <= dtheta, (label, err)
        # the loss a flow reports is the full-batch L at its θ (L = ½θᵀAθ, no weight decay): off the
        # exact L by what the θ error allows, |ΔL| ≤ |Aθ||Δθ| + ½λ_max|Δθ|² with |Δθ| ≤ √2·dtheta
        loss = 0.5 * np.einsum("ti,ij,tj->t", want, A, want)
        d = np.sqrt(2) * dtheta
        bound = np.linalg.norm(want @ A, axis=1) * d + 0.5 * np.linalg.eigvalsh(A).max() * d * d
        assert np.all(np.abs(ds.loss.isel(dynamics=i).values - loss) <= bound), label
        # distance is measured against the discrete run at the same t: the norm of the same two
        # recorded vectors' difference, up to the rounding of a 2-term sum and a square root
        sgd = ds.theta.isel(dynamics=0).values
        np.testing.assert_allclose(ds.distance.isel(dynamics=i).values, np.linalg.norm(got - sgd, axis=1),
                                   rtol=4 * np.finfo(np.float64).eps, atol=0)


def test_first_order_momentum_flows_are_recorded_with_the_time_shift(tmp_path):
    beta, lr = 0.75, 0.05  # shift = 3 steps
    study = quadratic_study([{"name": "momentum_first_order", "rtol": RTOL, "atol": ATOL}], lr=lr, steps=10,
                            momentum=beta)
    ds = flowlab.run(study, tmp_path / "out").load()
    shift = lr * beta / (1 - beta)
    # t − s, one rounding of a subtraction of numbers ≤ 0.5
    np.testing.assert_allclose(ds.flow_time.isel(dynamics=1).values, np.maximum(ds.time.values - shift, 0.0), rtol=0,
                               atol=np.finfo(np.float64).eps)
    got = ds.theta.isel(dynamics=1).values
    np.testing.assert_array_equal(got[:4], np.tile(THETA0, (4, 1)))  # t ≤ s: not started, θ0 itself
    assert np.abs(got[4] - THETA0).max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_sessions_interval_by_interval_match_closed_form(name):
    """The integrator contract directly: start() then advance() over uneven intervals."""
    hp = Hyper(lr=0.2, weight_decay=0.1, momentum=0.5 if "momentum" in name else 0.0)
    study = quadratic_study([], lr=0.2, weight_decay=0.1)
    problem = flowlab.build(study).problem
    ops = TorchOps(problem)
    flow = make_flow(name)
    integ = make_integrator("torchdiffeq:dopri5", rtol=RTOL, atol=ATOL)
    state = flow.initial_state(problem.theta0.clone(), ops, hp)
    session = integ.start(flow, ops, hp, 0.0, state)
    M, y0, _ = system(name, hp)
    for t in (0.013, 0.3, 0.31, 1.0, 2.5):
        y = session.advance(t)
        got = torch.cat([s.reshape(-1) for s in y]).numpy()
        want = expm(t * M) @ y0
        assert np.abs(got - want).max() <= 10 * RTOL * max(1.0, np.abs(y0).max()), (name, t)
    assert session.nfe > 0 and session.steps > 0


def _rk4_error(name: str, dt: float, integrator: str = "flowlab:rk4") -> float:
    hp = Hyper(lr=0.2, weight_decay=0.1, momentum=0.5 if "momentum" in name else 0.0)
    problem = flowlab.build(quadratic_study([], lr=0.2, weight_decay=0.1)).problem
    ops = TorchOps(problem)
    flow = make_flow(name)
    session = make_integrator(integrator, dt=dt).start(flow, ops, hp, 0.0, flow.initial_state(problem.theta0.clone(), ops, hp))
    M, y0, _ = system(name, hp)
    y = session.advance(1.0)
    return float(np.abs(torch.cat([s.reshape(-1) for s in y]).numpy() - expm(M) @ y0).max())


@pytest.mark.parametrize("name,integrator,order", [
    ("gradient_flow", "flowlab:rk4", 4), ("modified_second_order", "flowlab:rk4", 4),
    ("momentum_second_order", "flowlab:rk4", 4), ("modified_loss", "flowlab:euler", 1),
    ("gradient_flow", "flowlab:midpoint", 2), ("gradient_flow", "torchdiffeq:rk4", 4),
])
def test_fixed_step_integrators_converge_at_their_order(name, integrator, order):
    errs = [_rk4_error(name, dt, integrator) for dt in (0.05, 0.025, 0.0125)]
    slopes = np.diff(np.log(errs)) / np.diff(np.log([0.05, 0.025, 0.0125]))
    assert np.all(np.abs(slopes - order) < 0.25), (errs, slopes)


def test_fixed_step_lands_exactly_on_recording_times_and_counts_nfe():
    problem = flowlab.build(quadratic_study([], lr=0.1, weight_decay=0.0)).problem
    ops = TorchOps(problem)
    flow = make_flow("gradient_flow")
    hp = Hyper(lr=0.1)
    integ = make_integrator("flowlab:rk4", dt=0.04, options={"land": True})
    session = integ.start(flow, ops, hp, 0.0, (problem.theta0.clone(),))
    session.advance(0.1)  # ⌈0.1/0.04⌉ = 3 equal steps of 1/30
    assert session.steps == 3 and session.nfe == 12 and session.t == 0.1
    assert ops.counts["grad"] == 12


@pytest.mark.parametrize("name", ["gradient_flow", "momentum_second_order", "modified_temporal"])
def test_fixed_step_dense_output_is_fourth_order_between_grid_points(name):
    """Default mode: steps of exactly dt, recording times in between by Hermite interpolation —
    the error at off-grid times still falls as dt⁴, and the steps do not depend on the intervals."""
    hp = Hyper(lr=0.2, weight_decay=0.1, momentum=0.5 if "momentum" in name else 0.0)
    problem = flowlab.build(quadratic_study([], lr=0.2, weight_decay=0.1)).problem
    M, y0, _ = system(name, hp)
    flow = make_flow(name)
    errs = []
    for dt in (0.04, 0.02, 0.01):
        ops = TorchOps(problem)
        session = make_integrator("flowlab:rk4", dt=dt).start(flow, ops, hp, 0.0, flow.initial_state(problem.theta0.clone(), ops, hp))
        err = 0.0
        for t in (0.013, 0.2, 0.37, 0.5, 0.977):
            y = torch.cat([s.reshape(-1) for s in session.advance(t)]).numpy()
            err = max(err, float(np.abs(y - expm(t * M) @ y0).max()))
        errs.append(err)
        assert session.steps == int(np.ceil(0.977 / dt - 1e-9))
        assert session.nfe <= 4 * session.steps + 1
    slopes = np.diff(np.log(errs)) / np.diff(np.log([0.04, 0.02, 0.01]))
    assert np.all(slopes > 3.7), (errs, slopes)
