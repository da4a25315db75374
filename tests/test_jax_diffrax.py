"""diffrax integrators: closed forms, agreement with the torch integrators, one compilation per
study, result codes, and a study run that holds both backends in one Dataset.

Float64 throughout.  Bounds from round-off: the same tableau on the same steps in both backends
(fixed step; or adaptive dopri5 vs Dopri5, which take the same step decisions) gives the same
states up to nfe·eps relative (each evaluation of the field — torch's model or its JAX twin, which
agree to a few eps — adds about one unit of relative round-off to the state, and nothing amplifies
it over these short, stable horizons; measured ≤ 0.05·nfe·eps for the fixed-step pairs).
"""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flowlab import losses, models, parse_study
from flowlab.data import Data
from flowlab.errors import FlowlabError
from flowlab.problem import Problem

torch.set_num_threads(1)
jax = pytest.importorskip("jax")
pytest.importorskip("diffrax")
from flowlab.flows import FlowStopped, Hyper, make_flow, make_integrator  # noqa: E402
from flowlab.flows.library import BUILTIN_FLOWS  # noqa: E402
from flowlab.flows.torch_ops import TorchOps  # noqa: E402

EPS = float(np.finfo(np.float64).eps)
HP = {"gd": Hyper(lr=0.1, weight_decay=1e-3), "heavy_ball": Hyper(lr=0.1, weight_decay=1e-3, momentum=0.5)}


def hp_for(flow) -> Hyper:
    return HP[getattr(flow, "discrete", "gd")]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


def quadratic_problem(A=((2.5, -1.5), (-1.5, 2.5)), theta0=(1.0, -0.5)) -> Problem:
    m = models.quadratic(A=A, theta0=theta0)
    return Problem(m, losses.identity, Data(torch.zeros(1, len(theta0)), torch.zeros(1), None), dtype=torch.float64)


def mlp_problem(activation="tanh", widths=(6,), n=12, chunk_size=None, batchnorm=False) -> Problem:
    torch.manual_seed(0)
    m = models.mlp(widths=list(widths), activation=activation, batchnorm=batchnorm, input_shape=(3,), num_outputs=2)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)
    return Problem(m.double(), losses.cross_entropy, Data(X, y, 2), dtype=torch.float64, chunk_size=chunk_size,
                   hvp="forward_over_reverse")


def linear_field_matrix(flow, p: Problem, hp: Hyper) -> np.ndarray:
    """On a quadratic every flow's field is linear in the state: its matrix, probed column by
    column through the torch ops (independent of JAX and diffrax)."""
    ops = TorchOps(p)
    m = p.dim * flow.state_size
    cols = []
    for j in range(m):
        e = torch.zeros(m, dtype=torch.float64)
        e[j] = 1.0
        state = tuple(e[i * p.dim:(i + 1) * p.dim] for i in range(flow.state_size))
        with torch.no_grad():
            cols.append(torch.cat([c.reshape(-1) for c in flow.vector_field(0.0, state, ops, hp)]))
    return torch.stack(cols, 1).numpy()


# Shared problems and flow objects: kernels are compiled once per (flow object, problem, settings),
# so tests that integrate the same flow on the same problem reuse one compilation.
QUAD = quadratic_problem()
MLP = mlp_problem()
FLOWS = {name: make_flow(name) for name in BUILTIN_FLOWS}
TIMES = [0.1, 0.2, 0.35, 0.5]


def closed_form(flow, p: Problem, times) -> np.ndarray:
    hp = hp_for(flow)
    M = linear_field_matrix(flow, p, hp)
    with torch.no_grad():
        y0 = torch.cat([s.reshape(-1) for s in flow.initial_state(p.theta0.clone(), TorchOps(p), hp)]).numpy()
    return np.stack([(scipy.linalg.expm(M * t) @ y0)[:p.dim] for t in times])


# ------------------------------------------------------------------------ closed forms


def check_closed_form(solver: str, names, rtol: float) -> None:
    """θ(t) = [exp(Mt) y0]_θ with M the flow's (linear) field on the quadratic.  Over t ≤ 2 with
    |M| ≤ 2/η = 20 (the temporal form) the global error of a rtol-controlled solver stays below
    1e3·rtol (local errors ≤ rtol, a few hundred steps, no growth: M is stable)."""
    times = [0.25 * k for k in range(1, 9)]
    for name in names:
        flow = FLOWS[name]
        exact = closed_form(flow, QUAD, times)
        got, session = make_integrator(f"diffrax:{solver}", rtol=rtol, atol=rtol * 1e-2).trajectory(flow, QUAD,
                                  hp_for(flow), times)
        err = np.abs(got.numpy() - exact).max() / np.abs(exact).max()
        assert err <= 1e3 * rtol, (solver, name, err)
        assert session.nfe > 0 and session.steps > 0


