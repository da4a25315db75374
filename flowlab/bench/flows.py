"""Flow integration and HVP cost against a raw PyTorch gradient, measured in one process.

    python -m flowlab.bench flows [--part gf|hvp|central|all] [--repeats R] [--threads 1]

``gf``: gradient flow integrated interval by interval (as in a run) by ``torchdiffeq:dopri5`` and
by ``flowlab:rk4``, on the narrow VGG-16 (batch 256 of 3×32×32, float32) and on the MLP
64-128-128-10 over the whole digits set (1797 examples, float32); printed: time ÷ (nfe × raw grad
time), where the raw grad time is a plain ``loss.backward()`` on an ``nn.Module`` copy of the model,
same batch.  Target ≤ 1.05 (on the VGG, where the gradient's FLOPs dominate; on the MLP a gradient
costs ~5 ms and the solver's per-step arithmetic on the 26k-vector shows as a few per cent;
flowlab's torchdiffeq sessions keep the stages as contiguous rows — torchdiffeq's own (m, 7)
layout with strided sums cost ~2.5 ms per dopri5 step here, 1.23 → 1.11 after the change).

``hvp``: H v ÷ raw grad time on the narrow VGG-16 (batch 256 of 3×32×32, float32, CPU) and on the
MLP: torch's double backward (``Problem`` method ``double_backward``), forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``), an HVP at a θ whose gradient was computed with its
autograd graph kept, flowlab's R-operator engine (:mod:`flowlab.flows.rop`: its gradient, an HVP at
the θ of that gradient — what a flow's vector field pays —, and a stand-alone HVP), and the whole
IGR field G + (η/2)HG ÷ grad.  Target: HVP ≤ 2.0 × grad.

``central``: the central flow's cost per unit of time ÷ gradient flow's, both by ``flowlab:euler``
with dt = η/4 (the reference's four substeps per GD step) on the study's network
(studies/central_flow.toml: tanh MLP 64-64-64-10, MSE, 500 digits, float64) at an η where θ0 is
already past the edge (η·λ_max(θ0) = 2.2): every evaluation pays a gradient, a warm-started LOBPCG
and the third-derivative contractions of its critical directions.  No target (the flow's extra
work is the point); printed with the HVPs and ``d3`` calls per evaluation.

Timing: repeats alternate the raw gradient and the measured operation; each ratio is a ratio of
medians, with the spread (min..max of the per-repeat ratios) beside it.  ``--clock cpu`` (default)
times with the process's CPU time, which on a shared machine measures the work done rather than
the waiting for a core (single-threaded, it equals wall time on an idle machine); ``--clock wall``
uses ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import flowlab
from flowlab.flows import Hyper, TorchOps, make_flow, make_integrator
from flowlab.flows.rop import engine_for


def _mlp_problem(dtype: str = "float32") -> flowlab.Built:
    raw = {
        "study": {"name": "bench_flows", "dtype": dtype, "device": "cpu", "seed": 0},
        "model": {"name": "mlp", "widths": [128, 128], "activation": "relu"},
        "data": {"name": "digits"},
        "loss": {"name": "cross_entropy", "hvp": "double_backward"},
        "optimizer": {"lr": 0.1, "steps": 1, "batch_size": "full"},
    }
    return flowlab.build(flowlab.parse_study(raw))


def _vgg_problem(batch: int = 256) -> flowlab.Problem:
    from flowlab.data import Data
    from flowlab.models import vgg16_narrow

    torch.manual_seed(0)
    X = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    net = vgg16_narrow()
    return flowlab.Problem(net, F.cross_entropy, Data(X, y, 10, "random"), dtype=torch.float32, device="cpu",
                           hvp="double_backward")


class RawGrad:
    """A plain ``loss.backward()`` on an independent copy of the problem's module."""

    def __init__(self, problem: flowlab.Problem):
        self.module = copy.deepcopy(problem.module)
        for p in self.module.parameters():  # own storage, ordinary leaf parameters
            p.data = p.data.clone()
            p.grad = None
        self.X, self.y, self.loss_fn = problem.X, problem.y, problem.loss_fn

    def __call__(self) -> None:
        for p in self.module.parameters():
            p.grad = None
        self.loss_fn(self.module(self.X), self.y).backward()


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = time.process_time


