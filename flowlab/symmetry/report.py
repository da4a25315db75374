"""``flowlab report RESULT`` (its symmetry part): how far each dynamics breaks each conservation law.

Relative drift of group A at time t: |Q_A(t) − Q_A(0)| / s_A, with s_A the coordinate
``group_scale`` (Σ_A|θ_i(0)| for translation, |θ_A(0)|² for scale, |θ_A1(0)|² + |θ_A2(0)|² for
rescale), floored at 10⁻⁸ × the median scale of its kind so an all-zero initial group cannot
divide by zero.  The table gives the maximum over time and groups per dynamics × kind (× layer).

Figures (matplotlib, Agg), written next to the result:
- ``symmetry_fig1.png`` — like Fig. 1 of Kunin et al. (2021): individual parameters of a few
  neurons (from the θ snapshots) beside the per-neuron quantities of the same layer;
- ``symmetry_drift.png`` — per-layer drift curves, one panel per kind, one line per layer and
  dynamics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from flowlab.errors import FlowlabError
from flowlab.store import open_result

from .groups import KINDS


def relative_drift(ds: xr.Dataset) -> xr.DataArray:
    """|drift| / group_scale (dynamics, time, symmetry_group)."""
    if "drift" not in ds:
        raise FlowlabError("this result has no symmetry variables (was [symmetry] enabled = false, or no groups found?)")
    scale = ds["group_scale"].values.astype(np.float64)
    kinds = ds["group_kind"].values.astype(str)
    eff = scale.copy()
    for k in KINDS:
        mask = kinds == k
        pos = scale[mask & (scale > 0)]
        floor = 1e-8 * float(np.median(pos)) if pos.size else 1e-300
        eff[mask] = np.maximum(scale[mask], max(floor, 1e-300))
    return np.abs(ds["drift"]) / xr.DataArray(eff, dims="symmetry_group")


def drift_table(ds: xr.Dataset, by_layer: bool = False) -> list[dict]:
    """Rows: dynamics, kind, [layer], groups, max relative drift, the time of that maximum."""
    rel = relative_drift(ds).load()
    kinds = ds["group_kind"].values.astype(str)
    layers = ds["group_layer"].values.astype(str)
    times = ds["time"].values
    rows = []
    keys = [(k, None) for k in KINDS if (kinds == k).any()]
    if by_layer:
        keys = [(k, la) for k in KINDS for la in dict.fromkeys(layers[kinds == k])]
    for mi, label in enumerate(ds["dynamics"].values):
        values = rel.isel(dynamics=mi).values  # (time, symmetry_group)
        for kind, layer in keys:
            mask = (kinds == kind) if layer is None else ((kinds == kind) & (layers == layer))
            block = values[:, mask]
            finite = np.isfinite(block)
            if not finite.any():
                worst, at = float("nan"), float("nan")
            else:
                filled = np.where(finite, block, -np.inf)
                ti, _ = np.unravel_index(int(np.argmax(filled)), filled.shape)
                worst, at = float(filled.max()), float(times[ti])
            row = {"dynamics": str(label), "kind": kind, "groups": int(mask.sum()), "max_rel_drift": worst, "at_time": at}
            if by_layer:
                row["layer"] = layer
            rows.append(row)
    return rows


def _out_dir(result: str | Path) -> Path:
    p = Path(result)
    return p.parent if p.is_file() else p


def _pick_layer(ds: xr.Dataset) -> tuple[str, str] | None:
    kinds = ds["group_kind"].values.astype(str)
    layers = ds["group_layer"].values.astype(str)
    for k in ("rescale", "scale", "translation"):
        if (kinds == k).any():
            return k, str(layers[kinds == k][0])
    return None


def _param_series(ds: xr.Dataset, layer: str, units: np.ndarray, per_unit: int = 3) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(times, values (snapshots × k), labels) for a few incoming parameters of ``units``."""
    if "theta" not in ds or "param_layout" not in ds.attrs:
        return np.zeros(0), np.zeros((0, 0)), []
    layout = json.loads(ds.attrs["param_layout"])
    names = layout["names"]
    name = f"{layer}.weight" if f"{layer}.weight" in names else (layer if layer in names else None)
    if name is None:
        return np.zeros(0), np.zeros((0, 0)), []
    i = names.index(name)
    off, shape = layout["offsets"][i], layout["shapes"][i]
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    cols, labels = [], []
    for u in units:
        if u < 0 or u >= (shape[0] if shape else 1):
            continue
        for j in range(min(per_unit, row)):
            cols.append(off + int(u) * row + j)
            labels.append(f"{name}[{int(u)}]" + (f"[{j}]" if row > 1 else ""))
    if not cols:
        return np.zeros(0), np.zeros((0, 0)), []
    theta = ds["theta"].isel(dynamics=0, param=cols).values  # (snapshot, k)
    return ds["snapshot"].values, theta, labels


