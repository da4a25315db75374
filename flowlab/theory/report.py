"""How well the theory predicts each run: |Q − Q_pred| / max(|Q(0)|, scale), per variant × kind (× layer).

``scale`` is the symmetry recorder's ``group_scale`` (Σ_A|θ_i(0)| for translation, |θ_A(0)|² for
scale, |θ_A1(0)|² + |θ_A2(0)|² for rescale): THEORY.md "How agreement is measured".
"""

from __future__ import annotations

import numpy as np
import xarray as xr

KINDS = ("translation", "scale", "rescale")


def relative_error(ds: xr.Dataset, variant: str, method: int = 0) -> np.ndarray:
    """(time, group) relative error of ``variant`` against the measured quantity of the discrete run."""
    Q = ds["quantity"].isel(method=method).values
    scale = np.maximum(np.abs(Q[0]), ds["group_scale"].values.astype(np.float64))
    scale = np.where(scale > 0, scale, 1e-300)
    return np.abs(ds["theory"].sel({"variant": variant}).values - Q) / scale


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
    Q = ds["quantity"].isel(method=0).values
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