def _time(fn, n: int = 1) -> float:
    t0 = _clock()
    for _ in range(n):
        fn()
    return (_clock() - t0) / n


def _ratio(fn, raw: RawGrad, repeats: int, per: float = 1.0, inner: int = 1) -> tuple[float, float, float]:
    """Median of fn's time ÷ (per × median raw grad time), alternating; plus the per-repeat spread."""
    fn()
    raw()
    a, b = [], []
    for _ in range(repeats):
        b.append(_time(raw, inner))
        a.append(_time(fn))
        b.append(_time(raw, inner))
    rb = statistics.median(b)
    per_rep = [a[i] / (per * (b[2 * i] + b[2 * i + 1]) / 2) for i in range(repeats)]
    return statistics.median(a) / (per * rb), min(per_rep), max(per_rep)


def _gf_rows(label: str, problem: flowlab.Problem, repeats: int, horizon: float, intervals: int,
             integrators: tuple) -> list[tuple[str, float, float, float]]:
    raw = RawGrad(problem)
    flow = make_flow("gradient_flow")
    hp = Hyper(lr=0.1)
    t_raw = statistics.median(_time(raw) for _ in range(5))
    print(f"raw grad ({label}): {t_raw * 1e3:.2f} ms")
    rows = []
    for name, kw in integrators:
        integ = make_integrator(name, **kw)
        info = {}

        def integrate(integ=integ, info=info):
            ops = TorchOps(problem)
            session = integ.start(flow, ops, hp, 0.0, (problem.theta0.clone(),))
            for i in range(1, intervals + 1):
                session.advance(horizon * i / intervals)
            info["nfe"] = session.nfe

        integrate()
        nfe = info["nfe"]
        r, lo, hi = _ratio(integrate, raw, repeats, per=nfe, inner=nfe)
        rows.append((f"{label}: GF {name} ({nfe} nfe), wall ÷ (nfe × raw grad)", r, lo, hi))
    return rows


def bench_gf(repeats: int) -> list[tuple[str, float, float, float]]:
    """Gradient flow on the narrow VGG (FLOPs dominate: the criterion) and on the MLP (a cheap
    gradient next to 26k-vector solver arithmetic: the overhead shows)."""
    vgg = _gf_rows("narrow VGG-16, batch 256", _vgg_problem(), max(2, repeats // 2), horizon=0.5, intervals=4,
                   integrators=(("torchdiffeq:dopri5", {"rtol": 1e-3, "atol": 1e-5}), ("flowlab:rk4", {"dt": 0.25})))
    mlp = _gf_rows("MLP 64-128-128-10, digits", _mlp_problem().problem, repeats, horizon=4.0, intervals=20,
                   integrators=(("torchdiffeq:dopri5", {"rtol": 1e-5, "atol": 1e-7}), ("flowlab:rk4", {"dt": 0.05}),
                                ("torchdiffeq:rk4", {"dt": 0.05})))
    return vgg + mlp


def _hvp_rows(label: str, problem: flowlab.Problem, repeats: int) -> list[tuple[str, float, float, float]]:
    raw = RawGrad(problem)
    th = problem.theta0.clone()
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(1)).to(th.dtype)
    batch = problem.batch()
    rows = [(f"{label}: HVP double backward", *_ratio(lambda: problem.hvp_double_backward(th, v, batch), raw, repeats)),
            (f"{label}: HVP forward-over-reverse", *_ratio(lambda: problem.hvp_forward_over_reverse(th, v, batch), raw, repeats))]
    state = {}

    def grad_graph():
        state["g"] = problem.grad_graph(th, batch)[2]

    grad_graph()
    rows.append((f"{label}: gradient with graph kept", *_ratio(grad_graph, raw, repeats)))
    rows.append((f"{label}: HVP at the θ of a kept gradient", *_ratio(lambda: state["g"].hvp(v), raw, repeats)))
    engine = engine_for(problem)
    if engine is not None:
        rows.append((f"{label}: R-op engine gradient", *_ratio(lambda: engine.grad(th, batch), raw, repeats)))
        engine.grad(th, batch)
        rows.append((f"{label}: R-op engine HVP at the θ of its gradient",
                     *_ratio(lambda: engine.hvp(v), raw, repeats)))
        rows.append((f"{label}: R-op engine HVP stand-alone", *_ratio(lambda: engine.standalone_hvp(th, batch, v),
                                                                       raw, repeats)))
    flow = make_flow("modified_loss")
    hp = Hyper(lr=0.1)
    for name, ops in (("autograd graph reuse", TorchOps(problem, engine=False)), ("R-op engine", TorchOps(problem))):
        flow.vector_field(0.0, (th,), ops, hp)
        flow.vector_field(0.0, (th,), ops, hp)  # reuse is on from the second call
        rows.append((f"{label}: IGR field G + (η/2)HG ({name})",
                     *_ratio(lambda ops=ops: flow.vector_field(0.0, (th,), ops, hp), raw, repeats)))
    return rows


