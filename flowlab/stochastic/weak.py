"""Weak error of every continuous model against SGD (``flowlab orders --weak``, :func:`measure_weak`).

For each learning rate η the study runs as an ensemble of K replicas (``[ensemble] size``, or
``samples``) for T/η steps: SGD with K batch orders, K paths of every stochastic flow, the
deterministic flows once.  At the horizon T, for test functions φ — the full-batch loss, |θ|², every
symmetry quantity Q_A and the random projections ⟨r_i, θ⟩ — the weak error is

    e_φ(η) = |mean_s φ(θ_SGD,s(T)) − mean_s φ(Θ_s(T))|,   se = √(var_SGD/K + var_Θ/K)

(independent ensembles; a deterministic flow has var 0).  ``fine = r`` integrates the SDEs with
dt = η/r; ``extrapolate`` adds Talay–Tubaro extrapolation 2·E φ(X^{h/2}) − E φ(X^h) (weak order 2
in the solver's step, so its O(h) error does not mask a model's O(η²); the h and h/2 paths share
their Brownian path — the coarse one sums pairs of the fine increments — so the extrapolated
estimator's variance is about one path's; its se is that of the per-replica combination).
The order is the weighted least-squares slope of log e against log η (weights e²/se²) with its 95 %
interval; an error below 2 se at some η is flagged ``resolved = False``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..config import Study, parse_study
from ..errors import ConfigError
from ..seeds import derive_seed

HALF = "@h/2"


def _stochastic(name: str, study: Study) -> bool:
    reg = study.registry("flows")
    cls = reg[name] if name in reg else None
    return bool(getattr(cls, "stochastic", False))


def _takes_dt(name: str, study: Study) -> bool:
    reg = study.registry("flows")
    cls = reg[name] if name in reg else None
    return bool(getattr(cls, "takes_dt", True))


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
        if (_stochastic(spec["name"], study) and _takes_dt(spec["name"], study)
                and spec.get("integrator", "flowlab:euler_maruyama") == "flowlab:euler_maruyama"):
            if fine > 1 or extrapolate:
                spec["dt"] = lr / fine
            if extrapolate:  # the h and h/2 paths share one Brownian path (coupled: docs/theory.md#weak-error)
                seed = derive_seed(study.study.seed, spec["label"], 0)
                opts = dict(spec.get("integrator_options", {}))
                flows.append({**spec, "integrator_options": {**opts, "seed": seed, "substeps": 2}})
                flows.append({**spec, "dt": lr / (2 * fine), "label": spec["label"] + HALF,
                              "integrator_options": {**opts, "seed": seed}})
            else:
                flows.append(spec)
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
            if extrapolate and f + HALF in ds.dynamics.values:  # per replica: the two paths are coupled
                mf, s2f = _moments(2 * v.sel(dynamics=f + HALF) - v.sel(dynamics=f))
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


def asymptotic_slope(lr: np.ndarray, e: np.ndarray, se: np.ndarray, points: int = 3) -> tuple[float, float]:
    """The slope over the ``points`` smallest η whose error is resolved (e ≥ 2 se): past the
    pre-asymptotic bend at large η, before the Monte Carlo floor at small η."""
    ok = np.flatnonzero((e >= 2 * se) & np.isfinite(e))
    ok = ok[np.argsort(lr[ok])][:points]
    if ok.size < 2:
        return math.nan, math.nan
    return slope_ci(lr[ok], e[ok], se[ok])


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
    if len(lrs) < 2 or any(not (x > 0 and math.isfinite(x)) for x in lrs):
        raise ConfigError("--lr", list(lrs), "give at least two positive learning rates")
    if not (horizon > 0 and math.isfinite(horizon)):
        raise ConfigError("--horizon", horizon, "expected a number > 0")
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
        lines.append(f"φ = {fn}: " + "  ".join(f"e(η={lr:g}) ± se" for lr in lrs)
                     + "   order (95% CI)  asymptotic*  expected")
        for i, f in enumerate(ds.flow.values):
            e, se = ds[f"weak_{fn}"].values[i], ds[f"se_{fn}"].values[i]
            cells = "  ".join(f"{x:.2e}±{s:.1e}" for x, s in zip(e, se))
            o, ci = ds[f"order_{fn}"].values[i], ds[f"order_{fn}_ci"].values[i]
            a, aci = asymptotic_slope(lrs, e, se)
            flag = "" if bool(ds[f"resolved_{fn}"].values[i]) else "  (unresolved at some η: e < 2 se)"
            lines.append(f"  {f:<32} {cells}   {o:5.2f} ± {ci:4.2f}   {a:5.2f} ± {aci:4.2f}   "
                         f"{int(ds.expected_order.values[i])}{flag}")
    lines.append("* asymptotic: the slope over the three smallest η whose error is resolved (e ≥ 2 se)")
    return "\n".join(lines)


def kind_means(ds: xr.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{kind: (mean weak error of Q_A over the groups of that kind (flow, lr), its se)} for scale and
    rescale groups (translation quantities are conserved by every model and by SGD alike)."""
    if "weak_quantity" not in ds or "group_kind" not in ds.coords:
        return {}
    kinds = ds.group_kind.values.astype(str)
    out = {}
    for kind in ("scale", "rescale"):
        idx = np.flatnonzero(kinds == kind)
        if idx.size:
            e = ds.weak_quantity.isel(symmetry_group=idx).mean("symmetry_group").values
            se = np.sqrt((ds.se_quantity.isel(symmetry_group=idx) ** 2).mean("symmetry_group").values / idx.size)
            out[kind] = (e, se)
    return out


