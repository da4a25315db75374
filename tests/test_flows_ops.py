"""The torch ops a flow sees: gradient, HVP and third-derivative contraction of the full-batch L,
checked against central finite differences, with and without graph reuse, and across chunks.

Bounds.  Central differences: error c·ε² (truncation) + round-off ~eps·|f|/ε; the truncation is
measured by Richardson, c·ε² ≈ (4/3)|D(ε) − D(ε/2)|, and allowed twice over, plus the round-off
term with a factor 10.  Two ways of computing the same derivative (graph kept or not, chunks, the
R-operator engine vs autograd): the same sums in another order, so they agree to the rounding of
the longest sum, over the 96 (or 50) examples of the batch: n·eps norm-wise.
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_study

import flowlab
from flowlab.flows import TorchOps

EPS = 1e-4
EPS64 = float(torch.finfo(torch.float64).eps)


def _fd_bound(d_eps: torch.Tensor, d_half: torch.Tensor, f_scale: float) -> float:
    """Allowed |exact − D(ε)|: twice the Richardson estimate of the truncation error, plus 10× the
    round-off of a central difference of values of size f_scale."""
    return 2 * (4 / 3) * float(torch.linalg.vector_norm(d_eps - d_half)) + 10 * EPS64 * f_scale / EPS


def _close(a: torch.Tensor, b: torch.Tensor, n: int) -> None:
    """a equals b up to the rounding of sums of n terms, norm-wise: |a − b| ≤ n·eps·|b|."""
    gap = float(torch.linalg.vector_norm(a - b))
    assert gap <= n * EPS64 * float(torch.linalg.vector_norm(b)), (gap, float(torch.linalg.vector_norm(b)))


def _problem(chunk_size=None, model=None, loss=None):
    data = {"name": "digits", "n": 96}
    if chunk_size:
        data["chunk_size"] = chunk_size
    raw = small_study(data=data, model=model or {"name": "mlp", "widths": [12], "activation": "tanh"},
                      **({"loss": loss} if loss else {}))
    return flowlab.build(flowlab.parse_study(raw)).problem


@pytest.mark.parametrize("model", [
    {"name": "mlp", "widths": [12], "activation": "tanh"},
    {"name": "mlp", "widths": [10, 10], "activation": "tanh", "batchnorm": True},  # third derivatives through BN
])
def test_hvp_and_d3_match_finite_differences(model):
    problem = _problem(model=model)
    ops = TorchOps(problem, reuse_graph=False)
    gen = torch.Generator().manual_seed(3)
    th = problem.theta0.clone() + 0.1 * torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    v = torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    u = torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    v, u = v / v.norm(), u / u.norm()  # unit directions: the FD step is ε
    hv = ops.hvp(th, v)

    def fd(h):
        return (ops.grad(th + h * v) - ops.grad(th - h * v)) / (2 * h)

    g_scale = float(torch.linalg.vector_norm(ops.grad(th)))
    assert float(torch.linalg.vector_norm(hv - fd(EPS))) <= _fd_bound(fd(EPS), fd(EPS / 2), g_scale)
    # ⟨∇³L[v, v], u⟩ = d/ds vᵀH(θ + su)v
    d3 = ops.d3(th, v)

    def fd3(h):
        return (v @ ops.hvp(th + h * u, v) - v @ ops.hvp(th - h * u, v)) / (2 * h)

    assert abs(float(d3 @ u) - float(fd3(EPS))) <= _fd_bound(fd3(EPS), fd3(EPS / 2), abs(float(v @ hv)))
    # control: the bound is far below the quantities checked
    assert _fd_bound(fd(EPS), fd(EPS / 2), g_scale) < 1e-6 * float(torch.linalg.vector_norm(hv))


@pytest.mark.parametrize("model", [None, {"name": "mlp", "widths": [10], "activation": "tanh", "batchnorm": True}])
def test_graph_reuse_gives_the_same_numbers_and_kicks_in_after_grad_then_hvp(model):
    problem = _problem(model=model)
    plain, reuse = TorchOps(problem, reuse_graph=False), TorchOps(problem)
    th = problem.theta0.clone()
    for _ in range(3):  # the IGR pattern: G then H G at the same θ
        loss_r, g_r = reuse.loss_and_grad(th)
        hv_r = reuse.hvp(th, g_r)
        hhv_r = reuse.hvp(th, hv_r)
        d3_r = reuse.d3(th, g_r)
    assert reuse.reuse_graph is True
    loss_p, g_p = plain.loss_and_grad(th)
    n = problem.n
    _close(g_r, g_p, n)
    _close(hv_r, plain.hvp(th, g_p), n)
    _close(hhv_r, plain.hvp(th, plain.hvp(th, g_p)), n)
    _close(d3_r, plain.d3(th, g_p), n)
    # a different θ (a new tensor, or the same one modified) never uses a stale graph
    th2 = th + 0.01
    reuse.loss_and_grad(th)
    _close(reuse.hvp(th2, g_p), plain.hvp(th2, g_p), n)
    reuse.loss_and_grad(th2)
    th2.add_(0.01)
    _close(reuse.hvp(th2, g_p), plain.hvp(th2, g_p), n)


def test_chunked_full_batch_ops_equal_one_chunk():
    whole, chunked = _problem(), _problem(chunk_size=40)
    th = whole.theta0.clone()
    v = torch.linspace(-1, 1, whole.dim, dtype=torch.float64)
    a, b = TorchOps(whole), TorchOps(chunked)
    _close(a.grad(th), b.grad(th), whole.n)
    _close(a.hvp(th, v), b.hvp(th, v), whole.n)
    _close(a.d3(th, v), b.d3(th, v), whole.n)
    b.loss_and_grad(th)
    b.hvp(th, v)
    assert b.reuse_graph == "auto"  # several chunks: no graph kept


def test_d3_is_zero_on_a_quadratic():
    raw = {"study": {"device": "cpu"}, "model": {"name": "quadratic"}, "data": {"name": "points"},
           "optimizer": {"lr": 0.1, "steps": 1}}
    problem = flowlab.build(flowlab.parse_study(raw)).problem
    ops = TorchOps(problem)
    th = problem.theta0.clone()
    ops.loss_and_grad(th)
    assert torch.count_nonzero(ops.d3(th, torch.ones(2, dtype=torch.float64))) == 0
    assert torch.count_nonzero(problem.full_d3(th, torch.ones(2, dtype=torch.float64))) == 0


ENGINE_CASES = [
    ({"name": "mlp", "widths": [12, 8], "activation": "relu"}, {"name": "digits", "n": 50}, "cross_entropy"),
    ({"name": "mlp", "widths": [12, 8], "activation": "tanh", "batchnorm": True}, {"name": "digits", "n": 50},
     "cross_entropy"),
    ({"name": "mlp", "widths": [12], "activation": "leaky_relu"}, {"name": "digits", "n": 50}, "mse"),
    ({"name": "cnn", "channels": [4, 6], "batchnorm": True}, {"name": "digits", "n": 40, "image": True},
     "cross_entropy"),
    ({"name": "cnn", "channels": [4, 6], "pool": "avg", "activation": "tanh", "hidden": [5]},
     {"name": "digits", "n": 40, "image": True}, "mse"),
    ({"name": "vgg", "config": [4, "M", 8, "M"], "classifier": [10]}, {"name": "digits", "n": 40, "image": True},
     "cross_entropy"),
]


@pytest.mark.parametrize("model,data,loss", ENGINE_CASES)
def test_rop_engine_matches_autograd(model, data, loss):
    """The hand-written R-operator passes give autograd's gradient and double-backward HVP to
    round-off (float64), stand-alone and at the θ of a kept gradient."""
    from flowlab.flows.rop import engine_for

    problem = flowlab.build(flowlab.parse_study(small_study(model=model, data=data, loss={"name": loss}))).problem
    engine = engine_for(problem)
    assert engine is not None
    gen = torch.Generator().manual_seed(0)
    th = problem.theta0 + 0.05 * torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    v = torch.randn(problem.dim, generator=gen, dtype=torch.float64)
    batch = problem.batch()
    loss_e, g_e = engine.grad(th, batch)
    loss_a, g_a = problem.loss_and_grad(th, batch)
    hv_a = problem.hvp_double_backward(th, v, batch)
    engine.grad(th, batch)
    n = problem.n
    _close(loss_e.reshape(1), loss_a.reshape(1), n)
    _close(g_e, g_a, n)
    _close(engine.hvp(v), hv_a, n)
    _close(engine.standalone_hvp(th, batch, v), hv_a, n)


def test_engine_is_refused_for_what_it_does_not_know():
    from flowlab.flows.rop import engine_for

    assert engine_for(_problem(chunk_size=40)) is None  # several chunks
    raw = {"study": {"device": "cpu"}, "model": {"name": "quadratic"}, "data": {"name": "points"},
           "optimizer": {"lr": 0.1, "steps": 1}}
    assert engine_for(flowlab.build(flowlab.parse_study(raw)).problem) is None  # a model-computed loss


def test_two_ops_on_one_problem_never_mix_their_kept_state():
    problem = _problem()
    a, b, plain = TorchOps(problem), TorchOps(problem), TorchOps(problem, reuse_graph=False, engine=False)
    th1, th2 = problem.theta0.clone(), problem.theta0 + 0.01
    for ops, th in ((a, th1), (b, th2)):  # switch both to reuse mode
        ops.loss_and_grad(th)
        ops.hvp(th, th)
    _, g1 = a.loss_and_grad(th1)
    _, g2 = b.loss_and_grad(th2)  # reloads θ2 into the module: a's kept passes are stale now
    _close(a.hvp(th1, g1), plain.hvp(th1, g1), problem.n)
    _close(b.hvp(th2, g2), plain.hvp(th2, g2), problem.n)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "dopri8", "adaptive_heun"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_stage_solver_takes_torchdiffeqs_steps(method, dtype):
    """flowlab's torchdiffeq sessions keep the RK stages as contiguous rows (faster sums): the same
    method, summed in another order.  Where the error estimates are far above round-off (dopri5,
    bosh3, adaptive_heun here) it takes torchdiffeq's own steps and lands on its states to
    round-off; a high-order method whose error estimate is near round-off (dopri8 at rtol 1e-7 in
    float64) may pick slightly different steps, so there both must agree to their tolerance.

    The guard of flowlab's use of torchdiffeq's private internals (flowlab.flows._torchdiffeq): the
    fast path, interval by interval, against torchdiffeq's public ``odeint`` over all the times."""
    import torchdiffeq

    from flowlab.flows import _torchdiffeq

    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 40, generator=g, dtype=dtype) / 40 ** 0.5
    y0 = torch.randn(40, generator=g, dtype=dtype)
    t = [0.0, 0.7, 1.5, 3.0]
    rtol = 1e-7 if dtype == torch.float64 else 1e-4
    if method == "adaptive_heun":  # order 2: thousands of steps at 1e-7 (8 s); 1e-5 is still far above round-off
        rtol = max(rtol, 1e-5)
    calls, steps = {}, {}

    def field(tag):
        def f(t_, y):
            calls[tag] = calls.get(tag, 0) + 1
            return -torch.tanh(W @ y) - 0.1 * y

        return f

    class Counted:
        def __call__(self, t_, y):
            return field("torchdiffeq")(t_, y)

        def callback_accept_step(self, t0, y, dt):
            steps["torchdiffeq"] = steps.get("torchdiffeq", 0) + 1

    with torch.no_grad():
        ref = torchdiffeq.odeint(Counted(), y0, torch.tensor(t, dtype=torch.float64), rtol=rtol, atol=rtol / 100,
                                 method=method)
        solver = _torchdiffeq.adaptive_solver(field("rows"), y0, t[0], rtol=rtol, atol=rtol / 100, method=method,
                                              on_accept=lambda: steps.__setitem__("rows", steps.get("rows", 0) + 1))
        got = torch.stack([y0] + [solver.advance(t1) for t1 in t[1:]])
    assert solver.fast
    gap = float((got - ref).abs().max() / ref.abs().max())
    if method == "dopri8":
        assert gap <= 10 * rtol and calls["rows"] > 20
    else:
        assert calls["rows"] == calls["torchdiffeq"] > 20 and steps["rows"] == steps["torchdiffeq"]
        assert gap <= 1e3 * torch.finfo(dtype).eps


