"""``flowlab report`` on an ensemble: means with standard errors, and which part of SGD's symmetry
breaking each continuous model reproduces (docs/theory.md#symmetry-under-noise)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

BREAKING = ("scale", "rescale")


def _mse(v: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over the first axis (NaN-aware)."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def ensemble_table(ds: xr.Dataset) -> list[dict]:
    """Per dynamics at the last recorded time: loss and distance to SGD, mean ± se over the samples."""
    rows = []
    for d in ds.dynamics.values:
        row: dict[str, Any] = {"dynamics": str(d)}
        for name in ("loss", "full_loss", "distance"):
            if name in ds:
                v = ds[name].sel(dynamics=d)
                last = v.isel(time=int(np.flatnonzero(np.isfinite(v.values).any(axis=0))[-1])
                              if np.isfinite(v.values).any() else -1)
                row[name], row[f"{name}_se"] = _mse(last.values)
        rows.append(row)
    return rows


def breaking_split(ds: xr.Dataset) -> dict[str, Any] | None:
    """Mean drift Q(T) − Q(0) over the scale/rescale groups per dynamics (mean ± se over samples), and
    SGD's forcing integrated over time: measured η|ĝ_A|², finite-step η|g_A|², noise η·tr Σ_{B,A}
    (trapezoid over the recorded times, η_k = Δt/Δstep)."""
    if "quantity" not in ds or "group_kind" not in ds.coords:
        return None
    mask = np.isin(ds.group_kind.values.astype(str), BREAKING)
    if not mask.any():
        return None
    drift = ds["drift"].isel(symmetry_group=np.flatnonzero(mask)).mean("symmetry_group")
    out: dict[str, Any] = {"groups": int(mask.sum()), "drift": {}}
    for d in ds.dynamics.values:
        v = drift.sel(dynamics=d)
        ok = np.flatnonzero(np.isfinite(v.values).reshape(v.shape[0] if "sample" in v.dims else 1, -1).any(axis=0))
        if ok.size == 0:
            continue
        out["drift"][str(d)] = _mse(np.atleast_1d(v.isel(time=int(ok[-1])).values))
    t = ds.time.values
    steps = ds.step.values
    if len(t) > 1:
        eta = np.diff(t) / np.maximum(np.diff(steps), 1)
        for key, name in (("measured", "grad_term"), ("finite_step", "grad_term_full"), ("noise", "grad_term_noise")):
            if name not in ds:
                continue
            G = ds[name].isel(symmetry_group=np.flatnonzero(mask)).mean("symmetry_group").values  # (sample?, time)
            G = G.reshape(-1, len(t))
            integral = (0.5 * (G[:, 1:] + G[:, :-1]) * eta * np.diff(t)).sum(axis=1)
            out[key] = _mse(integral)
    return out


def report_ensemble(request: Any) -> list:
    ds = request.ensemble if request.ensemble is not None else request.dataset
    console = request.console
    split = breaking_split(ds)
    if request.ensemble is None and (split is None or "noise" not in split):
        return []
    from rich.table import Table

    if request.ensemble is not None:
        table = Table(title=f"ensemble: {ds.sizes['sample']} replicas (mean ± standard error at the last time)")
        table.add_column("dynamics")
        rows = ensemble_table(ds)
        cols = [c for c in ("loss", "full_loss", "distance") if c in rows[0]]
        for c in cols:
            table.add_column(c, justify="right")
        for r in rows:
            table.add_row(r["dynamics"], *[f"{r[c]:.4g} ± {r[c + '_se']:.2g}" for c in cols])
        console.print(table)
    if split is not None:
        table = Table(title=f"symmetry breaking of {split['groups']} scale/rescale groups: mean drift Q(T) − Q(0)")
        table.add_column("dynamics / part")
        table.add_column("drift (± se)", justify="right")
        table.add_column("÷ SGD's", justify="right")
        sgd = split["drift"].get("sgd", (math.nan, math.nan))[0]
        for d, (m, se) in split["drift"].items():
            table.add_row(d, f"{m:.4g} ± {se:.2g}" if np.isfinite(se) else f"{m:.4g}", f"{m / sgd:.3f}" if sgd else "")
        labels = {"measured": "SGD forcing ∫η|ĝ_A|² dt", "finite_step": "  finite-step part ∫η|g_A|² dt",
                  "noise": "  noise part ∫η·tr Σ_{B,A} dt"}
        for key, label in labels.items():
            if key in split:
                m, se = split[key]
                table.add_row(label, f"{m:.4g} ± {se:.2g}" if np.isfinite(se) else f"{m:.4g}",
                              f"{m / sgd:.3f}" if sgd else "")
        console.print(table)
        console.print("With λ = 0 the drift of SGD is its forcing; GF conserves Q, IGR (modified_loss) reproduces the "
                      "finite-step part, SME the noise part, SME-2 both (docs/theory.md#symmetry-under-noise). An SDE "
                      "integrated with dt = η adds Euler–Maruyama's own finite-step term h|g_A|²: use dt ≪ η.",
                      highlight=False)
    return []