def test_flows_on_the_quadratic_match_their_closed_forms():
    check_closed_form("Dopri5", ["modified_temporal", "modified_second_order"], 1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("solver,rtol", [("Dopri5", 1e-10), ("Tsit5", 1e-10), ("Dopri8", 1e-10), ("Heun", 1e-7),
                                         ("Bosh3", 1e-8), ("Kvaerno5", 1e-9)])
def test_every_flow_on_the_quadratic_matches_its_closed_form(solver, rtol):
    check_closed_form(solver, BUILTIN_FLOWS, rtol)


def test_fixed_step_euler_is_first_order_on_the_quadratic():
    """Euler's global error halves with dt (order 1 measured on the closed form)."""
    flow = FLOWS["gradient_flow"]
    exact = closed_form(flow, QUAD, [1.0])[0]
    errs = []
    euler = make_integrator("diffrax:Euler", dt=0.02)
    for factor in (1, 2, 4):
        got, s = euler.tightened(factor).trajectory(flow, QUAD, hp_for(flow), [0.5, 1.0])
        errs.append(np.abs(got[-1].numpy() - exact).max())
        assert s.nfe == s.steps == 50 * factor
    slopes = np.diff(np.log(errs)) / np.diff(np.log([0.02, 0.01, 0.005]))
    assert np.all(np.abs(slopes - 1.0) < 0.1), slopes


# ---------------------------------------------------------------- cross-backend agreement


def check_fixed_agreement(p: Problem, names, pairs=(("torchdiffeq:rk4", "diffrax:RK4_38"),), scale: float = 1.0) -> None:
    """``scale`` shrinks η, dt and the times together (for stiff models: explicit RK4 needs
    dt·λ_max(H) ≲ 2.8).  The same tableau on the same grid: ≤ nfe·eps relative (module docstring)."""
    times = [t * scale for t in TIMES]
    for torch_name, jax_name in pairs:
        for name in names:
            flow = FLOWS[name]
            hp = hp_for(flow)
            hp = Hyper(lr=hp.lr * scale, weight_decay=hp.weight_decay, momentum=hp.momentum)
            a, _ = make_integrator(torch_name, dt=0.025 * scale).trajectory(flow, p, hp, times)
            b, sb = make_integrator(jax_name, dt=0.025 * scale).trajectory(flow, p, hp, times)
            assert max_rel(b, a) <= sb.nfe * EPS, (torch_name, name, max_rel(b, a), sb.nfe)
            assert sb.steps == 4 + 4 + 6 + 6  # ⌈Δt/dt⌉ equal steps per interval, landing on every time


def test_same_tableau_agrees_across_backends():
    """(a) torchdiffeq's rk4 (the 3/8 rule) and diffrax:RK4_38, from the same θ0 on a tanh MLP:
    ≤ nfe·eps relative (third-derivative and second-order-state flows; every flow on every zoo
    model, chunked ones included, in the slow test below)."""
    check_fixed_agreement(MLP, ["modified_second_order", "momentum_second_order"])
    # control: the metric sees a change of tableau (classic RK4 vs the 3/8 rule) far above the bound
    flow = FLOWS["modified_second_order"]
    a, _ = make_integrator("flowlab:rk4", dt=0.025).trajectory(flow, MLP, hp_for(flow), TIMES)
    b, _ = make_integrator("torchdiffeq:rk4", dt=0.025).trajectory(flow, MLP, hp_for(flow), TIMES)
    assert max_rel(b, a) > 1e3 * 80 * EPS  # 80 evaluations: far above the bound


def zoo_problem(name: str) -> Problem:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "quadratic":
        return quadratic_problem()
    shapes = {"linear": (4,), "deep_linear": (4,), "mlp_tanh": (4,), "mlp_relu": (4,), "mlp_bn": (4,),
              "cnn_max_bn": (2, 6, 6), "cnn_avg": (2, 6, 6), "vgg_small_bn": (3, 4, 4), "vgg_small": (3, 4, 4),
              "vgg16_narrow": (3, 32, 32)}
    builders = {
        "linear": lambda: models.linear(input_shape=(4,), num_outputs=3),
        "deep_linear": lambda: models.deep_linear(widths=[5, 4], input_shape=(4,), num_outputs=3),
        "mlp_tanh": lambda: models.mlp(widths=[6], activation="tanh", input_shape=(4,), num_outputs=3),
        "mlp_relu": lambda: models.mlp(widths=[6], activation="relu", input_shape=(4,), num_outputs=3),
        "mlp_bn": lambda: models.mlp(widths=[6], batchnorm=True, input_shape=(4,), num_outputs=3),
        "cnn_max_bn": lambda: models.cnn(channels=[3, 4], batchnorm=True, input_shape=(2, 6, 6), num_outputs=3),
        "cnn_avg": lambda: models.cnn(channels=[3, 4], pool="avg", input_shape=(2, 6, 6), num_outputs=3),
        "vgg_small_bn": lambda: models.vgg(config=[4, "M", 6, "M"], classifier=[8], input_shape=(3, 4, 4), num_outputs=3),
        "vgg_small": lambda: models.vgg(config=[4, "M", 6, "M"], classifier=[8], batchnorm=False,
                                        input_shape=(3, 4, 4), num_outputs=3),
        "vgg16_narrow": lambda: models.vgg16_narrow(num_outputs=3),
    }
    n = 4 if name == "vgg16_narrow" else 10
    X, y = torch.randn(n, *shapes[name], generator=g), torch.randint(0, 3, (n,), generator=g)
    loss = losses.mse if name == "deep_linear" else losses.cross_entropy
    return Problem(builders[name]().double(), loss, Data(X, y, 3), dtype=torch.float64,
                   chunk_size=4 if name.startswith("cnn") else None, hvp="forward_over_reverse")


ZOO = ["quadratic", "linear", "deep_linear", "mlp_tanh", "mlp_relu", "mlp_bn", "cnn_max_bn", "cnn_avg", "vgg_small_bn",
       "vgg_small"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ZOO + [pytest.param("vgg16_narrow", marks=pytest.mark.slow)])
def test_every_flow_on_every_zoo_model_agrees_across_backends(model):
    check_fixed_agreement(zoo_problem(model), BUILTIN_FLOWS,
                          pairs=(("torchdiffeq:rk4", "diffrax:RK4_38"), ("flowlab:rk4", "diffrax:RK4")),
                          scale=0.02 if model == "vgg16_narrow" else 1.0)


def dopri5_pair(p: Problem, name: str, rtol: float, times, max_steps: int = 10_000) -> list[dict]:
    """torchdiffeq:dopri5 and diffrax:Dopri5 on the same flow, problem and tolerances, advanced
    together interval by interval; per recording time, each one's counts, the end of its last
    accepted step and θ."""
    flow = FLOWS[name]
    hp = hp_for(flow)
    sessions = {}
    for backend, iname in (("torch", "torchdiffeq:dopri5"), ("jax", "diffrax:Dopri5")):
        integ = make_integrator(iname, rtol=rtol, atol=rtol * 1e-2, options={"max_steps": max_steps})
        ops = integ.make_ops(p)
        with torch.no_grad():
            state = tuple(flow.initial_state(p.theta0.clone(), ops, hp))
        sessions[backend] = (integ, integ.start(flow, ops, hp, 0.0, state))
    if not sessions["torch"][1].fast:  # tests/test_torchdiffeq_guard.py: the fast path on a tested torchdiffeq
        pytest.skip("torchdiffeq's public fallback restarts every interval: not the steps the kernel carries on")
    rows = []
    for t in times:
        row = {"t": t}
        for backend, (integ, s) in sessions.items():
            theta = integ.to_torch(flow.theta(s.advance(t)), p.theta0)
            if backend == "torch":
                # torchdiffeq's dopri5 evaluates the field twice for its initial-step heuristic (f0
                # and one probe), then 6 times per attempted step (FSAL: the 7th stage of a step is
                # the next one's first), accepted or not: its rejections follow from its nfe
                assert (s.nfe - 2) % 6 == 0, s.nfe
                rejected = (s.nfe - 2) // 6 - s.steps
                t_last = float(s.solver.solver.rk_state.t1)
            else:
                rejected, t_last = s.rejected, float(s.carry["tprev"])
            row[backend] = {"nfe": s.nfe, "accepted": s.steps, "rejected": rejected, "t_last": t_last,
                            "theta": theta.detach().clone()}
        rows.append(row)
    return rows


def check_same_decisions(rows: list[dict], rtol: float) -> float:
    """diffrax:Dopri5 takes torchdiffeq:dopri5's step decisions (the same initial-step heuristic
    and I controller); returns the largest relative θ gap.

    - accepted and rejected counts equal at every recording time;
    - nfe: diffrax's first attempt, and each retry of it, evaluates the FSAL stage itself, so
      1 ≤ nfe_jax − nfe_torch ≤ 1 + rejected;
    - step times: the two compute the error estimate e = ‖y_err/(atol + rtol|y|)‖ with sums in
      another order; y_err = h Σ b̂_i k_i cancels down to ~e·rtol|y| from terms of size |hf| ≤ |y|,
      so e differs by ≲ eps/rtol relative, the step factor e^(-1/5) by less, and the end of the
      last accepted step by ≤ t·eps/rtol (differences of steps add, none is amplified: the next
      step follows from the error of this one, not from its size);
    - θ: the same steps give the same states to round-off, ≤ nfe·eps relative."""
    gap = 0.0
    for row in rows:
        a, b = row["torch"], row["jax"]
        assert (b["accepted"], b["rejected"]) == (a["accepted"], a["rejected"]), row["t"]
        assert 1 <= b["nfe"] - a["nfe"] <= 1 + a["rejected"], (row["t"], a["nfe"], b["nfe"])
        assert abs(a["t_last"] - b["t_last"]) <= a["t_last"] * EPS / rtol, (row["t"], a["t_last"], b["t_last"])
        rel = float(torch.linalg.vector_norm(b["theta"] - a["theta"]) / torch.linalg.vector_norm(a["theta"]))
        assert rel <= a["nfe"] * EPS, (row["t"], rel, a["nfe"])
        gap = max(gap, rel)
    assert rows[-1]["torch"]["accepted"] > 0
    return gap


def test_adaptive_dopri5_takes_torchdiffeqs_steps_on_smooth_models():
    """(b) torchdiffeq dopri5 vs diffrax Dopri5 at rtol 1e-10 on smooth models: the same step
    decisions, hence the same states to round-off (check_same_decisions)."""
    times = [0.2 * k for k in range(1, 11)]
    for p in (QUAD, MLP):
        check_same_decisions(dopri5_pair(p, "gradient_flow", 1e-10, times), 1e-10)


@pytest.mark.slow
def test_adaptive_dopri5_takes_torchdiffeqs_steps_every_flow():
    times = [0.2 * k for k in range(1, 11)]
    for p in (QUAD, MLP):
        for name in BUILTIN_FLOWS:
            check_same_decisions(dopri5_pair(p, name, 1e-10, times), 1e-10)


# ---------------------------------------------------------------- the kernel itself


def test_kernel_steps_like_diffeqsolve():
    """One interval with exact landing is diffeqsolve's own loop: the same accepted and rejected
    steps, and the same end state to round-off (first step given: diffeqsolve wraps its terms and
    then skips the initial-step heuristic, using 0.01)."""
    import diffrax as dfx

    flow, hp = FLOWS["modified_temporal"], HP["gd"]
    integ = make_integrator("diffrax:Dopri5", rtol=1e-7, atol=1e-9, options={"land": "exact", "first_step": 0.3})
    ops = integ.make_ops(QUAD)
    s0 = tuple(flow.initial_state(QUAD.theta0.clone(), ops, hp))
    session = integ.start(flow, ops, hp, 0.0, s0)
    session.advance(1.5)
    y0 = tuple(session._as_jax(s) for s in s0)
    term = dfx.ODETerm(lambda t, y, args: tuple(flow.vector_field(t, y, ops, hp)))
    sol = dfx.diffeqsolve(term, dfx.Dopri5(), 0.0, 1.5, 0.3, y0, saveat=dfx.SaveAt(t1=True),
                          stepsize_controller=dfx.PIDController(rtol=1e-7, atol=1e-9), max_steps=100_000)
    assert session.steps == int(sol.stats["num_accepted_steps"])
    assert session.rejected == int(sol.stats["num_rejected_steps"]) and session.rejected > 0
    # the same operations in the same order (measured: identical); allowed: one rounding
    # difference per step, should XLA order a sum differently in the two programs
    scale = max(float(np.abs(np.asarray(y)).max()) for y in sol.ys)
    for mine, theirs in zip(session.state, sol.ys):
        assert float(np.abs(np.asarray(mine) - np.asarray(theirs[0])).max()) <= session.steps * EPS * scale
    # evaluations from the tableau: Dopri5 has 7 stages and is FSAL.  No initial-step heuristic
    # (first_step given), no extra evaluation for the state at t = 1.5 (land = "exact": a step
    # ends there).  An attempt with no FSAL stage yet — the first one, and every retry of it after
    # a rejection (a rejected step keeps the solver state) — evaluates all 7 stages; every later
    # attempt 6 (its first stage is the last one of the step accepted before it).  r0, the
    # rejections before the first acceptance, from diffrax's solver and controller called alone:
    r0 = first_step_rejections(term, y0, 0.3, rtol=1e-7, atol=1e-9)
    attempts = int(sol.stats["num_accepted_steps"]) + int(sol.stats["num_rejected_steps"])
    assert r0 >= 1  # the case of a retried first step is exercised
    assert session.nfe == 7 * (1 + r0) + 6 * (attempts - 1 - r0)


def first_step_rejections(term, y0: tuple, dt0: float, rtol: float, atol: float) -> int:
    """Attempts Dopri5 with diffrax's PID controller rejects before accepting its first step from
    (0, y0), trying dt0 first (diffrax's solver.step and controller.adapt_step_size, as
    diffeqsolve's loop calls them)."""
    import diffrax as dfx
    import equinox as eqx

    solver, ctrl = dfx.Dopri5(), dfx.PIDController(rtol=rtol, atol=atol)
    order = solver.error_order(term)
    t1, cstate = ctrl.init(term, 0.0, dt0, y0, dt0, None, solver.func, order)
    sstate = solver.init(term, 0.0, t1, y0, None)

    @eqx.filter_jit
    def attempt(t1, cstate):
        y1, y_err, _, _, _ = solver.step(term, 0.0, t1, y0, None, sstate, False)
        keep, _, t1, _, cstate, _ = ctrl.adapt_step_size(0.0, t1, y0, y1, None, y_err, order, cstate)
        return keep, t1, cstate

    for rejected in range(50):
        keep, t1, cstate = attempt(t1, cstate)
        if bool(keep):
            return rejected
    raise AssertionError("no first step accepted in 50 attempts")


@pytest.mark.parametrize("solver", ["Dopri5", pytest.param("Heun", marks=pytest.mark.slow),
                                    pytest.param("Dopri8", marks=pytest.mark.slow)])
def test_evaluation_count_from_the_tableau_equals_the_run_time_count(solver):
    flow, hp = FLOWS["gradient_flow"], HP["gd"]
    times = [0.1, 0.3, 0.35, 0.8]
    counts = []
    for runtime in (False, True):
        rtol = 1e-6 if solver == "Heun" else 1e-10
        integ = make_integrator(f"diffrax:{solver}", rtol=rtol, atol=rtol * 1e-2)
        integ.count_at_runtime = runtime  # a host callback in the field counts every evaluation
        _, s = integ.trajectory(flow, QUAD, hp, times)
        counts.append((s.nfe, s.steps, s.rejected))
    assert counts[0] == counts[1] and counts[0][0] > 0


def test_compiled_once_per_study():
    """Intervals of any length, a restarted session and a tightened copy reuse one compilation."""
    flow, hp = FLOWS["gradient_flow"], HP["gd"]
    integ = make_integrator("diffrax:Dopri5", rtol=1e-10, atol=1e-12)
    times = np.cumsum([0.013, 0.2, 0.05, 0.31, 0.007, 0.1])
    _, session = integ.trajectory(flow, MLP, hp, times)
    assert session.kernel.traces == {"init": 1, "advance": 1}
    integ.trajectory(flow, MLP, hp, times[:3] * 0.9)
    integ.tightened(10.0).trajectory(flow, MLP, hp, times)
    assert session.kernel.traces == {"init": 1, "advance": 1}
    fixed = make_integrator("diffrax:RK4_38", dt=0.025)
    flow, hp = FLOWS["momentum_second_order"], HP["heavy_ball"]
    _, s2 = fixed.trajectory(flow, MLP, hp, times)  # ⌈Δt/dt⌉ differs per interval: a traced count
    fixed.tightened(2.0).trajectory(flow, MLP, hp, times)
    assert s2.kernel.traces == {"init": 1, "advance": 1}


def test_compile_seconds_count_nested_events_once(monkeypatch):
    """JAX reports each compile event when it ends, and a trace can contain others (ops compiled
    while tracing): compile_seconds is the union of their time spans, not the sum."""
    from flowlab.jaxbackend import _runtime

    monkeypatch.setitem(_runtime._compile, "seconds", 0.0)
    monkeypatch.setitem(_runtime._compile, "spans", [])
    event = _runtime._COMPILE_EVENTS[0]
    _runtime._on_event(event, 0.5)  # an inner event: [t1 − 0.5, t1]
    _runtime._on_event(event, 2.0)  # the trace around it, reported later: [t2 − 2, t2] ⊃ [t1 − 0.5, t1]
    assert _runtime._compile["seconds"] == pytest.approx(2.0, rel=0, abs=1e-12)
    _runtime._on_event("/jax/some/other/event", 5.0)  # not a compile event
    assert _runtime._compile["seconds"] == pytest.approx(2.0, rel=0, abs=1e-12)


def test_blow_up_and_step_limits_stop_the_flow_with_a_reason():
    """Each way a diffrax flow stops gives its own reason (every message ends in '(diffrax:…)', so
    the reason itself is matched)."""
    import re

    p = quadratic_problem(A=((-50.0, 0.0), (0.0, 1.0)))  # θ1' = 50 θ1: θ1 = e^{50t}
    flow, hp = FLOWS["gradient_flow"], Hyper(lr=0.1)
    # adaptive: the field 50·θ1 overflows at t* = (ln(max float64) − ln 50)/50 = 14.1174; from
    # there every attempt has a non-finite error estimate and is rejected, the step shrinks by
    # factormin until it underflows at the last accepted time, which closes in on t* (the
    # message prints it to 6 significant digits: ±5e-5 at 14.1)
    with pytest.raises(FlowStopped) as err:
        make_integrator("diffrax:Dopri5", rtol=1e-6).trajectory(flow, p, hp, [5.0, 20.0, 40.0])
    m = re.fullmatch(r"blew up: step size underflow at t=(\S+) \(diffrax:Dopri5\) \(nfe=\d+\)", str(err.value))
    assert m, str(err.value)
    t_star = (math.log(np.finfo(np.float64).max) - math.log(50.0)) / 50.0
    assert abs(float(m.group(1)) - t_star) <= 5e-5, (m.group(1), t_star)
    # fixed step: Euler multiplies θ1 by 1 + 50·dt = 6 per step, so the state overflows after
    # ⌈ln(max)/ln 6⌉ = 397 steps (t = 39.7), inside the last interval (20, 40]: reported there
    n_over = math.ceil(math.log(np.finfo(np.float64).max) / math.log(6.0))
    assert 20.0 < n_over * 0.1 <= 40.0
    with pytest.raises(FlowStopped) as err:
        make_integrator("diffrax:Euler", dt=0.1).trajectory(flow, p, hp, [5.0, 20.0, 40.0])
    assert re.fullmatch(r"blew up: non-finite state at t=40 \(diffrax:Euler\) \(nfe=\d+\)", str(err.value)), str(err.value)
    # a step limit: 5 attempts in the interval (0, 1], stopped at the end of the last accepted
    # step, with 2 (initial-step heuristic) + 6 per attempt + 1 per attempt of the first step
    with pytest.raises(FlowStopped) as err:
        make_integrator("diffrax:Dopri5", rtol=1e-12, options={"max_steps": 5}).trajectory(flow, QUAD, hp, [1.0])
    m = re.fullmatch(r"stopped: more than max_steps=5 steps in one interval at t=(\S+) \(diffrax:Dopri5\) \(nfe=(\d+)\)",
                     str(err.value))
    assert m and 0.0 < float(m.group(1)) < 1.0, str(err.value)
    assert 2 + 6 * 5 + 1 <= int(m.group(2)) <= 2 + 6 * 5 + 5, str(err.value)


def test_bad_options_are_rejected_by_name():
    with pytest.raises(FlowlabError, match="diffrax:RK4_38 is a fixed-step method"):
        make_integrator("diffrax:RK4_38", rtol=1e-6)
    with pytest.raises(FlowlabError, match="land"):
        make_integrator("diffrax:Dopri5", options={"land": "sometimes"})
    with pytest.raises(FlowlabError, match="unknown option"):
        make_integrator("diffrax:Dopri5", options={"max_step": 3})
    with pytest.raises(FlowlabError, match="integrator_options.conv.*'fft'.*auto, lax, im2col"):
        make_integrator("diffrax:Dopri5", options={"conv": "fft"})
    with pytest.raises(FlowlabError, match="integrator_options.precision.*'fast'.*highest, high, default"):
        make_integrator("diffrax:Dopri5", options={"precision": "fast"})
    with pytest.raises(FlowlabError, match="known: .*diffrax:Dopri5"):
        make_integrator("diffrax:dopri5")


def dot_precisions(closed_jaxpr) -> collections.Counter:
    """How many matrix products (dot_general) a jaxpr has at each precision, inner jaxprs (jit,
    while loops, conds, scans) included."""
    found: collections.Counter = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found[str(eqn.params["precision"])] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub.jaxpr)

    walk(closed_jaxpr.jaxpr)
    return found