# ------------------------------------------------------------------ integrator contract


def test_one_tightened_for_every_kind_of_integrator():
    """Integrator.tightened: adaptive → rtol/atol ÷ factor (given, else the float64 defaults);
    fixed → dt ÷ factor, and a default step η ÷ factor through fixed_dt(hp)."""
    from flowlab.flows import Hyper, make_integrator
    from flowlab.flows.integrators import default_tolerances

    hp = Hyper(lr=0.1)
    adaptive = make_integrator("torchdiffeq:dopri5")
    t = adaptive.tightened(10.0)
    assert (t.rtol, t.atol) == tuple(x / 10.0 for x in default_tolerances(torch.float64))
    assert adaptive.rtol is None and type(t) is type(adaptive)
    assert make_integrator("torchdiffeq:bosh3", 1e-6, 1e-9).tightened(4.0).tols(torch.float32) == (1e-6 / 4.0, 1e-9 / 4.0)
    fixed = make_integrator("flowlab:rk4")
    assert fixed.fixed_dt(hp) == 0.1 and fixed.tightened(10.0).fixed_dt(hp) == 0.1 / 10.0
    assert fixed.tightened(10.0).tightened(2.0).fixed_dt(hp) == 0.1 / 20.0 and fixed.dt_divisor == 1.0
    given = make_integrator("torchdiffeq:rk4", dt=0.05).tightened(5.0)
    assert given.dt == 0.05 / 5.0 and given.fixed_dt(hp) == 0.05 / 5.0


