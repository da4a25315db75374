"""How well the theory predicts each run: |Q − Q_pred| / max(|Q(0)|, scale), per variant × kind (× layer).

``scale`` is the symmetry recorder's ``group_scale`` (Σ_A|θ_i(0)| for translation, |θ_A(0)|² for
scale, |θ_A1(0)|² + |θ_A2(0)|² for rescale): docs/theory.md#theory-relative-error.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

KINDS = ("translation", "scale", "rescale")


def relative_error(ds: xr.Dataset, variant: str, index: int = 0) -> np.ndarray:
    """(time, symmetry_group) relative error of ``variant`` against the measured quantity of the
    dynamics at ``index`` (the discrete run)."""
    Q = ds["quantity"].isel(dynamics=index).values
    scale = np.maximum(np.abs(Q[0]), ds["group_scale"].values.astype(np.float64))
    scale = np.where(scale > 0, scale, 1e-300)
    return np.abs(ds["theory"].sel(variant=variant).values - Q) / scale


def theory_table(ds: xr.Dataset, by_layer: bool = False) -> list[dict]:
    """Rows: variant, kind, [layer], groups, max and final relative error."""
    if "theory" not in ds:
        return []
    kinds = ds["group_kind"].values.astype(str)
    layers = ds["group_layer"].values.astype(str)
    keys = [(k, None) for k in KINDS if (kinds == k).any()]
    if by_layer:
        keys = [(k, la) for k in KINDS for la in dict.fromkeys(layers[kinds == k])]
    # the last row with a finite measurement (a diverged run stops early)
    Q = ds["quantity"].isel(dynamics=0).values
    finite_rows = np.flatnonzero(np.isfinite(Q).all(axis=1))
    last = int(finite_rows[-1]) if finite_rows.size else -1
    rows = []
    for variant in ds["variant"].values.astype(str):
        err = relative_error(ds, variant)
        for kind, layer in keys:
            mask = (kinds == kind) if layer is None else ((kinds == kind) & (layers == layer))
            block = err[: last + 1, mask]
            row = {"variant": variant, "kind": kind, "groups": int(mask.sum()),
                   "max_rel_error": float(np.nanmax(block)) if np.isfinite(block).any() else float("nan"),
                   "final_rel_error": float(np.nanmax(block[-1])) if np.isfinite(block[-1]).any() else float("nan")}
            if by_layer:
                row["layer"] = layer
            rows.append(row)
    return rows


def flow_law_table(ds: xr.Dataset) -> list[dict]:
    """Per flow × kind: how well the flow obeys its own law (max |Q_flow − Q_law| / scale) and how
    closely its quantities track the discrete run's (max |Q_flow − Q_sgd| / scale)."""
    if "flow_law" not in ds:
        return []
    kinds = ds["group_kind"].values.astype(str)
    scale = ds["group_scale"].values.astype(np.float64)
    scale = np.where(scale > 0, scale, 1e-300)
    Q = ds["quantity"].values
    law = ds["flow_law"].values
    rows = []
    for i, label in enumerate(ds["dynamics"].values.astype(str)):
        if i == 0 or not np.isfinite(law[i]).any():
            continue
        obey = np.abs(Q[i] - law[i]) / scale
        track = np.abs(Q[i] - Q[0]) / scale
        for kind in KINDS:
            m = kinds == kind
            if m.any():
                rows.append({"dynamics": label, "kind": kind, "groups": int(m.sum()),
                             "obeys_law": float(np.nanmax(obey[:, m])), "tracks_sgd": float(np.nanmax(track[:, m]))})
    return rows


def print_theory(request) -> list:
    """The theory part of ``flowlab report`` (a :class:`flowlab.parts.ReportRequest`): tables, and a
    Fig. 5-style figure next to the result."""
    from rich.markup import escape
    from rich.table import Table

    ds, console, by_layer = request.dataset, request.console, request.by_layer
    paths = []
    rows = theory_table(ds, by_layer)
    if rows:
        table = Table(title="theory vs measured (sgd): |Q − Q_pred| / max(|Q(0)|, scale)")
        cols = ["variant", "kind"] + (["layer"] if by_layer else []) + ["groups", "max", "final"]
        for c in cols:
            table.add_column(c, justify="left" if c in ("variant", "kind", "layer") else "right")
        for r in rows:
            table.add_row(r["variant"], r["kind"], *([escape(r["layer"])] if by_layer else []), str(r["groups"]),
                          f"{r['max_rel_error']:.3g}", f"{r['final_rel_error']:.3g}")
        console.print(table)
    flows = flow_law_table(ds)
    if flows:
        table = Table(title="flows: their own law, and the discrete run (relative to scale)")
        for c in ("dynamics", "kind", "groups", "obeys its law", "tracks sgd"):
            table.add_column(c, justify="left" if c in ("dynamics", "kind") else "right")
        for r in flows:
            table.add_row(escape(r["dynamics"]), r["kind"], str(r["groups"]), f"{r['obeys_law']:.3g}", f"{r['tracks_sgd']:.3g}")
        console.print(table)
    if request.figures and rows:
        from .figures import theory_figure

        paths.append(theory_figure(ds, request.folder / "theory_fig5.png"))
    return paths