def test_precision_option_reaches_the_kernel():
    """integrator_options.precision sets the precision of the model's matrix products inside the
    compiled kernel (what a GPU would run in TF32 at "high"/"default"): every product of the
    twin's loss-and-gradient carries it, and the kernel holds those products plus the solver's
    own, which do not change with the option."""
    import jax.lax as lax

    flow, hp = FLOWS["gradient_flow"], HP["gd"]
    solver_own = []
    for name, precision in (("highest", lax.Precision.HIGHEST), ("high", lax.Precision.HIGH),
                            ("default", lax.Precision.DEFAULT)):
        integ = make_integrator("diffrax:Dopri5", rtol=1e-6, options={"precision": name})
        ops = integ.make_ops(MLP)
        session = integ.start(flow, ops, hp, 0.0, (MLP.theta0.clone(),))
        model = dot_precisions(jax.make_jaxpr(ops._loss_and_grad)(session.carry["y"][0]))
        key = str((precision, precision))
        assert set(model) == {key} and model[key] > 0, (name, model)
        kernel = dot_precisions(jax.make_jaxpr(session.kernel._advance_adaptive)(
            session.carry, np.float64(0.1), np.float64(1e-6), np.float64(1e-8)))
        assert kernel[key] >= model[key], (name, kernel)
        kernel[key] -= model[key]
        solver_own.append(+kernel)
    assert solver_own[0] == solver_own[1] == solver_own[2], solver_own


