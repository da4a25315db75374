"""The figure every ``flowlab report`` writes: ``loss.png``, each dynamics' loss against t = Σ η_k,
its status in the legend, and a cross where a dynamics that stopped early (diverged, blew up,
interrupted) has its last finite value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

LABEL_WIDTH = 70


def loss_figure(ds: xr.Dataset, out_dir: str | Path) -> Path | None:
    """Write ``loss.png`` into ``out_dir``; None when the Dataset has no ``loss`` rows."""
    if "loss" not in ds or ds.sizes.get("time", 0) == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = ds["time"].values
    loss = ds["loss"]
    if "sample" in loss.dims:  # an ensemble's Dataset: the mean over the replicas that are still there
        loss = loss.where(np.isfinite(loss)).mean("sample")
    values = np.asarray(loss.values, dtype=np.float64).reshape(len(ds["dynamics"]), len(t))
    status = [str(s) for s in ds["status"].values] if "status" in ds else ["?"] * len(values)
    positive = bool(np.all(values[np.isfinite(values)] > 0)) and np.isfinite(values).any()
    if positive:  # log10 by hand: matplotlib's log axis fails on the ~1e300 spans of a divergence
        with np.errstate(all="ignore"):
            values = np.log10(values)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, label in enumerate(ds["dynamics"].values):
        y = np.where(np.isfinite(values[i]), values[i], np.nan)
        text = f"{label}: {status[i]}"
        text = text if len(text) <= LABEL_WIDTH else text[: LABEL_WIDTH - 3] + "..."
        (line,) = ax.plot(t, y, lw=1.2, label=text)
        finite = np.flatnonzero(np.isfinite(y))
        if status[i] not in ("ok", "running") and finite.size:
            j = finite[-1]
            ax.plot([t[j]], [y[j]], "x", ms=9, mew=2, color=line.get_color())
    ax.set_xlabel("t = Σ η_k")
    ax.set_ylabel("log10 loss" if positive else "loss")
    ax.set_title(f"{ds.attrs.get('study_name', '')}: loss of each dynamics (x: last finite value of one that stopped)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / "loss.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