def format_kinds(ds: xr.Dataset) -> str:
    lines = []
    lrs = ds.lr.values
    for kind, (e, se) in kind_means(ds).items():
        lines.append(f"φ = Q_A, mean over the {kind} groups: " + "  ".join(f"e(η={lr:g})" for lr in lrs)
                     + "   slope")
        for i, f in enumerate(ds.flow.values):
            slope = slope_ci(ds.lr.values, e[i], se[i])[0]
            lines.append(f"  {f:<32} " + "  ".join(f"{x:.2e}±{s:.1e}" for x, s in zip(e[i], se[i])) + f"   {slope:5.2f}")
    return "\n".join(lines)


def weak_figure(ds: xr.Dataset, path: str | Path) -> Path:
    """Weak error vs η (log–log) per flow: the loss, |θ|², and the mean over scale/rescale groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", ds.get("weak_loss"), ds.get("se_loss")), ("|θ|²", ds.get("weak_theta_sq"), ds.get("se_theta_sq"))]
    panels = [(t, e.values, s.values) for t, e, s in panels if e is not None]
    panels += [(f"Q_A, {k} (mean)", e, s) for k, (e, s) in kind_means(ds).items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    lrs = ds.lr.values
    for ax, (title, e, s) in zip(axes[0], panels):
        for i, f in enumerate(ds.flow.values):
            ax.errorbar(lrs, e[i], yerr=2 * s[i], marker="o", capsize=2, label=str(f))
        ref = e[np.isfinite(e)]
        if ref.size:
            for order, style in ((1, ":"), (2, "--")):
                ax.plot(lrs, ref.max() * (lrs / lrs.max()) ** order, "k" + style, lw=0.8, label=f"slope {order}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("η")
        ax.set_title(f"weak error: {title}")
    axes[0][0].set_ylabel(f"|E φ(SGD) − E φ(model)| (±2 se), K={ds.attrs['samples']}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(ds: xr.Dataset, out: str | Path, command: str) -> tuple[str, Path]:
    """``OUT/summary.md`` (the tables, naming the ``command`` that made ``ds``) and ``OUT/weak.png``."""
    out = Path(out)
    text = format_weak(ds)
    kinds = format_kinds(ds)
    if kinds:
        text += "\n" + kinds
    figure = weak_figure(ds, out / "weak.png")
    (out / "summary.md").write_text(
        f"# Weak errors: {json.loads(ds.attrs['study']).get('study', {}).get('name', '')}\n\n"
        f"Regenerate: `{command}`\n\n```\n{text}\n```\n\n"
        "Dataset: `weak.nc` (dims flow, lr, symmetry_group, proj); figure: `weak.png`.\n")
    return text, figure
