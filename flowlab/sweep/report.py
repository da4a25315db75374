"""``flowlab report SWEEP_DIR``: per sweep point, what a run's report shows in one line (status,
final loss, how far each flow ends from SGD, SGD's largest symmetry drift and the theory's error),
and the figure of merit — the largest distance of each flow from SGD over the run — against each
numeric axis, log–log with fitted slopes (averaged over the other axes)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr


def _dims(ds: xr.Dataset) -> list[str]:
    return list(ds.sweep_status.dims)


def point_rows(ds: xr.Dataset) -> list[dict[str, Any]]:
    """One row per sweep point (module docstring)."""
    dims = _dims(ds)
    flows = [str(d) for d in ds.dynamics.values if str(d) != "sgd"]
    rows = []
    for idx in itertools.product(*[range(ds.sizes[d]) for d in dims]):
        sel = dict(zip(dims, idx))
        p = ds.isel(sel)
        row: dict[str, Any] = {d: _py(ds[d].values[i]) for d, i in zip(dims, idx)}
        row["status"] = str(p.sweep_status.values)
        if row["status"] == "ok":
            loss = np.asarray(p.loss.sel(dynamics="sgd").values, dtype=float)
            finite = loss[np.isfinite(loss)]
            row["sgd_final_loss"] = float(finite[-1]) if finite.size else float("nan")
            for f in flows:
                dist = np.asarray(p.distance.sel(dynamics=f).values, dtype=float)
                row[f"max_distance[{f}]"] = float(np.nanmax(dist)) if np.isfinite(dist).any() else float("nan")
            if "drift" in p and "group_kind" in p.coords:
                kinds = np.asarray(p.group_kind.values).astype(str)
                mask = np.isin(kinds, ("scale", "rescale"))
                if mask.any():
                    drift = np.abs(np.asarray(p.drift.sel(dynamics="sgd").values, dtype=float)[:, mask])
                    scale = np.maximum(np.abs(np.asarray(p.group_scale.values, dtype=float)[mask]), 1e-300)
                    row["sgd_max_rel_drift"] = float(np.nanmax(drift / scale))
            if "theory" in p:
                Q = np.asarray(p.quantity.sel(dynamics="sgd").values, dtype=float)
                scale = np.maximum(np.abs(Q[0]), np.asarray(p.group_scale.values, dtype=float))
                best = min(float(np.nanmax(np.abs(np.asarray(p.theory.sel(variant=v).values, dtype=float) - Q)
                                           / np.where(scale > 0, scale, 1e-300)))
                           for v in p.variant.values)
                row["theory_best_rel_error"] = best
        rows.append(row)
    return rows


def _py(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def merit_slopes(ds: xr.Dataset) -> dict[str, dict[str, float]]:
    """{axis: {flow: slope of log(max distance from SGD) against log(axis)}} over numeric, positive axes
    (the merit averaged over the other axes, failed points left out)."""
    out: dict[str, dict[str, float]] = {}
    dist = ds.distance.max("time")
    for axis in _dims(ds):
        values = np.asarray(ds[axis].values)
        if values.dtype.kind not in "if" or (values <= 0).any() or len(values) < 2:
            continue
        other = [d for d in _dims(ds) if d != axis]
        merit = dist.mean(other) if other else dist
        out[axis] = {}
        for f in ds.dynamics.values:
            if str(f) == "sgd":
                continue
            y = np.asarray(merit.sel(dynamics=f).values, dtype=float)
            ok = np.isfinite(y) & (y > 0)
            if ok.sum() >= 2:
                out[axis][str(f)] = float(np.polyfit(np.log(values[ok]), np.log(y[ok]), 1)[0])
    return out


def merit_figure(ds: xr.Dataset, axis: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dist = ds.distance.max("time")
    other = [d for d in _dims(ds) if d != axis]
    merit = dist.mean(other) if other else dist
    x = np.asarray(ds[axis].values, dtype=float)
    slopes = merit_slopes(ds).get(axis, {})
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for f in ds.dynamics.values:
        if str(f) == "sgd":
            continue
        ax.plot(x, np.asarray(merit.sel(dynamics=f).values, dtype=float), "o-",
                label=f"{f} (slope {slopes.get(str(f), float('nan')):.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel("max_t |θ_flow − θ_sgd|" + (f" (mean over {', '.join(other)})" if other else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_sweep(request: Any) -> list:
    from rich.table import Table

    ds = request.dataset
    console = request.console
    if "sample" in ds.dims:  # points that are ensembles: the per-point figures are means over the replicas
        status = ds.sweep_status
        ds = ds.drop_vars("sweep_status").mean("sample", keep_attrs=True)
        ds["sweep_status"] = status
        console.print(f"each point an ensemble of {request.dataset.sizes['sample']} replicas: means over them",
                      highlight=False)
    rows = point_rows(ds)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=f"sweep {ds.attrs.get('study_name', '')}: {len(rows)} points ({ds.attrs.get('sweep_alignment', '')})")
    for c in cols:
        table.add_column(c, justify="left" if c in ("status",) else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in cols])
    console.print(table)
    slopes = merit_slopes(ds)
    for axis, per in slopes.items():
        if per:
            console.print(f"max distance from SGD vs {axis} (log–log slope): "
                          + ", ".join(f"{f} {s:.2f}" for f, s in per.items()), highlight=False)
    paths = []
    if request.figures:
        for axis in slopes:
            paths.append(merit_figure(ds, axis, request.folder / f"sweep_{axis}.png"))
    (request.folder / "sweep_report.json").write_text(json.dumps({"points": rows, "slopes": slopes}, indent=1,
                                                                 default=str) + "\n")
    paths.append(request.folder / "sweep_report.json")
    return paths


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