def write_figures(ds: xr.Dataset, out_dir: str | Path) -> list[Path]:
    """Write ``symmetry_fig1.png`` and ``symmetry_drift.png`` into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    kinds = ds["group_kind"].values.astype(str)
    layers = ds["group_layer"].values.astype(str)
    units = ds["group_unit"].values
    times = ds["time"].values
    methods = [str(m) for m in ds["dynamics"].values]
    styles = ["-", "--", ":", "-."]

    picked = _pick_layer(ds)
    if picked is not None:
        kind, layer = picked
        sel = np.nonzero((kinds == kind) & (layers == layer))[0][:12]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        ts, vals, labels = _param_series(ds, layer, units[sel[:4]])
        if vals.size:
            for j in range(vals.shape[1]):
                ax1.plot(ts, vals[:, j], marker="o", ms=3, lw=1)
            ax1.set_title(f"parameters of {layer} (first units, snapshots, sgd)")
        else:
            ax1.text(0.5, 0.5, "no θ snapshots for this layer", ha="center", va="center", transform=ax1.transAxes)
        ax1.set_xlabel("t")
        q = ds["quantity"].isel(symmetry_group=sel).values  # (dynamics, time, g)
        for mi, m in enumerate(methods):
            for j in range(q.shape[2]):
                ax2.plot(times, q[mi, :, j], styles[mi % len(styles)], lw=1, color=f"C{j % 10}",
                         label=m if j == 0 else None)
        ax2.set_title(f"{kind} quantity per unit of {layer}")
        ax2.set_xlabel("t")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / "symmetry_fig1.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    rel = relative_drift(ds).values  # (dynamics, time, symmetry_group)
    present = [k for k in KINDS if (kinds == k).any()]
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
    for ax, kind in zip(axes[0], present):
        for li, layer in enumerate(dict.fromkeys(layers[kinds == kind])):
            mask = (kinds == kind) & (layers == layer)
            for mi, m in enumerate(methods):
                with np.errstate(all="ignore"):
                    curve = np.nanmax(np.where(np.isfinite(rel[mi][:, mask]), rel[mi][:, mask], np.nan), axis=1) \
                        if np.isfinite(rel[mi][:, mask]).any() else np.full(len(times), np.nan)
                curve = np.where(curve > 0, curve, np.nan)
                ax.plot(times, curve, styles[mi % len(styles)], color=f"C{li % 10}", lw=1,
                        label=f"{layer} ({m})" if len(methods) > 1 else layer)
        ax.set_yscale("log")
        ax.set_title(f"{kind}: max |Q(t) − Q(0)| / scale per layer")
        ax.set_xlabel("t")
        ax.legend(fontsize=6, ncol=1 + len(dict.fromkeys(layers[kinds == kind])) // 12)
    fig.tight_layout()
    p = out_dir / "symmetry_drift.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def report(result: str | Path | xr.Dataset, out_dir: str | Path | None = None, by_layer: bool = False,
           figures: bool = True) -> tuple[list[dict], list[Path]]:
    """The drift table of a result — its folder, store or netCDF file, or its Dataset — and its
    figures, written to ``out_dir`` (default: next to the result)."""
    ds = result if isinstance(result, xr.Dataset) else open_result(result)
    rows = drift_table(ds, by_layer)
    if figures and out_dir is None and isinstance(result, xr.Dataset):
        raise FlowlabError("report: give out_dir for the figures of a Dataset")
    paths = write_figures(ds, Path(out_dir) if out_dir is not None else _out_dir(result)) if figures else []
    return rows, paths
