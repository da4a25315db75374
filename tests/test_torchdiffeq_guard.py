"""flowlab's use of torchdiffeq's private internals, and its guard (:mod:`flowlab.flows._torchdiffeq`).

The conformance test (flowlab's row-stage fast path takes torchdiffeq's own steps and lands on its
states to round-off) lives in tests/test_flows_ops.py (``test_row_stage_solver_takes_torchdiffeqs_steps``);
here: the installed torchdiffeq is recognised, and when it is not (a version outside the tested
range, a missing private module, a changed signature, a solver with its own stepping) flowlab falls
back to torchdiffeq's public ``odeint`` per recording interval, says so once, and still integrates.

Float64.  Bounds: the fallback IS ``torchdiffeq.odeint`` from each recording time to the next, so
against that chain of calls it is bitwise equal (the same calls on the same numbers); against one
``odeint`` call over all times (other step placement) both are within their global error of the
exact flow, ≤ steps·(rtol·|y|max + atol) (local errors ≤ the tolerance, added up without growth on
these contracting fields), so their gap is at most twice that.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchdiffeq

from flowlab.flows import _torchdiffeq as td

RTOL, ATOL = 1e-8, 1e-10
TIMES = [0.7, 1.5, 3.0]
RK_METHODS = ("dopri5", "bosh3", "dopri8", "adaptive_heun", "fehlberg2")


def _system(n: int = 30):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    y0 = torch.randn(n, generator=g, dtype=torch.float64)
    calls = {"n": 0}

    def f(t, y):
        calls["n"] += 1
        return -torch.tanh(W @ y) - 0.1 * y

    return f, y0, calls


@pytest.fixture
def fresh_notices(monkeypatch):
    """Each test sees the process as if nothing had been said yet."""
    monkeypatch.setattr(td, "_NOTICED", set())


def _break_version(mp):
    mp.setattr(td, "version", lambda: "0.3.0")
    return "0.3.0"


def _break_private_module(mp):
    def missing():
        raise ImportError("No module named 'torchdiffeq._impl.rk_common'")

    mp.setattr(td, "_privates", missing)
    return "rk_common"


def _break_step_signature(mp):
    from torchdiffeq._impl import rk_common

    real = rk_common._runge_kutta_step

    def changed(func, y0, f0, t0, dt, t1, tableau, extra=None):  # a new parameter; the same step
        return real(func, y0, f0, t0, dt, t1, tableau=tableau)

    mp.setattr(rk_common, "_runge_kutta_step", changed)
    return "_runge_kutta_step"


def _break_solver_shape(mp):
    from torchdiffeq._impl.odeint import SOLVERS

    class OwnStepping(SOLVERS["dopri5"]):
        def _adaptive_step(self, rk_state):
            return super()._adaptive_step(rk_state)

    mp.setitem(SOLVERS, "dopri5", OwnStepping)
    return "overrides _adaptive_step"


BREAKS = {"version": _break_version, "private_module": _break_private_module,
          "step_signature": _break_step_signature, "solver_shape": _break_solver_shape}


def test_installed_torchdiffeq_takes_the_fast_path():
    lo, hi = td.TESTED_RANGE
    assert lo <= td._parse(td.version()) < hi, td.version()
    for method in RK_METHODS:
        assert td.fast_path_problem(method) is None, method
    kinds = td.methods()
    assert {kinds[m] for m in RK_METHODS} == {"adaptive"} and kinds["rk4"] == kinds["euler"] == "fixed"
    f, y0, _ = _system()
    with warnings.catch_warnings():
        warnings.simplefilter("error", td.FallbackWarning)
        with torch.no_grad():
            assert td.adaptive_solver(f, y0, 0.0, rtol=RTOL, atol=ATOL, method="dopri5").fast


@pytest.mark.parametrize("break_it", list(BREAKS))
def test_unrecognised_torchdiffeq_falls_back_to_odeint_and_says_so_once(break_it, monkeypatch, fresh_notices):
    named = BREAKS[break_it](monkeypatch)
    reason = td.fast_path_problem("dopri5")
    assert reason is not None and named in reason

    f, y0, calls = _system()
    with pytest.warns(td.FallbackWarning) as record, torch.no_grad():
        steps = {"n": 0}
        solvers = [td.adaptive_solver(f, y0, 0.0, rtol=RTOL, atol=ATOL, method="dopri5",
                                      on_accept=lambda: steps.__setitem__("n", steps["n"] + 1)) for _ in range(3)]
        got = [solvers[0].advance(t) for t in TIMES]
    notices = [w for w in record if issubclass(w.category, td.FallbackWarning)]
    assert len(notices) == 1  # three solvers, one notice
    text = str(notices[0].message)
    assert named in text and "torchdiffeq.odeint" in text and "differ slightly" in text and "\n" not in text
    assert not any(s.fast for s in solvers)
    nfe, n_steps = calls["n"], steps["n"]

    # (b) exactly torchdiffeq.odeint from each recording time to the next (public API, same options)
    calls["n"] = 0
    counted = {"n": 0}

    class Counted:
        def __call__(self, t, y):
            return f(t, y)

        def callback_accept_step(self, t0, y0_, dt):
            counted["n"] += 1

    y, t0, chain = y0, 0.0, []
    with torch.no_grad():
        for t1 in TIMES:
            y = torchdiffeq.odeint(Counted(), y, torch.tensor([t0, t1], dtype=torch.float64), rtol=RTOL, atol=ATOL,
                                   method="dopri5")[-1]
            chain.append(y)
            t0 = t1
    for a, b in zip(got, chain):
        assert torch.equal(a, b)
    assert (nfe, n_steps) == (calls["n"], counted["n"]) and n_steps > 20

    # ... and, to its tolerance, one odeint call over all the times
    calls["n"] = 0
    with torch.no_grad():
        once = torchdiffeq.odeint(f, y0, torch.tensor([0.0, *TIMES], dtype=torch.float64), rtol=RTOL, atol=ATOL,
                                  method="dopri5")[1:]
    scale = float(once.abs().max())
    bound = 2 * n_steps * (RTOL * scale + ATOL)
    gap = float((torch.stack(got) - once).abs().max())
    assert gap <= bound, (gap, bound)


def _quadratic():
    from flowlab import losses, models
    from flowlab.data import Data
    from flowlab.problem import Problem

    A = ((2.5, -1.5, 0.0), (-1.5, 2.5, 0.3), (0.0, 0.3, 1.0))
    m = models.quadratic(A=A, theta0=(1.0, -0.5, 0.25))
    return Problem(m, losses.identity, Data(torch.zeros(1, 3), torch.zeros(1), None), dtype=torch.float64), A


def test_a_flow_runs_end_to_end_through_the_fallback(monkeypatch, fresh_notices):
    """(c) Integrator.trajectory with the fast path off: gradient flow on ½θᵀAθ, θ(t) = exp(−At)θ0."""
    from flowlab.flows import Hyper, make_flow, make_integrator

    problem, A = _quadratic()
    flow, hp = make_flow("gradient_flow"), Hyper(lr=0.1)
    times = [0.1, 0.25, 0.5, 1.0, 2.0]
    integ = make_integrator("torchdiffeq:dopri5", RTOL, ATOL)
    fast, fast_session = integ.trajectory(flow, problem, hp, times)
    assert fast_session.fast is True

    _break_version(monkeypatch)
    with pytest.warns(td.FallbackWarning) as record:
        slow, session = integ.trajectory(flow, problem, hp, times)
        again, again_session = integ.tightened(10.0).trajectory(flow, problem, hp, times)
    assert sum(issubclass(w.category, td.FallbackWarning) for w in record) == 1
    assert session.fast is False and session.steps > 0 and session.nfe > session.steps

    At = torch.tensor(A, dtype=torch.float64)
    exact = torch.stack([torch.linalg.matrix_exp(-At * t) @ problem.theta0 for t in times])
    scale = float(exact.abs().max())
    for got, s, tol in ((slow, session, 1.0), (fast, fast_session, 1.0), (again, again_session, 0.1)):
        bound = s.steps * tol * (RTOL * scale + ATOL)
        assert float((got - exact).abs().max()) <= bound