# ------------------------------------------------------------------------- a real run


def test_study_with_both_backends_in_one_dataset(tmp_path, monkeypatch):
    """Both backends in one Dataset; compile time counted apart from wall time, checked with a fake
    clock: every trace of a kernel function (init, advance) adds FAKE seconds both to the clock the
    followers time themselves with and to JAX's compile-time counter, so compile_seconds // FAKE
    counts the traces and a wall time that kept any compile time would be ≥ FAKE.  (The run's
    real seconds are far below FAKE.)"""
    import types

    from flowlab import Run
    from flowlab.flows import follower
    from flowlab.jaxbackend import _diffrax

    FAKE = 1e4
    offset = [0.0]
    real_compile_seconds, real_clock = _diffrax.compile_seconds, follower.time.perf_counter
    def counted(original):
        def traced(self, *args):
            offset[0] += FAKE  # runs once per trace: jit calls the Python function only to trace it
            return original(self, *args)

        return traced

    for method in ("_init", "_advance_adaptive", "_advance_fixed"):
        monkeypatch.setattr(_diffrax.Kernel, method, counted(getattr(_diffrax.Kernel, method)))
    monkeypatch.setattr(_diffrax, "compile_seconds", lambda: real_compile_seconds() + offset[0])
    monkeypatch.setattr(follower, "time", types.SimpleNamespace(perf_counter=lambda: real_clock() + offset[0]))

    study = parse_study({
        "study": {"name": "both", "dtype": "float64", "device": "cpu"},
        "model": {"name": "mlp", "widths": [5], "activation": "tanh"},
        "data": {"name": "gaussian_mixture", "n": 24, "dim": 3, "classes": 2},
        "optimizer": {"lr": 0.1, "steps": 6, "batch_size": "full", "weight_decay": 1e-3},
        "record": {"every": 2, "projections": 2},
        # flowlab.theory's flow laws (on by default) are checked by their own tests
        "theory": {"flow_laws": False},
        "flows": [
            {"name": "modified_loss", "integrator": "torchdiffeq:rk4", "dt": 0.05, "label": "torch"},
            {"name": "modified_loss", "integrator": "diffrax:RK4_38", "dt": 0.05, "label": "jax"},
            {"name": "gradient_flow", "integrator": "diffrax:Dopri5", "rtol": 1e-9, "label": "jax_adaptive"},
        ],
    })
    ds = Run(study, tmp_path / "run", overwrite=True).execute()
    methods = [str(m) for m in ds.dynamics.values]
    assert methods == ["sgd", "torch", "jax", "jax_adaptive"]
    assert all(str(s) == "ok" for s in ds.status.values)
    i_torch, i_jax, i_adaptive = 1, 2, 3
    th = ds.theta.values
    # the same tableau on the same grid (48 evaluations): ≤ nfe·eps (module docstring)
    assert np.abs(th[i_torch] - th[i_jax]).max() <= 48 * EPS * np.abs(th[i_torch]).max()
    last = {name: ds[name].values[:, -1] for name in ("compile_seconds", "accepted_steps", "rejected_steps", "nfe")}
    assert math.isnan(last["compile_seconds"][i_torch])
    assert last["accepted_steps"][i_jax] == 3 * 4  # 3 intervals of 0.2, dt 0.05
    assert last["nfe"][i_jax] == 4 * 12
    acc, rej, nfe = (int(last[k][i_adaptive]) for k in ("accepted_steps", "rejected_steps", "nfe"))
    # Dopri5: 2 evaluations (initial-step heuristic) + 6 per attempt + 1 per attempt of the first step
    assert acc > 0 and 2 + 6 * (acc + rej) + 1 <= nfe <= 2 + 6 * (acc + rej) + 1 + rej
    # compiled once per flow: init at the first row (the session starts at t = 0), advance at the
    # first interval, nothing traced again for the later intervals
    for i in (i_jax, i_adaptive):
        traces = np.floor(ds.compile_seconds.values[i] / FAKE)
        np.testing.assert_array_equal(traces, [1, 2, 2, 2])
        # the compile time (≥ 2·FAKE on the fake clock) is not in the flow's wall time: counted in
        # units of FAKE, the wall time holds no trace (and the flow did run: it is not zero)
        wall = float(ds.wall_seconds.values[i])
        assert np.floor(wall / FAKE) == 0 and wall != 0.0


