"""Issue 15, study 4: discretisation error of every deterministic flow of GD, its orders, and where they
break down against the edge of stability λ_max(H)·η = 2.

    python studies/discretisation_error.py            # results/discretisation_error/ (~5 min on one core)
    python studies/discretisation_error.py --smoke    # a few steps (the test suite)

Three parts, every grid point run in this process, one after another (no dask sweep: the points are
seconds each and the orders API already loops over η):

1. **Orders** (``studies/discretisation_error_{mlp,cnn}.toml``: a tanh MLP and a tanh CNN with average
   pooling, MSE, float64). For η = T/K over a grid running from λ_max·η ≈ 0.1 to past 2,
   ``flowlab.flows.orders.measure_orders`` runs K steps of full-batch GD beside gradient_flow,
   modified_loss (IGR), modified_temporal and modified_second_order (torchdiffeq dopri5, each reference
   checked ≥ 100× finer than the error it measures) and returns the global error
   e(η) = max over t ∈ [T/2, T] of |θ_GD(t) − θ_flow(t)|. GD alone runs again with ``[record] sharpness``
   for max_t λ_max(H)·η at every grid point. The order is the least-squares slope of log e against log η
   over the η with max λ_max·η ≤ ``FIT_EDGE`` (the asymptotic regime); the local order is the slope
   between neighbouring η.
2. **Edge** (the tanh MLP). On the larger η, GD runs with sharpness beside the same four flows
   (flowlab:rk4, dt = η/8) and the central flow (flowlab:euler, dt = η/4). Each dynamics' mean distance
   to GD's averaged iterate θ*_k = (θ_{k−1} + 2θ_k + θ_{k+1})/4 over t ∈ [T/2, T] (``distance_midpoint``)
   says which continuous model follows GD's time-averaged path.
3. **Symmetry** (``studies/discretisation_error_relu.toml``: the same MLP with ReLU, which has 16 rescale
   groups Q = |w_in|² − |w_out|²; tanh has none). Over the η grid, each dynamics' drift Q(T) − Q(0)
   (a vector over the groups) against GD's: the relative drift error |D_flow − D_GD| / |D_GD|.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import numpy as np
import xarray as xr

from flowlab import studykit

HERE = Path(__file__).resolve().parent
FLOWS = [  # (flow name, label in the runs, legend name, expected order vs GD)
    ("gradient_flow", "gf", "gradient flow", 1),
    ("modified_loss", "igr", "modified loss (IGR)", 2),
    ("modified_temporal", "temporal", "modified temporal", 2),
    ("modified_second_order", "second", "modified 2nd order", 3),
]
NAMES = {label: legend for _, label, legend, _ in FLOWS} | {"central": "central flow", "sgd": "GD"}
COLORS = {"gf": "C0", "igr": "C2", "temporal": "C1", "second": "C4", "central": "C3", "sgd": "k"}
FIT_EDGE = 0.5      # the fitted order uses the η with max λ_max·η ≤ this
BREAK = 0.5         # a flow's order has broken down once its local order exceeds expected + BREAK
REF_RTOL = 1e-7     # the orders' first reference rtol (tightened 10× until 100× below the error)
FULL = {"T": 2.0, "rtol": REF_RTOL,
        "K_mlp": [7, 10, 14, 20, 28, 40, 57, 80, 113, 160],
        "K_cnn": [7, 10, 14, 20, 40, 80, 160],
        "K_edge": [7, 10, 14, 20, 28, 40],
        "K_relu": [7, 10, 14, 20, 28, 40, 57, 80],
        "T_long": 10.0, "K_long": [35, 50, 70]}
SMOKE = {"T": 0.4, "rtol": 1e-5, "K_mlp": [2, 4], "K_cnn": [2, 4], "K_edge": [2, 4], "K_relu": [2, 4],
         "T_long": 0.8, "K_long": [4]}


def _raw(toml: str) -> dict:
    return tomllib.loads((HERE / toml).read_text())


def _with_lr(raw: dict, T: float, K: int, flows: bool = True, every_cap: int = 0) -> dict:
    """The study dict at η = T/K, K steps; flows' fixed steps dt = η/8 (central: η/4)."""
    eta = T / K
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    out["optimizer"] = {**raw["optimizer"], "lr": eta, "steps": K}
    if every_cap:
        out["record"] = {**raw["record"], "every": max(1, K // every_cap)}
    if flows and "flows" in raw:
        out["flows"] = [{**f, "dt": eta / (4 if f["name"] == "central_flow" else 8)} for f in raw["flows"]]
    else:
        out.pop("flows", None)
    return out


def _slope(eta: np.ndarray, err: np.ndarray) -> float:
    ok = np.isfinite(err) & (err > 0)
    return float(np.polyfit(np.log(eta[ok]), np.log(err[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")


# --------------------------------------------------------------------------------------------- part 1
def gd_sharpness(ctx, raw: dict, T: float, Ks: list[int], tag: str) -> dict:
    """GD alone at every η: max_t λ_max·η (sharpness recorded on ≤ 40 rows) and |θ_GD(T) − θ0|."""
    out = {"max_lam_eta": [], "lam0_eta": [], "travel": [], "gd_loss_T": []}
    for K in Ks:
        ds = ctx.run(ctx.parse(_with_lr(raw, T, K, flows=False, every_cap=40)), f"{tag}_gd_K{K}")
        s = ds.sharpness.sel(dynamics="sgd").values * (T / K)
        th = ds.theta.sel(dynamics="sgd").values
        out["max_lam_eta"].append(float(np.nanmax(s)))
        out["lam0_eta"].append(float(s[0]))
        out["travel"].append(float(np.linalg.norm(th[-1] - th[0])))
        out["gd_loss_T"].append(float(ds.loss.sel(dynamics="sgd").values[-1]))
    return {k: np.array(v) for k, v in out.items()}


def orders_part(ctx, toml: str, T: float, Ks: list[int], tag: str, rtol: float) -> xr.Dataset:
    from flowlab.flows.orders import measure_orders

    raw = _raw(toml)
    study = ctx.parse(_with_lr(raw, T, Ks[0], flows=False))
    ods = measure_orders(study, [T / K for K in Ks], T, flows=[f for f, *_ in FLOWS], rtol=rtol,
                         log=lambda m: print(f"[{tag}] {m.strip()}", flush=True))
    sh = gd_sharpness(ctx, raw, T, Ks, tag)
    eta = ods.lr.values  # descending
    order = np.argsort([-(T / K) for K in Ks])
    for k, v in sh.items():
        ods[k] = ("lr", v[order])
    lam = ods.max_lam_eta.values
    fit = lam <= FIT_EDGE
    ods["fit_points"] = ("lr", fit)
    ods["order_fit"] = ("flow", [_slope(eta[fit], ods.err_theta.values[i, fit]) for i in range(ods.flow.size)])
    # local order between neighbours (η_j > η_{j+1}), placed at the larger η
    e = ods.err_theta.values
    local = np.log(e[:, :-1] / e[:, 1:]) / np.log(eta[:-1] / eta[1:])[None, :]
    ods["local_order"] = (("flow", "lr"), np.concatenate([local, np.full((e.shape[0], 1), np.nan)], axis=1))
    ods["rel_err"] = (("flow", "lr"), e / ods.travel.values[None, :])
    return ods


# --------------------------------------------------------------------------------------------- part 2/3
def edge_part(ctx, toml: str, T: float, Ks: list[int], tag: str, symmetry: bool) -> xr.Dataset:
    """GD + the four flows + the central flow at each η: sharpness, distance to GD and to GD's averaged
    iterate over t ∈ [T/2, T]; with symmetry groups, every dynamics' drift Q(T) − Q(0)."""
    raw = _raw(toml)
    rows = []
    for K in Ks:
        eta = T / K
        ds = ctx.run(ctx.parse(_with_lr(raw, T, K)), f"{tag}_K{K}")
        dyn = [str(d) for d in ds.dynamics.values]
        t = ds.time.values
        win = (t >= 0.5 * T - 1e-12 * T)
        s_gd = ds.sharpness.sel(dynamics="sgd").values
        row = {"eta": eta, "K": K, "max_lam_eta": float(np.nanmax(s_gd) * eta), "lam0_eta": float(s_gd[0] * eta),
               "dynamics": dyn, "status": [str(x) for x in ds.status.values],
               "wall": [float(x) for x in ds.wall_seconds.values],
               "dist_max": [float(np.nanmax(ds.distance.sel(dynamics=d).values[win])) for d in dyn],
               "mid_mean": [float(np.nanmean(ds.distance_midpoint.sel(dynamics=d).values[win])) for d in dyn],
               "lam_eta_end": [float(ds.sharpness.sel(dynamics=d).values[-1] * eta) for d in dyn]}
        if symmetry:
            rescale = ds.group_kind.values.astype(str) == "rescale"
            D = ds.drift.values[:, -1, :][:, rescale]  # (dynamics, groups) at T
            Q0 = ds.quantity.values[0, 0, :][rescale]
            row["drift_norm"] = [float(np.linalg.norm(D[i])) for i in range(len(dyn))]
            row["drift_err"] = [float(np.linalg.norm(D[i] - D[0])) for i in range(len(dyn))]
            row["q0_norm"] = float(np.linalg.norm(Q0))
            row["groups"] = int(rescale.sum())
        rows.append(row)
        print(f"[{tag}] η={eta:.4g} max λη={row['max_lam_eta']:.2f} " + " ".join(
            f"{d}:{m:.3g}" for d, m in zip(dyn, row["mid_mean"])), flush=True)
    dyn = rows[0]["dynamics"]
    data = {k: (("eta", "dynamics"), np.array([r[k] for r in rows]))
            for k in ("status", "wall", "dist_max", "mid_mean", "lam_eta_end", *(("drift_norm", "drift_err")
                                                                                   if symmetry else ()))}
    data.update({k: ("eta", np.array([r[k] for r in rows])) for k in ("K", "max_lam_eta", "lam0_eta")})
    if symmetry:
        data["q0_norm"] = ("eta", np.array([r["q0_norm"] for r in rows]))
    out = xr.Dataset(data, coords={"eta": [r["eta"] for r in rows], "dynamics": dyn})
    if symmetry:
        out.attrs["rescale_groups"] = rows[0]["groups"]
    return out


# --------------------------------------------------------------------------------------------- analysis
def breakdown(ods: xr.Dataset) -> dict:
    """Per flow: the smallest max λ_max·η at which the local order exceeds expected + BREAK (placed at the
    larger η of the pair), or None."""
    out = {}
    lam, loc = ods.max_lam_eta.values, ods.local_order.values
    for i in range(ods.flow.size):
        bad = [j for j in range(ods.lr.size) if np.isfinite(loc[i, j]) and loc[i, j] > ods.expected_order.values[i] + BREAK]
        out[FLOWS[i][1]] = float(min(lam[j] for j in bad)) if bad else None
    return out


def edge_crossing(ods: xr.Dataset) -> float:
    """η where max λ_max·η = 2 (log-log interpolation between grid points), or NaN."""
    eta, lam = ods.lr.values[::-1], ods.max_lam_eta.values[::-1]  # ascending η
    above = np.flatnonzero(lam >= 2.0)
    if above.size == 0 or above[0] == 0:
        return float("nan")
    j = above[0]
    x0, x1, y0, y1 = np.log(eta[j - 1]), np.log(eta[j]), np.log(lam[j - 1]), np.log(lam[j])
    return float(np.exp(x0 + (np.log(2.0) - y0) * (x1 - x0) / (y1 - y0)))


def fig_errors(ctx, models: dict) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 5.0), squeeze=False)
    for ax, (title, ods) in zip(axes[0], models.items()):
        eta = ods.lr.values
        for i in range(ods.flow.size):
            label = FLOWS[i][1]
            p = int(ods.expected_order.values[i])
            ax.loglog(eta, ods.err_theta.values[i], "o-", color=COLORS[label], ms=4,
                      label=f"{NAMES[label]} (order {ods.order_fit.values[i]:.2f}, expected {p})")
            # reference slope η^p through the flow's smallest-η error
            e0 = ods.err_theta.values[i, -1]
            ax.loglog(eta, e0 * (eta / eta[-1]) ** p, ":", color=COLORS[label], lw=1)
        xc = edge_crossing(ods)
        if np.isfinite(xc):
            ax.axvline(xc, color="gray", ls="--", lw=1)
            ax.text(xc, ax.get_ylim()[0] * 1.5, "max λ_max·η = 2 \n(edge of stability) ", fontsize=7, color="gray",
                    ha="right", va="bottom")
        fit = ods.fit_points.values
        if fit.any():
            ax.axvspan(eta[fit].min(), eta[fit].max(), color="0.9", zorder=0, label=f"fit: max λ_max·η ≤ {FIT_EDGE}")
        ax.set(xlabel="learning rate η", ylabel="global error max_{t∈[T/2,T]} |θ_flow(t) − θ_GD(t)|",
               title=f"{title}: error vs η at T = {ods.attrs['horizon']:g} (t = Σ η); dotted: slope η^p")
        top = ax.secondary_xaxis("top")
        top.set_xticks(eta)
        top.set_xticklabels([f"{v:.2g}" for v in ods.max_lam_eta.values], fontsize=6, rotation=60)
        top.set_xlabel("max_t λ_max(H)·η of GD", fontsize=8)
        top.minorticks_off() if hasattr(top, "minorticks_off") else None
        _plain_log_x(ax, (0.0125, 0.025, 0.05, 0.1, 0.2, 0.3))
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Discretisation error of the continuous models of full-batch GD (float64)", fontsize=11)
    fig.tight_layout()
    ctx.savefig(fig, "error_vs_eta.png")


def _plain_log_x(a, ticks=(0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0)) -> None:
    """A log x-axis labelled with plain numbers at ``ticks`` (those inside its range)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    lo, hi = a.get_xlim()
    inside = [x for x in ticks if lo <= x <= hi]
    a.xaxis.set_major_locator(FixedLocator(inside))
    a.xaxis.set_minor_locator(NullLocator())
    a.xaxis.set_minor_formatter(NullFormatter())
    a.set_xticklabels([f"{x:g}" for x in inside])


def fig_edge(ctx, models: dict, edge: xr.Dataset, long: xr.Dataset, relu: xr.Dataset) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(17, 5.0))
    a = ax[0]
    for (title, ods), ls in zip(models.items(), ("-", "--")):
        for i in range(ods.flow.size):
            label = FLOWS[i][1]
            a.plot(ods.max_lam_eta.values, ods.local_order.values[i], "o" + ls, color=COLORS[label], ms=3,
                   label=f"{NAMES[label]}, {title}")
    for p in (1, 2, 3):
        a.axhline(p, color="gray", lw=0.6)
    a.axvline(2.0, color="gray", ls="--", lw=1)
    a.set(xscale="log", xlabel="max_t λ_max(H)·η of GD (at the larger η of each pair)",
          ylabel="local order  Δlog e / Δlog η", title="local order between neighbouring η (expected 1, 2, 2, 3)")
    _plain_log_x(a)
    a.legend(fontsize=6, ncol=2)
    a = ax[1]
    for d in edge.dynamics.values:
        d = str(d)
        a.loglog(edge.max_lam_eta.values, edge.mid_mean.sel(dynamics=d).values, "o-" if d != "sgd" else "k^:",
                 color=COLORS[d], ms=4, lw=2.2 if d == "central" else 1.2,
                 label=f"{NAMES[d]}, T = {edge.attrs['horizon']:g}" if d != "sgd" else "GD's own |θ_k − θ*_k|")
        if d != "sgd":
            a.loglog(long.max_lam_eta.values, long.mid_mean.sel(dynamics=d).values, "s--", color=COLORS[d], ms=5,
                     mfc="none", lw=1.0, label=f"{NAMES[d]}, T = {long.attrs['horizon']:g}")
    a.axvline(2.0, color="gray", ls="--", lw=1, label="edge: λ_max·η = 2")
    a.set(xlabel="max_t λ_max(H)·η of GD", ylabel="mean over t∈[T/2,T] of |θ(t) − θ*_GD(t)|",
          title="tanh MLP: distance to GD's averaged iterate θ*_k = (θ_{k−1}+2θ_k+θ_{k+1})/4")
    _plain_log_x(a)
    a.legend(fontsize=6, ncol=2)
    a = ax[2]
    for d in relu.dynamics.values[1:]:
        d = str(d)
        a.loglog(relu.max_lam_eta.values, relu.drift_err.sel(dynamics=d).values / relu.drift_norm.sel(dynamics="sgd").values,
                 "o-", color=COLORS[d], ms=4, lw=2.2 if d == "central" else 1.2, label=NAMES[d])
    a.axvline(2.0, color="gray", ls="--", lw=1, label="edge: λ_max·η = 2")
    a.set(xlabel="max_t λ_max(H)·η of GD (ReLU MLP)", ylabel="|D_flow − D_GD| / |D_GD|,  D = Q(T) − Q(0)",
          title=f"ReLU MLP: rescale-symmetry drift vs GD's ({relu.attrs['rescale_groups']} groups)")
    b = a.twinx()
    b.loglog(relu.max_lam_eta.values, relu.drift_norm.sel(dynamics="sgd").values, "k^:", ms=4, label="GD's |D_GD| (right)")
    b.set_ylabel("GD's drift |Q(T) − Q(0)| (2-norm over groups)")
    _plain_log_x(a)
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = b.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    fig.suptitle(f"Where the modified equations stop describing GD (T = {edge.attrs['horizon']:g}, t = Σ η)", fontsize=11)
    fig.tight_layout()
    ctx.savefig(fig, "edge_of_stability.png")


def _fmt(x, spec=".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def body(ctx) -> None:
    P = SMOKE if ctx.smoke else FULL
    T = P["T"]
    models = {"tanh MLP": orders_part(ctx, "discretisation_error_mlp.toml", T, P["K_mlp"], "mlp", P["rtol"]),
              "tanh CNN": orders_part(ctx, "discretisation_error_cnn.toml", T, P["K_cnn"], "cnn", P["rtol"])}
    edge = edge_part(ctx, "discretisation_error_mlp.toml", T, P["K_edge"], "edge", symmetry=False)
    long = edge_part(ctx, "discretisation_error_mlp.toml", P["T_long"], P["K_long"], "long", symmetry=False)
    relu = edge_part(ctx, "discretisation_error_relu.toml", T, P["K_relu"], "relu", symmetry=True)
    for x in (edge, relu):
        x.attrs["horizon"] = T
    long.attrs["horizon"] = P["T_long"]
    fig_errors(ctx, models)
    fig_edge(ctx, models, edge, long, relu)

    # ---- dataset: orders (model, flow, eta), edge (eta_edge, dynamics), relu (eta_relu, dynamics)
    keep = ["err_theta", "err_output", "err_loss", "ref_err", "margin", "local_order", "rel_err", "nfe"]
    parts = {}
    for key, ods in (("mlp", models["tanh MLP"]), ("cnn", models["tanh CNN"])):
        o = ods[keep + ["max_lam_eta", "lam0_eta", "travel", "order_theta", "order_fit", "order_theta_last",
                        "expected_order"]].rename({"lr": f"eta_{key}"})
        parts[key] = o.rename({v: f"{key}_{v}" for v in o.data_vars})
    e = edge.rename({"eta": "eta_edge", "dynamics": "dynamics_edge"})
    e = e.rename({v: f"edge_{v}" for v in e.data_vars})
    lg = long.rename({"eta": "eta_long", "dynamics": "dynamics_long"})
    lg = lg.rename({v: f"long_{v}" for v in lg.data_vars})
    r = relu.rename({"eta": "eta_relu", "dynamics": "dynamics_relu"})
    r = r.rename({v: f"relu_{v}" for v in r.data_vars})
    ds = xr.merge([parts["mlp"], parts["cnn"], e, lg, r], compat="override", combine_attrs="drop")
    ds.attrs.update({"horizon": T, "horizon_long": P["T_long"], "fit_max_lam_eta": FIT_EDGE, "breakdown_margin": BREAK,
                     "reference_rtol_start": P["rtol"], "convention": models["tanh MLP"].attrs["convention"]})
    ctx.save_dataset(ds, "discretisation_error.nc")

    # ---- numbers for the summary
    res: dict = {"T": T, "rtol": P["rtol"], "fit_max_lam_eta": FIT_EDGE, "models": {}}
    for title, ods in models.items():
        fit = ods.fit_points.values
        res["models"][title] = {
            "eta": ods.lr.values.tolist(), "max_lam_eta": ods.max_lam_eta.values.tolist(),
            "fit_eta": ods.lr.values[fit].tolist(), "edge_eta": edge_crossing(ods),
            "orders": {FLOWS[i][1]: {"expected": int(ods.expected_order.values[i]), "fit": float(ods.order_fit.values[i]),
                                     "last_pair": float(ods.order_theta_last.values[i]),
                                     "all_eta": float(ods.order_theta.values[i]),
                                     "err_largest_eta": float(ods.err_theta.values[i, 0]),
                                     "rel_err_largest_eta": float(ods.rel_err.values[i, 0]),
                                     "rel_err_smallest_eta": float(ods.rel_err.values[i, -1]),
                                     "min_margin": float(np.min(ods.margin.values[i]))}
                       for i in range(ods.flow.size)},
            "breakdown_lam_eta": breakdown(ods)}
    for key, x in (("edge", edge), ("long", long)):
        res[key] = {"T": float(x.attrs["horizon"]), "eta": x.eta.values.tolist(),
                    "max_lam_eta": x.max_lam_eta.values.tolist(),
                    "closest": [str(x.dynamics.values[1:][np.nanargmin(x.mid_mean.values[j, 1:])]) for j in range(x.eta.size)],
                    "mid_mean": {str(d): x.mid_mean.sel(dynamics=d).values.tolist() for d in x.dynamics.values},
                    "status": {str(d): sorted(set(x.status.sel(dynamics=d).values.tolist())) for d in x.dynamics.values},
                    "wall_seconds": {str(d): float(x.wall.sel(dynamics=d).sum()) for d in x.dynamics.values}}
    rel = relu.drift_err.values / relu.drift_norm.sel(dynamics="sgd").values[:, None]
    res["relu"] = {"eta": relu.eta.values.tolist(), "max_lam_eta": relu.max_lam_eta.values.tolist(),
                   "gd_drift": relu.drift_norm.sel(dynamics="sgd").values.tolist(),
                   "q0_norm": relu.q0_norm.values.tolist(),
                   "rel_drift_err": {str(d): rel[:, i].tolist() for i, d in enumerate(relu.dynamics.values) if i},
                   "status": {str(d): sorted(set(relu.status.sel(dynamics=d).values.tolist())) for d in relu.dynamics.values}}
    below = relu.max_lam_eta.values <= FIT_EDGE
    res["relu"]["drift_err_order"] = {str(d): _slope(relu.eta.values[below], relu.drift_err.values[below, i])
                                      for i, d in enumerate(relu.dynamics.values) if i}
    res["relu"]["gd_drift_order"] = _slope(relu.eta.values[below], relu.drift_norm.sel(dynamics="sgd").values[below])
    ctx.write_json(res)
    ctx.write_summary("Discretisation error of the continuous models of GD, and the edge of stability",
                      found=found_sentences(res), body=summary_body(res, models, edge, long, relu))


def found_sentences(res: dict) -> list[str]:
    out = []
    for title, m in res["models"].items():
        o = m["orders"]
        fails = [k for k, v in o.items() if not abs(v["fit"] - v["expected"]) <= 0.2]
        out.append(f"On the {title} the measured orders (fit over η ≤ {max(m['fit_eta']) if m['fit_eta'] else float('nan'):.3g}, "
                   f"max λ_max·η ≤ {FIT_EDGE}) are " + ", ".join(f"{v['fit']:.2f}" for v in o.values())
                   + " for " + ", ".join(NAMES[k] for k in o) + " (expected "
                   + ", ".join(str(v["expected"]) for v in o.values()) + "; "
                   + ("all within 0.2" if not fails else "off by more than 0.2: " + ", ".join(
                       f"{NAMES[k]}, whose slope is still falling (the two smallest η give {o[k]['last_pair']:.2f})"
                       if o[k]["last_pair"] < o[k]["fit"] else NAMES[k] for k in fails)) + ").")
        br = m["breakdown_lam_eta"]
        out.append(f"Going up in η, the local order first exceeds expected + {BREAK} at max λ_max·η = "
                   + ", ".join(f"{_fmt(br[k], '.2f')} ({NAMES[k]})" for k in o) + "; at the largest η (max λ_max·η = "
                   f"{m['max_lam_eta'][0]:.2f}) every flow's error is "
                   + f"{min(v['rel_err_largest_eta'] for v in o.values()):.2f}–{max(v['rel_err_largest_eta'] for v in o.values()):.2f}"
                   " of the distance GD travelled, against "
                   + f"{min(v['rel_err_smallest_eta'] for v in o.values()):.1e}–{max(v['rel_err_smallest_eta'] for v in o.values()):.1e}"
                   " at the smallest η.")
    for key in ("edge", "long"):
        e = res[key]
        past = [j for j, v in enumerate(e["max_lam_eta"]) if v > 2.0]
        if past:
            def one(j: int, e: dict = e) -> str:
                mids = {d: v[j] for d, v in e["mid_mean"].items() if d != "sgd"}
                best = e["closest"][j]
                runner = min((d for d in mids if d != best), key=lambda d: mids[d])
                text = (f"η = {e['eta'][j]:.3g} (max λ_max·η = {e['max_lam_eta'][j]:.2f}): {NAMES[best]} {mids[best]:.3g}, "
                        f"next {NAMES[runner]} {mids[runner]:.3g}")
                return text + ("" if "central" in (best, runner) else f", central flow {mids['central']:.3g}")
            wins = [e["closest"][j] for j in past]
            out.append(f"Past the edge, at T = {e['T']:g}, the continuous model closest on average to GD's averaged "
                       "iterate is: " + "; ".join(one(j) for j in past)
                       + f" — the central flow at {sum(w == 'central' for w in wins)} of these {len(past)} η.")
        else:
            out.append(f"No η of the T = {e['T']:g} edge runs took GD past λ_max·η = 2.")
    r = res["relu"]
    k = int(np.argmin(r["eta"]))
    out.append(f"On the ReLU MLP GD's rescale drift |Q(T) − Q(0)| grows like η^{r['gd_drift_order']:.2f} below the edge; "
               "the drift error relative to GD's at the smallest η is "
               + ", ".join(f"{r['rel_drift_err'][d][k]:.2g} ({NAMES[d]})" for d in r["rel_drift_err"])
               + f", and at the largest η (max λ_max·η = {r['max_lam_eta'][0]:.2f}) "
               + ", ".join(f"{r['rel_drift_err'][d][0]:.2g} ({NAMES[d]})" for d in r["rel_drift_err"]) + ".")
    return out


def _edge_table(x: xr.Dataset, closest: list[str]) -> list[str]:
    L = ["| η | K | max λ_max·η | GD's own \\|θ_k − θ*_k\\| | " + " | ".join(NAMES[str(d)] for d in x.dynamics.values[1:])
         + " | closest |", "|---|---|---|---|" + "---|" * (x.dynamics.size - 1) + "---|"]
    for j in range(x.eta.size):
        L.append(f"| {x.eta.values[j]:.3g} | {int(x.K.values[j])} | {x.max_lam_eta.values[j]:.2f} | {x.mid_mean.values[j, 0]:.3g} | "
                 + " | ".join(f"{x.mid_mean.values[j, i]:.3g}" for i in range(1, x.dynamics.size))
                 + f" | {NAMES[closest[j]]} |")
    return L


def summary_body(res: dict, models: dict, edge: xr.Dataset, long: xr.Dataset, relu: xr.Dataset) -> list[str]:
    T = res["T"]
    L = ["## Setting", "",
         f"Horizon T = {T:g} (t = Σ η), η = T/K. Global error e(η) = max over t ∈ [T/2, T] of |θ_flow(t) − θ_GD(t)| "
         "(flowlab.flows.orders.measure_orders: torchdiffeq dopri5 from rtol "
         f"{res['rtol']:g}, each reference checked by a 10× tighter one; the smallest margin error ÷ reference error is "
         "in the table). max λ_max·η is GD's largest sharpness × η along its run (warm-started LOBPCG on at most "
         "40 rows per run). Every grid point is run in this process, one after another (no dask sweep).",
         "- tanh MLP 64-16-10 and tanh CNN (conv 3×3, 4 channels, 2×2 average pool, linear 64→10), MSE, 128 "
         "digits, float64, no weight decay (`studies/discretisation_error_mlp.toml`, `..._cnn.toml`).",
         "- Edge runs (tanh MLP): the same four flows by flowlab:rk4 (dt = η/8) and the central flow by "
         "flowlab:euler (dt = η/4) beside GD, sharpness recorded every step.",
         "- Symmetry runs: the MLP with ReLU (`..._relu.toml`), 16 rescale groups; D = Q(T) − Q(0).", ""]
    for title, m in res["models"].items():
        ods = models[title]
        L += [f"## Orders: {title}", "",
              "| flow | expected | order (fit, max λη ≤ " + f"{FIT_EDGE}) | slope of the two smallest η | slope over all η "
              f"| e at the largest η ({ods.lr.values[0]:.3g}) | e ÷ \\|θ_GD(T) − θ0\\| there | the same at the smallest η "
              f"({ods.lr.values[-1]:.3g}) | breakdown at max λη | min margin |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in m["orders"].items():
            L.append(f"| {NAMES[k]} | {v['expected']} | {v['fit']:.2f} | {v['last_pair']:.2f} | {v['all_eta']:.2f} | "
                     f"{v['err_largest_eta']:.3g} | {v['rel_err_largest_eta']:.2f} | {v['rel_err_smallest_eta']:.1e} | {_fmt(m['breakdown_lam_eta'][k], '.2f')} | "
                     f"{v['min_margin']:.0f} |")
        L += ["", "| η | " + " | ".join(f"{x:.3g}" for x in ods.lr.values) + " |",
              "|---|" + "---|" * ods.lr.size,
              "| max λ_max·η | " + " | ".join(f"{x:.2f}" for x in ods.max_lam_eta.values) + " |"]
        for i in range(ods.flow.size):
            L.append(f"| e: {NAMES[FLOWS[i][1]]} | " + " | ".join(f"{x:.2e}" for x in ods.err_theta.values[i]) + " |")
        for i in range(ods.flow.size):
            L.append(f"| local order: {NAMES[FLOWS[i][1]]} | " + " | ".join(_fmt(float(x), ".2f")
                                                                            for x in ods.local_order.values[i]) + " |")
        L.append("")
    L += [f"Breakdown: the smallest max λ_max·η at which a flow's local order (slope to the next smaller η) exceeds its "
          f"expected order + {BREAK}; the error there grows faster than the modified-equation expansion says.", "",
          "![error vs η](error_vs_eta.png)", "",
          f"## Edge of stability: distance to GD's averaged iterate (tanh MLP), T = {T:g}", "",
          *_edge_table(edge, res["edge"]["closest"]), "",
          f"The same at T = {res['long']['T']:g} (GD has {res['long']['T'] / 2:g} units of t to settle at the edge before "
          "the window):", "", *_edge_table(long, res["long"]["closest"])]
    L += ["", "Mean over t ∈ [T/2, T] of |θ(t) − θ*_GD(t)|, θ*_k = (θ_{k−1} + 2θ_k + θ_{k+1})/4. Below the edge "
          "the central flow is gradient flow integrated by Euler at dt = η/4 (so it is not expected to beat the others "
          "there; for the same reason its rescale drift below is GD's step at η/4, a quarter of GD's drift, and its "
          "relative drift error tends to 0.75 as η → 0). Statuses: " + "; ".join(f"{NAMES[d]} {', '.join(sorted(set(s) | set(res['long']['status'][d])))}"
                                    for d, s in res["edge"]["status"].items())
          + ". Wall seconds summed over the edge runs (T = " + f"{T:g}; T = {res['long']['T']:g}): "
          + ", ".join(f"{NAMES[d]} {v:.1f}; {res['long']['wall_seconds'][d]:.1f}" for d, v in res["edge"]["wall_seconds"].items())
          + ".", "",
          "## Symmetry drift vs GD's (ReLU MLP, rescale groups)", "",
          "| η | max λ_max·η | \\|D_GD\\| | " + " | ".join(f"{NAMES[str(d)]}: \\|D − D_GD\\|/\\|D_GD\\|"
                                                        for d in relu.dynamics.values[1:]) + " |",
          "|---|---|---|" + "---|" * (relu.dynamics.size - 1)]
    r = res["relu"]
    for j in range(relu.eta.size):
        L.append(f"| {relu.eta.values[j]:.3g} | {relu.max_lam_eta.values[j]:.2f} | {r['gd_drift'][j]:.3g} | "
                 + " | ".join(f"{r['rel_drift_err'][str(d)][j]:.3g}" for d in relu.dynamics.values[1:]) + " |")
    L += ["", f"Slope of log \\|D_flow − D_GD\\| vs log η over max λ_max·η ≤ {FIT_EDGE}: "
          + ", ".join(f"{NAMES[d]} {_fmt(v, '.2f')}" for d, v in r["drift_err_order"].items())
          + f"; GD's own drift: {r['gd_drift_order']:.2f}. |Q(0)| = {r['q0_norm'][0]:.3g}. Statuses: "
          + "; ".join(f"{NAMES[d]} {', '.join(s)}" for d, s in r["status"].items()) + ".", "",
          "![edge of stability](edge_of_stability.png)"]
    return L


if __name__ == "__main__":
    sys.exit(studykit.main("discretisation_error", body))
