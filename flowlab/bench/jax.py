"""The JAX backend's costs, measured in one run on one machine.

    python -m flowlab.bench jax [--models mlp,vgg] [--flow gradient_flow] [--rtol 1e-6] [--dtype float64]
                                [--solver adaptive|fixed] [--dt DT] [--intervals 20] [--lr 0.05]
                                [--repeats 3] [--json out.json]

The ReLU VGG makes the field only piecewise smooth: adaptive solvers crawl over its kinks
(torchdiffeq:dopri5 at rtol 1e-6 took 2552 evaluations for the first interval of η = 0.05), so
compare it with ``--solver fixed`` (the same 3/8-rule RK4 tableau on both sides).

For each model (the MLP: widths 128-128 tanh on all 1797 digits; the narrow VGG-16 on 64 padded
MNIST images) and the flow (gradient flow by default), from the same θ0 over the same recording
times t_k = k·η (k = 1..intervals):

- ``grad_ms``: one jit-compiled full-batch gradient (``JaxOps.grad``), median of 5 calls measured
  right before each run (median over runs);
- ``diffrax``: a ``diffrax:Dopri5`` session advanced interval by interval exactly as a flowlab run
  does (compiled beforehand by a first session; wall time of a fresh session, median of repeats),
  with its nfe, and ``ratio = wall ÷ (nfe × grad time)`` (per run, median over runs) — the integrator's own overhead (1.00 means
  all time is in the vector field) — for the gradient flow the field is one gradient (for other
  flows the denominator is nfe × one jit vector-field evaluation);
- ``torchdiffeq``: ``torchdiffeq:dopri5`` at the same tolerances on the torch Problem, its wall time
  and nfe, and ``diffrax ÷ torchdiffeq`` wall time;
- ``compile_s``: the diffrax kernel's trace + compile time (kept out of every wall time above).

CPU runs are single-threaded on both sides (``torch.set_num_threads(1)``, XLA without the Eigen
thread pool) so the two libraries are compared like for like on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

MODELS = {
    "mlp": {"model": {"name": "mlp", "widths": [128, 128], "activation": "tanh"},
            "data": {"name": "digits"}, "label": "MLP 64-128-128-10 tanh, digits (1797)"},
    "vgg": {"model": {"name": "vgg16_narrow"}, "data": {"name": "mnist", "n": 64, "pad": 2},
            "label": "VGG-16 narrow (1/8 width, BN), MNIST 32×32 (64)"},
}


def _single_thread() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + extra).strip()
    import torch

    torch.set_num_threads(1)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _session_run(integ, flow, ops, hp, state0, times) -> tuple[float, Any]:
    t0 = time.perf_counter()
    session = integ.start(flow, ops, hp, 0.0, state0)
    for t in times:
        session.advance(t)
    if integ.backend == "jax":
        import jax

        jax.block_until_ready(session.state)
    return time.perf_counter() - t0, session


SOLVERS = {"adaptive": ("diffrax:Dopri5", "torchdiffeq:dopri5"), "fixed": ("diffrax:RK4_38", "torchdiffeq:rk4")}


def bench_model(key: str, flow_name: str, rtol: float, dtype: str, intervals: int, lr: float, repeats: int,
                log=print, solver: str = "adaptive", dt: float | None = None) -> dict[str, Any]:
    import jax
    import torch

    from flowlab import build, parse_study
    from flowlab.flows import Hyper, make_flow, make_integrator

    spec = MODELS[key]
    study = parse_study({"study": {"name": f"bench_jax_{key}", "dtype": dtype, "device": "cpu"},
                         "model": spec["model"], "data": spec["data"], "optimizer": {"lr": lr, "steps": 1}})
    problem = build(study).problem
    flow = make_flow(flow_name)
    hp = Hyper(lr=lr)
    times = [lr * k for k in range(1, intervals + 1)]
    atol = rtol * 1e-2
    dx_name, td_name = SOLVERS[solver]
    if solver == "fixed":
        dt = dt or lr / 2
        rtol = atol = None
    opts = {"rtol": rtol, "atol": atol, "dt": dt if solver == "fixed" else None}

    jx = make_integrator(dx_name, **opts)
    ops = jx.make_ops(problem)
    with torch.no_grad():
        state_t = tuple(flow.initial_state(problem.theta0.clone(), ops, hp))
    theta = jax.numpy.asarray(problem.theta0.cpu().numpy(), dtype=ops.dtype)
    # the unit: one jit gradient (for the gradient flow) or one jit vector-field evaluation
    if flow_name == "gradient_flow":
        unit_fn = ops.grad
        unit = "grad"
    else:
        state_j = tuple(jax.numpy.asarray(s.cpu().numpy(), dtype=ops.dtype) for s in state_t)
        field = jax.jit(lambda y: tuple(flow.vector_field(0.0, y, ops, hp)))
        unit_fn = lambda _th: field(state_j)  # noqa: E731
        unit = "field"
    jax.block_until_ready(unit_fn(theta))  # compile

    _session_run(jx, flow, ops, hp, state_t, times[:1])  # compiles the kernel
    compile_s = jx.stats["compile_seconds"]
    # the unit is re-measured right before each run (a shared machine drifts): ratio per run, median
    runs, ratios, units = [], [], []
    for _ in range(repeats):
        u = _median_time(lambda: jax.block_until_ready(unit_fn(theta)), 5)
        r = _session_run(jx, flow, ops, hp, state_t, times)
        runs.append(r)
        units.append(u)
        ratios.append(r[0] / (r[1].nfe * u))
    unit_s = statistics.median(units)
    dx_wall = statistics.median(r[0] for r in runs)
    dx_session = runs[-1][1]
    assert jx.stats["compile_seconds"] == compile_s, "the kernel was compiled again"

    td = make_integrator(td_name, **opts)
    td_ops = td.make_ops(problem)
    td_runs = [_session_run(td, flow, td_ops, hp, state_t, times) for _ in range(repeats)]
    td_wall = statistics.median(r[0] for r in td_runs)
    td_session = td_runs[-1][1]
    th_dx = jx.to_torch(flow.theta(dx_session.state), problem.theta0)
    th_td = flow.theta(td_session.state)
    gap = float(torch.linalg.vector_norm(th_dx - th_td) / torch.linalg.vector_norm(th_td))

    row = {
        "model": key, "label": spec["label"], "params": problem.dim, "examples": problem.n, "dtype": dtype,
        "flow": flow_name, "solver": f"{dx_name} / {td_name}", "rtol": rtol, "atol": atol, "dt": opts["dt"], "intervals": intervals, "lr": lr, "unit": unit,
        "unit_ms": unit_s * 1e3, "compile_s": compile_s,
        "diffrax_s": dx_wall, "diffrax_nfe": dx_session.nfe, "diffrax_steps": dx_session.steps,
        "diffrax_rejected": dx_session.rejected, "ratio": statistics.median(ratios),
        "torchdiffeq_s": td_wall, "torchdiffeq_nfe": td_session.nfe,
        "diffrax_over_torchdiffeq": dx_wall / td_wall, "theta_gap": gap,
    }
    log(f"{key:<4} {problem.dim:>8d} params  {unit} {row['unit_ms']:8.2f} ms  compile {compile_s:6.2f} s  "
        f"diffrax {dx_wall:7.3f} s (nfe {dx_session.nfe}, ratio {row['ratio']:.3f})  "
        f"torchdiffeq {td_wall:7.3f} s (nfe {td_session.nfe})  diffrax/torchdiffeq {row['diffrax_over_torchdiffeq']:.2f}  "
        f"|Δθ|/|θ| {gap:.1e}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowlab.bench jax", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,vgg", help="comma-separated: mlp, vgg")
    p.add_argument("--flow", default="gradient_flow")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--solver", default="adaptive", choices=list(SOLVERS),
                   help="adaptive: diffrax:Dopri5 vs torchdiffeq:dopri5 at --rtol (atol = rtol/100); fixed: "
                        "diffrax:RK4_38 vs torchdiffeq:rk4 (the same 3/8-rule tableau) at step --dt")
    p.add_argument("--dt", type=float, help="fixed step (default lr/2)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    p.add_argument("--intervals", type=int, default=20, help="recording intervals (each of length lr)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    _single_thread()
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        print(f"--models: unknown {unknown}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    import platform

    import jax
    import torch

    dt = args.dt or args.lr / 2
    solver = f"Dopri5 rtol {args.rtol:g}" if args.solver == "adaptive" else f"RK4 (3/8) dt {dt:g}"
    print(f"# flowlab.bench jax — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"jax {jax.__version__}, single-threaded; flow {args.flow}, "
          f"{solver}, {args.dtype}, "
          f"{args.intervals} recording intervals of η = {args.lr:g}")
    rows = [bench_model(k, args.flow, args.rtol, args.dtype, args.intervals, args.lr, args.repeats,
                        solver=args.solver, dt=args.dt) for k in keys]
    print()
    print(f"{'model':<6}{'params':>9}{'unit ms':>9}{'compile s':>10}{'diffrax s':>10}{'nfe':>6}{'ratio':>7}"
          f"{'torchdiffeq s':>14}{'nfe':>6}{'dfx/tde':>8}")
    for r in rows:
        print(f"{r['model']:<6}{r['params']:>9d}{r['unit_ms']:>9.2f}{r['compile_s']:>10.2f}{r['diffrax_s']:>10.3f}"
              f"{r['diffrax_nfe']:>6d}{r['ratio']:>7.3f}{r['torchdiffeq_s']:>14.3f}{r['torchdiffeq_nfe']:>6d}"
              f"{r['diffrax_over_torchdiffeq']:>8.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0
