"""Weak error of every continuous model against SGD (``flowlab orders --weak``, :func:`measure_weak`).

For each learning rate η the study runs as an ensemble of K replicas (``[ensemble] size``, or
``samples``) for T/η steps: SGD with K batch orders, K paths of every stochastic flow, the
deterministic flows once.  At the horizon T, for test functions φ — the full-batch loss, |θ|², every
symmetry quantity Q_A and the random projections ⟨r_i, θ⟩ — the weak error is

    e_φ(η) = |mean_s φ(θ_SGD,s(T)) − mean_s φ(Θ_s(T))|,   se = √(var_SGD/K + var_Θ/K)

(independent ensembles; a deterministic flow has var 0).  ``fine = r`` integrates the SDEs with
dt = η/r; ``extrapolate`` adds Talay–Tubaro extrapolation 2·E φ(X^{h/2}) − E φ(X^h) (weak order 2
in the solver's step, so its O(h) error does not mask a model's O(η²); se² = 4 se²_{h/2} + se²_h).
The order is the weighted least-squares slope of log e against log η (weights e²/se²) with its 95 %
interval; an error below 2 se at some η is flagged ``resolved = False``.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..config import Study, parse_study
from ..errors import ConfigError

HALF = "@h/2"


def _stochastic(name: str, study: Study) -> bool:
    reg = study.registry("flows")
    cls = reg[name] if name in reg else None
    return bool(getattr(cls, "stochastic", False))


def _weak_order(name: str, study: Study) -> int:
    reg = study.registry("flows")
    cls = reg[name] if name in reg else None
    return int(getattr(cls, "weak_order", 1))


def study_at(study: Study, lr: float, horizon: float, samples: int, fine: int = 1, extrapolate: bool = False) -> Study:
    """The study run at learning rate ``lr`` for T/η steps as an ensemble of ``samples``, recording
    the end points (full loss, θ snapshots), its stochastic flows at dt = η/fine (and η/(2·fine))."""
    steps = horizon / lr
    if abs(steps - round(steps)) > 1e-6 * max(1.0, steps) or round(steps) < 1:
        raise ConfigError("--horizon", horizon, f"must be a whole number of steps of every lr (T/η = {steps:g} at η = {lr:g})")
    steps = int(round(steps))
    raw = study.to_dict()
    raw["optimizer"] = {**raw["optimizer"], "lr": lr, "steps": steps}
    raw["optimizer"].pop("schedule", None)
    raw["record"] = {**raw["record"], "every": steps, "full_loss": True, "snapshot_every": "ends"}
    raw["ensemble"] = {**(raw.get("ensemble") or {}), "size": samples}
    flows = []
    for spec in raw.get("flows", []):
        spec = dict(spec)
        if _stochastic(spec["name"], study) and spec.get("integrator", "flowlab:euler_maruyama") == "flowlab:euler_maruyama":
            if fine > 1 or extrapolate:
                spec["dt"] = lr / fine
            flows.append(spec)
            if extrapolate:
                flows.append({**spec, "dt": lr / (2 * fine), "label": spec["label"] + HALF})
        else:
            flows.append(spec)
    raw["flows"] = flows
    return parse_study(raw, study.source, study.parts)


def end_values(ds: xr.Dataset) -> dict[str, xr.DataArray]:
    """φ(θ(T)) per (dynamics, sample[, symmetry_group | proj]) for every test function present."""
    out = {}
    last = {"time": -1}
    if "full_loss" in ds:
        out["loss"] = ds.full_loss.isel(last)
    if "theta" in ds:
        out["theta_sq"] = (ds.theta.isel(snapshot=-1).astype(np.float64) ** 2).sum("param")
    if "quantity" in ds and ds.sizes.get("symmetry_group", 0):
        out["quantity"] = ds.quantity.isel(last)
    if "projection" in ds and ds.sizes.get("proj", 0):
        out["projection"] = ds.projection.isel(last)
    return {k: v.load() for k, v in out.items()}


def _moments(v: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    K = v.sizes["sample"]
    return v.mean("sample"), v.var("sample", ddof=1) / K


def weak_rows(ds: xr.Dataset, labels: Sequence[str], extrapolate: bool) -> dict[str, tuple[xr.DataArray, xr.DataArray]]:
    """{φ: (error (flow, ...), se (flow, ...))} at the end of one ensemble run ``ds``."""
    vals = end_values(ds)
    out = {}
    for name, v in vals.items():
        m, s2 = _moments(v)
        errs, ses = [], []
        for f in labels:
            mf, s2f = m.sel(dynamics=f), s2.sel(dynamics=f)
            if extrapolate and f + HALF in ds.dynamics.values:
                mf = 2 * m.sel(dynamics=f + HALF) - mf
                s2f = 4 * s2.sel(dynamics=f + HALF) + s2f
            errs.append(abs(m.sel(dynamics="sgd") - mf).drop_vars("dynamics", errors="ignore"))
            ses.append(np.sqrt(s2.sel(dynamics="sgd") + s2f).drop_vars("dynamics", errors="ignore"))
        out[name] = (xr.concat(errs, "flow"), xr.concat(ses, "flow"))
    return out


def slope_ci(x: np.ndarray, e: np.ndarray, se: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares slope of log e on log x (weights (e/se)²) and its 95 % half-width."""
    ok = (e > 0) & np.isfinite(e) & np.isfinite(se)
    if ok.sum() < 2:
        return math.nan, math.nan
    lx, ly = np.log(x[ok]), np.log(e[ok])
    w = (e[ok] / np.maximum(se[ok], 1e-300)) ** 2
    if not np.all(np.isfinite(w)) or np.all(se[ok] == 0):
        w = np.ones_like(lx)
        slope = float(np.polyfit(lx, ly, 1)[0])
        return slope, math.nan
    xm = np.sum(w * lx) / np.sum(w)
    ym = np.sum(w * ly) / np.sum(w)
    sxx = np.sum(w * (lx - xm) ** 2)
    slope = float(np.sum(w * (lx - xm) * (ly - ym)) / sxx)
    return slope, float(1.96 / math.sqrt(sxx))