def bench_hvp(repeats: int) -> list[tuple[str, float, float, float]]:
    return (_hvp_rows("narrow VGG-16, batch 256", _vgg_problem(), repeats)
            + _hvp_rows("MLP 64-128-128-10, digits", _mlp_problem().problem, repeats))


def _central_problem() -> tuple[flowlab.Problem, float]:
    raw = {
        "study": {"name": "bench_central", "dtype": "float64", "device": "cpu", "seed": 0},
        "model": {"name": "mlp", "widths": [64, 64, 64], "activation": "tanh"},
        "data": {"name": "digits", "n": 500},
        "loss": {"name": "mse"},
        "optimizer": {"lr": 0.2, "steps": 1, "batch_size": "full"},
    }
    problem = flowlab.build(flowlab.parse_study(raw)).problem
    from flowlab.spectrum import EigenTracker, HessianAt

    s0 = EigenTracker(2).solve(HessianAt(problem, problem.theta0), problem.theta0).top
    return problem, 2.2 / s0


def bench_central(repeats: int, horizon_steps: int = 5) -> list[tuple[str, float, float, float]]:
    """Central flow ÷ gradient flow, time per unit t, both by flowlab:euler with dt = η/4 (module
    docstring); the flows start past a warm-up of 2η (the eigen-solver warm, its block grown)."""
    problem, eta = _central_problem()
    hp = Hyper(lr=eta)
    T = horizon_steps * eta
    flows = {"gf": make_flow("gradient_flow"), "central": make_flow("central_flow")}
    opsd = {k: TorchOps(problem) for k in flows}
    integ = make_integrator("flowlab:euler", dt=eta / 4)
    start = {}
    for k, f in flows.items():  # warm-up
        ses = integ.start(f, opsd[k], hp, 0.0, f.initial_state(problem.theta0.clone(), opsd[k], hp))
        start[k] = ses.advance(2 * eta)
    info: dict = {}

    def run(k):
        def go():
            ops = opsd[k]
            before = dict(ops.counts)
            ses = integ.start(flows[k], ops, hp, 0.0, tuple(x.clone() for x in start[k]))
            ses.advance(T)
            info[k] = {c: ops.counts[c] - before[c] for c in ops.counts}
            info[k]["nfe"] = ses.nfe
        return go

    a, b = [], []
    for _ in range(max(1, repeats)):
        b.append(_time(run("gf")))
        a.append(_time(run("central")))
    per = [x / y for x, y in zip(a, b)]
    c = info["central"]
    k = flows["central"]._cache.k if flows["central"]._cache is not None else 0
    name = (f"tanh MLP 64-64-64-10 (500 digits, f64) at η·λ_max(θ0) = 2.2: central flow ÷ gradient flow per unit t, "
            f"flowlab:euler dt = η/4 ({c['hvp'] / c['nfe']:.1f} HVPs + {c['d3'] / c['nfe']:.1f} d3 per evaluation, "
            f"{k} critical)")
    return [(name, statistics.median(a) / statistics.median(b), min(per), max(per))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowlab.bench flows", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("gf", "hvp", "central", "all"), default="all")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=tuple(CLOCK), default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCK[args.clock]
    print(f"clock: {args.clock}, threads: {args.threads}, torch {torch.__version__}")
    rows = []
    if args.part in ("gf", "all"):
        rows += bench_gf(args.repeats)
    if args.part in ("hvp", "all"):
        rows += bench_hvp(args.repeats)
    if args.part in ("central", "all"):
        rows += bench_central(args.repeats)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  ratio   (spread over {args.repeats} repeats, {args.clock} clock)")
    for name, r, lo, hi in rows:
        print(f"{name:<{width}}  {r:5.2f}   ({lo:.2f}..{hi:.2f})")
    return 0