def test_diffrax_on_a_model_without_twin_says_so(tmp_path, monkeypatch):
    import sys
    import textwrap

    pkg = tmp_path / "jaxless"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Squared(nn.Module):
            def __init__(self, n_in, n_out):
                super().__init__()
                self.lin = nn.Linear(n_in, n_out)

            def forward(self, x):
                return self.lin(x) ** 2

        def net(input_shape=None, num_outputs=None):
            return Squared(input_shape[0], num_outputs)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("jaxless", None)
    from flowlab import Run

    study = parse_study({
        "study": {"dtype": "float64", "device": "cpu"}, "model": {"name": "jaxless:net"},
        "data": {"name": "gaussian_mixture", "n": 10, "dim": 3, "classes": 2},
        "optimizer": {"lr": 0.1, "steps": 2}, "flows": [{"name": "gradient_flow", "integrator": "diffrax:Tsit5"}],
    })
    with pytest.raises(FlowlabError, match=r"integrator = 'diffrax:Tsit5'.*no JAX twin.*Squared.*torchdiffeq"):
        Run(study, tmp_path / "out").execute()




@pytest.mark.slow
def test_adaptive_gap_on_a_relu_network_is_measured(capsys):
    """(b) on a ReLU MLP the field −∇L jumps across the kinks, so adaptive solvers crawl across them
    (nfe grows ~10× per 100× in rtol; rtol 1e-10 takes hours on 128 digits).  diffrax:Dopri5
    makes torchdiffeq's step decisions (same initial-step heuristic, same controller): asserted
    step by step (check_same_decisions: the same accepted and rejected counts at every recording
    time, the same step times to the round-off of the error estimate), so the two land on the
    same states to round-off accumulated over the steps, ≤ nfe·eps (README: 2.8e-15 at rtol 1e-6,
    nfe 1424; 3.2e-15 at rtol 1e-8, nfe 83 474: bounds 3.2e-13 and 1.9e-11).  The gap is printed."""
    study = parse_study({"study": {"dtype": "float64", "device": "cpu"},
                         "model": {"name": "mlp", "widths": [16], "activation": "relu"},
                         "data": {"name": "digits", "n": 128}, "optimizer": {"lr": 0.05, "steps": 1}})
    from flowlab import build

    p = build(study).problem
    times = [0.2 * k for k in range(1, 11)]
    found = {}
    for rtol in (1e-6, 1e-8):
        rows = dopri5_pair(p, "gradient_flow", rtol, times, max_steps=1_000_000)
        found[rtol] = (check_same_decisions(rows, rtol), rows[-1]["torch"], rows[-1]["jax"])
    with capsys.disabled():
        print("\nReLU MLP (digits 128, width 16), gradient flow to t = 2, torchdiffeq dopri5 vs diffrax Dopri5: "
              + ", ".join(f"max relative gap {g:.1e} at rtol {r:g} (nfe {a['nfe']} / {b['nfe']}, accepted "
                          f"{a['accepted']}, rejected {a['rejected']} each)" for r, (g, a, b) in found.items()))