def test_default_tolerances_are_defined_once():
    from flowlab.flows.integrators import default_tolerances

    assert default_tolerances(torch.float64) == default_tolerances("float64") == (1e-7, 1e-7 * 1e-2)
    assert default_tolerances(torch.float32) == (1e-5, 1e-5 * 1e-2)
    assert default_tolerances("float64", rtol=1e-9) == (1e-9, 1e-9 * 1e-2) and default_tolerances("float32", 1e-3, 1.0) == (1e-3, 1.0)


def test_land_modes_and_the_old_booleans():
    from flowlab.errors import ConfigError
    from flowlab.flows import INTEGRATORS

    rk4 = INTEGRATORS["flowlab:rk4"]
    assert rk4().land == rk4(land="auto").land == rk4(land=False).land == "interpolate"
    assert rk4(land="exact").land == rk4(land=True).land == "exact"
    with pytest.raises(ConfigError) as err:
        rk4(land="sometimes")
    assert err.value.field == "integrator_options.land"


@pytest.mark.parametrize("name,kwargs,field", [
    ("flowlab:rk4", {"rtol": 1e-6}, "rtol"),
    ("flowlab:rk4", {"atol": 1e-6}, "atol"),
    ("flowlab:rk4", {"check_every": -1}, "integrator_options.check_every"),
    ("torchdiffeq:rk4", {}, "dt"),
    ("torchdiffeq:dopri5", {"max_steps": 0}, "integrator_options.max_steps"),
])
def test_integrator_errors_name_fields_relative_to_the_flow(name, kwargs, field):
    from flowlab.errors import ConfigError
    from flowlab.flows import INTEGRATORS

    with pytest.raises(ConfigError) as err:
        INTEGRATORS[name](**kwargs)
    assert err.value.field == field
