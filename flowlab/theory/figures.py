"""Figures in the style of Kunin et al. (2021), Fig. 5: measured quantities in colour, the theory's
prediction as black dashes — translation on the last layer, scale on BatchNorm'd channels, rescale
between two layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr


def _default_variant(ds: xr.Dataset) -> str:
    variants = list(ds["variant"].values.astype(str))
    for v in ("oscillator", "paper", "exact_discrete"):
        if v in variants:
            return v
    return variants[0]


def pick_groups(ds: xr.Dataset, kind: str, count: int) -> tuple[str, np.ndarray] | None:
    """A layer (the last for translation, the middle one otherwise) and its ``count`` groups of
    ``kind`` with the largest drift relative to their scale (Fig. 5: a handful of groups)."""
    kinds = ds["group_kind"].values.astype(str)
    layers = ds["group_layer"].values.astype(str)
    idx = np.flatnonzero(kinds == kind)
    if idx.size == 0:
        return None
    order = list(dict.fromkeys(layers[idx]))
    layer = order[-1] if kind == "translation" else order[len(order) // 2]
    members = idx[layers[idx] == layer]
    drift = np.abs(ds["drift"].isel(dynamics=0).values[:, members])
    score = np.nanmax(drift, axis=0) / np.maximum(np.abs(ds["group_scale"].values[members]), 1e-300)
    chosen = members[np.argsort(-np.nan_to_num(score))[:count]]
    return layer, np.sort(chosen)


def theory_figure(ds: xr.Dataset, path: str | Path, variant: str | None = None, count: int = 6,
                  title: str | None = None) -> Path:
    """Measured Q(t) (colour) and the ``variant`` prediction (black dashes), one panel per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variant = variant or _default_variant(ds)
    kinds = [k for k in ("translation", "scale", "rescale") if pick_groups(ds, k, 1) is not None]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), squeeze=False)
    t = ds["time"].values
    Q = ds["quantity"].isel(dynamics=0).values
    P = ds["theory"].sel(variant=variant).values
    colours = plt.cm.viridis(np.linspace(0.05, 0.9, count))
    for ax, kind in zip(axes[0], kinds):
        layer, chosen = pick_groups(ds, kind, count)
        for c, g in zip(colours, chosen):
            ax.plot(t, Q[:, g], color=c, lw=1.6)
            ax.plot(t, P[:, g], color="k", lw=1.0, ls="--")
        ax.set_title(f"{kind}: {layer}", fontsize=9)
        ax.set_xlabel("t = Σ η_k")
    axes[0][0].set_ylabel("quantity (colour: measured, dashes: theory)")
    fig.suptitle(f"{title or ds.attrs.get('study_name', '')}: theory = {variant}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