def measure_weak(study: Study, lrs: Sequence[float], horizon: float, *, samples: int | None = None, fine: int = 1,
                 extrapolate: bool = False, out: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> xr.Dataset:
    """Weak errors of the study's ``[[flows]]`` against SGD at each of ``lrs`` (module docstring):
    a Dataset with dims ``flow``, ``lr`` (and ``symmetry_group`` / ``proj``)."""
    from ..runner import Run
    from .ensemble_config import ensemble_size

    K = int(samples if samples is not None else ensemble_size(study))
    if K < 2:
        raise ConfigError("ensemble.size", K, "a weak error needs an ensemble of K >= 2 replicas ([ensemble] size or --samples)")
    if not isinstance(fine, int) or fine < 1:
        raise ConfigError("--fine", fine, "expected an integer >= 1 (SDE steps per SGD step)")
    if len(lrs) < 2:
        raise ConfigError("--lr", list(lrs), "give at least two learning rates")
    labels = [f.label for f in study.flows]
    if not labels:
        raise ConfigError("flows", [], "the study has no [[flows]] to compare with SGD")
    per_lr: list[dict] = []
    tmp = tempfile.TemporaryDirectory() if out is None else None
    base = Path(out) if out is not None else Path(tmp.name)
    try:
        for i, lr in enumerate(lrs):
            st = study_at(study, float(lr), horizon, K, fine, extrapolate)
            if log:
                log(f"η = {lr:g}: {st.optimizer.steps} steps × {K} replicas")
            ds = Run(st, base / f"lr{i}", overwrite=True).execute()
            per_lr.append(weak_rows(ds, labels, extrapolate))
            ds.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    lr_arr = np.asarray(lrs, dtype=np.float64)
    data: dict[str, Any] = {}
    for name in per_lr[0]:
        err = xr.concat([r[name][0] for r in per_lr], "lr")
        se = xr.concat([r[name][1] for r in per_lr], "lr")
        err = err.transpose("flow", "lr", ...)
        se = se.transpose("flow", "lr", ...)
        data[f"weak_{name}"] = err
        data[f"se_{name}"] = se
        e2 = err.values.reshape(len(labels), len(lrs), -1)
        s2 = se.values.reshape(len(labels), len(lrs), -1)
        slopes = np.full((len(labels), e2.shape[2]), np.nan)
        cis = np.full_like(slopes, np.nan)
        for a in range(len(labels)):
            for c in range(e2.shape[2]):
                slopes[a, c], cis[a, c] = slope_ci(lr_arr, e2[a, :, c], s2[a, :, c])
        extra = err.dims[2:]
        shape = (len(labels), *[err.sizes[d] for d in extra])
        data[f"order_{name}"] = (("flow", *extra), slopes.reshape(shape))
        data[f"order_{name}_ci"] = (("flow", *extra), cis.reshape(shape))
        data[f"resolved_{name}"] = (("flow", *extra), np.all(e2 >= 2 * s2, axis=1).reshape(shape))
    ds = xr.Dataset(data)
    ds = ds.assign_coords(flow=np.array(labels, dtype=object), lr=lr_arr)
    ds["expected_order"] = ("flow", np.array([_weak_order(s.name, study) for s in study.flows], dtype=np.int64))
    ds.attrs.update({"horizon": horizon, "samples": K, "fine": fine, "extrapolate": int(extrapolate),
                     "study": study.to_json(),
                     "convention": ("e(eta) = |mean_s phi(theta_sgd,s(T)) - mean_s phi(Theta_s(T))| over K replicas; "
                                    "se = sqrt(var_sgd/K + var_flow/K); Talay-Tubaro: 2E[X^{h/2}] - E[X^h]; order = "
                                    "weighted LS slope of log e vs log eta, ci = 95% half-width")})
    return ds


def format_weak(ds: xr.Dataset) -> str:
    """The weak-error table (loss and |θ|²) as text."""
    lrs = ds.lr.values
    lines = [f"weak errors at T={ds.attrs['horizon']:g}, K={ds.attrs['samples']} replicas"
             + (", Talay–Tubaro extrapolated" if ds.attrs.get("extrapolate") else "")]
    for fn in ("loss", "theta_sq"):
        if f"weak_{fn}" not in ds:
            continue
        lines.append(f"φ = {fn}: " + "  ".join(f"e(η={lr:g}) ± se" for lr in lrs) + "   order (95% CI)  expected")
        for i, f in enumerate(ds.flow.values):
            cells = "  ".join(f"{e:.2e}±{s:.1e}" for e, s in zip(ds[f"weak_{fn}"].values[i], ds[f"se_{fn}"].values[i]))
            o, ci = ds[f"order_{fn}"].values[i], ds[f"order_{fn}_ci"].values[i]
            flag = "" if bool(ds[f"resolved_{fn}"].values[i]) else "  (unresolved: e < 2 se)"
            lines.append(f"  {f:<32} {cells}   {o:5.2f} ± {ci:4.2f}   {int(ds.expected_order.values[i])}{flag}")
    return "\n".join(lines)
