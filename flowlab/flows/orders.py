"""Discretisation-error analysis: measured orders of every flow against the discrete method it models.

``flowlab orders STUDY.toml --lr 0.2,0.1,0.05,0.025 --horizon T`` (or :func:`measure_orders`):
for every learning rate η, the discrete method — full-batch GD for the flows with
``discrete = "gd"``, full-batch heavy ball (β: ``--momentum``, else the study's momentum, else 0.5)
for the momentum flows — runs K = T/η steps from the study's θ0, and each flow is integrated over
the full-batch L_λ in lock step with it.  Conventions:

- Matched times t_k = kη; a flow with time shift s (first-order momentum flows, s = ηβ/(1−β)) is
  compared at its own time t_k − s (docs/theory.md#start-up-and-time-shift).
- Global error e(η) = max over the window t_k ∈ [skip·T, T] (default skip = 0.5: after the start-up
  transient) of |θ_k − θ_flow(t_k − s)| (parameter space), of the RMS difference of the model's
  outputs on the whole dataset (function space), and of |L(θ_k) − L(θ_flow)| (loss).
- The flow's reference solution is integrated twice, with the integrator as given and tightened
  10× (rtol, atol ÷ 10, or dt ÷ 10); their largest difference over the window, ref_err, bounds the
  reference's error.  Until ref_err ≤ e(η)/safety (safety = 100) the pair is tightened again
  (at most ``max_tighten`` times); the finer of the two is the one measured.
- The measured order is the least-squares slope of log e against log η; ``passed`` when it is
  within ``tolerance`` (0.2) of the flow's expected order.

The result is a Dataset with dims ``flow`` and ``lr`` (saved as ``OUT/orders.nc``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ..build import Built, build
from ..config import Study, load_study
from ..engine import Clock, LockStep, Recording
from ..errors import ConfigError, FlowlabError
from ..parts import Command
from ..problem import Problem
from ..recording import Point, Recorder, Rows
from ..sgd import DiscreteSGD
from .base import Hyper
from .config import FlowSpec
from .follower import FlowFollower
from .library import BUILTIN_FLOWS
from .registry import make_flow, make_integrator

#: the starting rtol of the reference solutions (tightened 10× until 100× below the error measured)
REFERENCE_RTOL = 1e-9
TOLERANCE = 0.2


def model_outputs(problem: Problem, theta: torch.Tensor) -> torch.Tensor:
    """The model's outputs on the whole dataset at θ (flattened, chunk by chunk)."""
    outs = []
    with torch.no_grad():
        problem.load(theta)
        for (X, _), _w in problem.chunks():
            outs.append(problem.module(X).reshape(-1))
    return torch.cat(outs)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((a - b) ** 2)))


def _discrete(built: Built, lr: float, steps: int, beta: float) -> DiscreteSGD:
    opt = replace(built.study.optimizer, lr=lr, steps=steps, momentum=beta, dampening=0.0, nesterov=False,
                  batch_size="full")
    return DiscreteSGD(built.problem, opt, np.full(steps, lr), built.study.study.seed)


class _Errors(Recorder):
    """At every recorded t_k ≥ skip·T: the errors of the discrete run against the finer reference
    (dynamics 1) and the gap between the two references (dynamics 2)."""

    def __init__(self, problem: Problem, window_start: float):
        self.problem, self.window_start = problem, window_start
        self.e_th = self.e_out = self.e_loss = self.ref = 0.0
        self.th_f: torch.Tensor | None = None

    def record(self, rows: Rows, point: Point) -> None:
        if point.index == 0 or point.time < self.window_start:
            return
        if point.index == 1:
            problem = self.problem
            th_f, th_d = point.theta.clone(), point.reference.clone()
            self.th_f = th_f
            self.e_th = max(self.e_th, float(torch.linalg.vector_norm(th_d - th_f)))
            self.e_out = max(self.e_out, _rms(model_outputs(problem, th_d), model_outputs(problem, th_f)))
            self.e_loss = max(self.e_loss, abs(float(problem.full_loss(th_d)) - float(problem.full_loss(th_f))))
        else:
            self.ref = max(self.ref, float(torch.linalg.vector_norm(point.theta - self.th_f)))


def _one(built: Built, flow: Any, label: str, lr: float, horizon: float, beta: float, skip: float, integ: Any
         ) -> dict[str, Any]:
    """Errors of one flow at one η with a reference pair (integ, integ tightened 10×), run by the
    lock-step engine beside K = T/η steps of GD (heavy ball for momentum flows)."""
    problem = built.problem
    K = int(round(horizon / lr))
    fine = integ.tightened(10.0)
    wd = float(built.study.optimizer.weight_decay)
    times = np.arange(K + 1) * lr
    lrs = np.full(max(K, 1), lr)
    check_run = getattr(flow, "check_run", None)
    if check_run is not None:  # what only the flow and its integrator together can tell (central_flow)
        hp = Hyper(lr=float(lr), weight_decay=wd, momentum=float(beta))
        for i in (integ, fine):
            try:
                check_run(i, hp, problem, label)
            except ConfigError as exc:
                raise exc.within(f"orders.{label}") from None
    finer, coarse = (FlowFollower(flow, i, problem, lrs, weight_decay=wd, momentum=beta, label=lab, times=times,
                                  full_loss=False) for i, lab in ((fine, "fine"), (integ, "coarse")))
    sgd = _discrete(built, lr, K, beta)
    errors = _Errors(problem, skip * horizon - 1e-12 * horizon)
    clock = Clock(times, np.arange(K + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    LockStep(clock, sgd, [finer, coarse], [errors], Recording.discard(3, problem.device), device=problem.device,
             followers_outlive_discrete=False).run()
    if sgd.loss is None or not bool(torch.isfinite(sgd.theta).all()) or not bool(torch.isfinite(sgd.loss)):
        raise FlowlabError(f"orders: the discrete run diverged at η={lr} (step {sgd.step}); choose smaller learning "
                           "rates (before the edge of stability, η·λ_max(H) < 2)")
    for f in (finer, coarse):
        if f.status != "ok":
            raise FlowlabError(f"orders: {label} at η={lr}: {f.status}")
    return {"err_theta": errors.e_th, "err_output": errors.e_out, "err_loss": errors.e_loss, "ref_err": errors.ref,
            "nfe": finer.nfe, "steps": K, "time_shift": finer.shift, "fine": fine}


def _tol_of(integ: Any) -> float:
    return float(integ.dt if getattr(integ, "kind", "adaptive") == "fixed" and integ.dt is not None
                 else (integ.rtol if getattr(integ, "rtol", None) is not None else float("nan")))


def measure_orders(study: Study, lrs: Sequence[float], horizon: float, *, flows: Sequence[str] | None = None,
                   momentum: float | None = None, skip: float = 0.5, safety: float = 100.0,
                   max_tighten: int = 3, rtol: float | None = None, tolerance: float = TOLERANCE,
                   log=None) -> xr.Dataset:
    """Measure every flow's order against GD / heavy ball (module docstring); return the Dataset."""
    lrs = sorted((float(x) for x in lrs), reverse=True)
    if len(lrs) < 2 or any(not (x > 0) for x in lrs):
        raise ConfigError("--lr", lrs, "give at least two positive learning rates")
    if not (horizon > 0 and math.isfinite(horizon)):
        raise ConfigError("--horizon", horizon, "expected a number > 0")
    if momentum is not None and not 0 <= momentum < 1:
        raise ConfigError("--momentum", momentum, "expected a number in [0, 1)")
    if rtol is not None and not (rtol > 0 and math.isfinite(rtol)):
        raise ConfigError("--rtol", rtol, "expected a number > 0")
    for lr in lrs:
        K = horizon / lr
        if abs(K - round(K)) > 1e-9 * K:
            raise ConfigError("--horizon", horizon, f"must be a whole number of steps of every lr ({horizon}/{lr} = {K:.6g})")
    if not 0 <= skip < 1:
        raise ConfigError("--skip", skip, "expected a fraction of the horizon in [0, 1)")
    specs = _specs(study, flows, rtol)
    built = build(study)
    if built.problem.dtype != torch.float64:
        log and log("orders: warning: the study runs in float32; measured orders need float64 (study.dtype)")
    beta_hb = momentum if momentum is not None else (study.optimizer.momentum or 0.5)
    rows: list[dict[str, Any]] = []
    for spec, section in specs:
        flow = make_flow(spec.name, spec.flow_options, section, registry=study.registry("flows"))
        beta = beta_hb if getattr(flow, "discrete", "gd") == "heavy_ball" else 0.0
        for lr in lrs:
            integ = make_integrator(spec.integrator, spec.rtol, spec.atol, spec.dt, spec.integrator_options, section,
                                    registry=study.registry("integrators"))
            if getattr(integ, "kind", "adaptive") == "fixed" and integ.dt is None:
                integ.dt = lr / 4
            t0 = time.perf_counter()
            for attempt in range(max_tighten + 1):
                res = _one(built, flow, spec.label, lr, horizon, beta, skip, integ)
                if res["ref_err"] * safety <= res["err_theta"] or attempt == max_tighten:
                    break
                integ = res["fine"]
            res.update(flow=spec.label, name=spec.name, lr=lr, beta=beta, order=int(flow.order),
                       discrete=getattr(flow, "discrete", "gd"), tol_used=_tol_of(res.pop("fine")),
                       seconds=time.perf_counter() - t0)
            res["margin"] = res["err_theta"] / res["ref_err"] if res["ref_err"] > 0 else float("inf")
            rows.append(res)
            if log:
                log(f"  {spec.label:<28} η={lr:<8g} |Δθ|={res['err_theta']:.3e}  ref_err={res['ref_err']:.1e}  "
                    f"nfe={res['nfe']}  {res['seconds']:.1f}s")
    return _dataset(study, rows, [spec.label for spec, _ in specs], lrs, horizon, skip, safety, tolerance)


def _specs(study: Study, flows: Sequence[str] | None, rtol: float | None) -> list[tuple[FlowSpec, str]]:
    """The flows to measure, each with the field path its errors name."""
    if flows:
        by_label = {f.label: (f, f"flows.{i}") for i, f in enumerate(study.flows)}
        out = []
        for name in flows:
            if name in by_label:
                out.append(by_label[name])
            else:
                study.registry("flows").resolve(name, "--flows")
                out.append((FlowSpec(name=name, label=name, rtol=rtol or REFERENCE_RTOL), "--flows"))
        return out
    if study.flows:
        return [(f if (f.rtol or f.dt or rtol is None) else replace(f, rtol=rtol), f"flows.{i}")
                for i, f in enumerate(study.flows)]
    return [(FlowSpec(name=n, label=n, rtol=rtol or REFERENCE_RTOL), "--flows") for n in BUILTIN_FLOWS]


def _slope(lrs: np.ndarray, errs: np.ndarray) -> float:
    ok = np.isfinite(errs) & (errs > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(lrs[ok]), np.log(errs[ok]), 1)[0])


def _dataset(study: Study, rows: list[dict], labels: list[str], lrs: list[float], horizon: float, skip: float,
             safety: float, tolerance: float) -> xr.Dataset:
    F = len(labels)
    idx = {(r["flow"], r["lr"]): r for r in rows}

    def grid(key: str, dtype=np.float64) -> np.ndarray:
        return np.array([[idx[(f, lr)][key] for lr in lrs] for f in labels], dtype=dtype)

    lr_arr = np.array(lrs)
    first = {f: idx[(f, lrs[0])] for f in labels}
    data = {name: (("flow", "lr"), grid(name)) for name in ("err_theta", "err_output", "err_loss", "ref_err", "margin",
                                                            "tol_used", "time_shift", "seconds")}
    data["nfe"] = (("flow", "lr"), grid("nfe", np.int64))
    data["steps"] = (("flow", "lr"), grid("steps", np.int64))
    for metric in ("theta", "output", "loss"):
        data[f"order_{metric}"] = (("flow",), np.array([_slope(lr_arr, grid(f"err_{metric}")[i]) for i in range(F)]))
    e = grid("err_theta")
    with np.errstate(divide="ignore", invalid="ignore"):
        last = np.log(e[:, -1] / e[:, -2]) / np.log(lr_arr[-1] / lr_arr[-2])
    data["order_theta_last"] = (("flow",), last, {"long_name": "slope between the two smallest learning rates "
                                                               "(the asymptotic estimate)"})
    data["expected_order"] = (("flow",), np.array([first[f]["order"] for f in labels], dtype=np.int64))
    data["beta"] = (("flow",), np.array([first[f]["beta"] for f in labels]))
    data["discrete"] = (("flow",), np.array([first[f]["discrete"] for f in labels], dtype=object))
    data["reference_ok"] = (("flow",), np.array([bool(np.all(grid("margin")[i] >= safety)) for i in range(F)]))
    data["passed"] = (("flow",), np.abs(data["order_theta"][1] - data["expected_order"][1]) <= tolerance)
    ds = xr.Dataset(data, coords={"flow": np.array(labels, dtype=object), "lr": lr_arr})
    ds.attrs.update({
        "horizon": horizon, "window": f"t in [{skip}*T, T] = [{skip * horizon:g}, {horizon:g}]", "skip": skip,
        "safety": safety, "tolerance": tolerance, "study": study.to_json(),
        "convention": ("e(eta) = max over the window of |theta_discrete(t_k) - theta_flow(t_k - s)|, t_k = k*eta, "
                       "s = time_shift (eta*beta/(1-beta) for first-order momentum flows, else 0); GD for "
                       "discrete='gd' flows, heavy ball (beta) for 'heavy_ball' flows; order = least-squares slope of "
                       "log e vs log eta; reference ODE solutions checked by tightening 10x: margin = e/ref_err"),
    })
    return ds


def format_table(ds: xr.Dataset) -> str:
    """The orders table as text (what ``flowlab orders`` prints)."""
    lrs = ds.lr.values
    head = (f"{'flow':<28} {'vs':<12} {'expected':>8} {'θ':>6} {'output':>7} {'loss':>6}  "
            + "  ".join(f"e(η={lr:g})" for lr in lrs) + "   margin  ok")
    lines = [f"measured orders, horizon T={ds.attrs['horizon']:g}, window {ds.attrs['window']}", head]
    for i, f in enumerate(ds.flow.values):
        vs = "GD" if ds.discrete.values[i] == "gd" else f"HB β={ds.beta.values[i]:g}"
        errs = "  ".join(f"{e:>{len(f'e(η={lr:g})')}.3e}" for e, lr in zip(ds.err_theta.values[i], lrs))
        lines.append(f"{f:<28} {vs:<12} {int(ds.expected_order.values[i]):>8d} {ds.order_theta.values[i]:>6.2f} "
                     f"{ds.order_output.values[i]:>7.2f} {ds.order_loss.values[i]:>6.2f}  {errs}   "
                     f"{np.min(ds.margin.values[i]):>6.0f}  {'yes' if ds.passed.values[i] else 'NO'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def _floats(text: str, field: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(field, text, "expected comma-separated numbers, e.g. 0.2,0.1,0.05,0.025") from None


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study's TOML file (model, data, loss, weight decay, dtype; [[flows]] if any)")
    p.add_argument("--lr", required=True, help="learning rates, e.g. 0.2,0.1,0.05,0.025")
    p.add_argument("--horizon", type=float, required=True, help="horizon T (a whole number of steps of every lr)")
    p.add_argument("--flows", help="flow names or the study's flow labels (default: the study's [[flows]], else all built-in flows)")
    p.add_argument("--momentum", type=float, help="β of the heavy ball the momentum flows are compared with "
                   "(default: the study's momentum, else 0.5)")
    p.add_argument("--skip", type=float, default=0.5, help="measure over t in [skip*T, T] (default 0.5: after the start-up transient)")
    p.add_argument("--rtol", type=float, help=f"starting rtol of the reference solutions (default {REFERENCE_RTOL:g})")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a study key")
    p.add_argument("--out", help="output folder (default runs/<study>-orders); writes orders.nc")
    w = p.add_argument_group("weak errors (stochastic models against SGD over ensembles)")
    w.add_argument("--weak", action="store_true", help="measure weak errors |E φ(θ_SGD(T)) − E φ(Θ(T))| of the "
                   "study's [[flows]] over ensembles (flowlab.stochastic.weak); writes weak.nc")
    w.add_argument("--samples", type=int, help="replicas K per ensemble (default: the study's [ensemble] size)")
    w.add_argument("--fine", type=int, default=1, help="SDE steps per SGD step (dt = η/fine; default 1)")
    w.add_argument("--extrapolate", action="store_true", help="Talay–Tubaro extrapolation 2E[X^{h/2}] − E[X^h]")


def _weak(args: argparse.Namespace, study: Study) -> int:
    import sys

    from ..stochastic.weak import measure_weak, write_summary

    lrs = _floats(args.lr, "--lr")
    ds = measure_weak(study, lrs, args.horizon, samples=args.samples, fine=args.fine, extrapolate=args.extrapolate,
                      log=lambda m: print(m, file=sys.stderr))
    out = Path(args.out) if args.out else Path("runs") / f"{study.name}-weak"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "weak.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    command = "flowlab " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("flowlab") else \
        f"flowlab orders {args.study} --weak --lr {args.lr} --horizon {args.horizon}"
    text, figure = write_summary(ds, out, command)
    print(text)
    print(f"written to {path}, {figure} and {out / 'summary.md'}")
    return 0


def _handler(args: argparse.Namespace) -> int:
    import sys

    study = load_study(args.study, args.set or ())
    if args.weak:
        return _weak(args, study)
    lrs = _floats(args.lr, "--lr")
    flows = [f.strip() for f in args.flows.split(",") if f.strip()] if args.flows else None
    ds = measure_orders(study, lrs, args.horizon, flows=flows, momentum=args.momentum, skip=args.skip, rtol=args.rtol,
                        log=lambda m: print(m, file=sys.stderr))
    out = Path(args.out) if args.out else Path("runs") / f"{study.name}-orders"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "orders.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    print(format_table(ds))
    print(f"written to {path}")
    (out / "orders.json").write_text(json.dumps({
        "study": study.name, "horizon": args.horizon, "lrs": lrs,
        "orders": {str(f): {"expected": int(e), "measured": float(o), "passed": bool(p)} for f, e, o, p in
                   zip(ds.flow.values, ds.expected_order.values, ds.order_theta.values, ds.passed.values)}}, indent=2) + "\n")
    return 0 if bool(np.all(ds.passed.values)) else 1


COMMAND = Command("orders", "measure each flow's order against GD / heavy ball over several learning rates",
                  _configure, _handler)

__all__ = ["COMMAND", "format_table", "measure_orders", "model_outputs"]

