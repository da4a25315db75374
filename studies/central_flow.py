"""Run studies/central_flow.toml (GD at the edge of stability with the central flow, gradient flow and
IGR beside it) and write results/central_flow/: summary.md, summary.json, central_flow.nc and
central_flow.png.

    python studies/central_flow.py            # runs into runs/central_flow/, writes results/central_flow/
    python studies/central_flow.py --smoke    # a few steps at a larger η (the test suite)

Measured (every number below is computed here from the run's Dataset):

- GD's sharpness: the first step it reaches 2/η (−5 %), and from a few steps after it to the end its
  mean, min and max in units of 2/η;
- the central flow's sharpness over the same phase: the largest |S/(2/η) − 1|;
- |θ − θ*| (``distance_midpoint``, θ* = GD's iterates averaged over its period-2 oscillation) of the
  central flow, gradient flow and IGR over the phase, and the factors GF/central, IGR/central;
- the central flow's predicted loss L + tr(Σ)/η against GD's loss averaged over ``window`` steps
  (``loss_window_mean``, aligned at the window's centre): the largest and the mean relative error;
- the symmetry law of the extra term on a small ReLU network with rescale and translation groups
  (:func:`law_check`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import flowlab
from flowlab import studykit

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "central_flow.toml"
SETTLE = 10  # steps after GD first reaches the edge before the phase is measured


def _phase_figures(ds, phase: np.ndarray, edge: float) -> dict:
    """The figures over the rows ``phase`` (a boolean mask along time)."""
    out: dict = {"steps": [int(ds.step.values[phase][0]), int(ds.step.values[phase][-1])]}
    r_gd = ds.sharpness.sel(dynamics="sgd").values[phase] / edge
    out["gd_sharpness_over_edge"] = {"mean": float(r_gd.mean()), "min": float(r_gd.min()), "max": float(r_gd.max()),
                                     "within_10pct": float(np.mean(np.abs(r_gd - 1) <= 0.10))}
    r_c = ds.sharpness.sel(dynamics="central").values[phase] / edge
    out["central_sharpness_over_edge"] = {"mean": float(r_c.mean()), "min": float(r_c.min()), "max": float(r_c.max()),
                                          "max_abs_dev": float(np.max(np.abs(r_c - 1)))}
    dists = {}
    for label in ("central", "gf", "igr"):
        d = ds.distance_midpoint.sel(dynamics=label).values[phase]
        dists[label] = {"mean": float(np.nanmean(d)), "final": float(d[np.isfinite(d)][-1])}
    out["distance_to_gd_midpoint"] = dists
    for other in ("gf", "igr"):
        out[f"factor_{other}_over_central"] = dists[other]["mean"] / dists["central"]["mean"]
        out[f"factor_{other}_over_central_final"] = dists[other]["final"] / dists["central"]["final"]
    # the predicted loss at step c against GD's mean over steps c − (W−1)/2 … c + (W−1)/2 (the trailing
    # W-step mean recorded at step c + (W−1)/2)
    W = int(ds.loss_window_mean.attrs["window"])
    shift = (W - 1) // 2
    wm = ds.loss_window_mean.values
    centre = np.flatnonzero(phase)  # rows compared: the window's centre in the phase
    centre = centre[(centre + shift < len(wm))]
    centre = centre[np.isfinite(wm[centre + shift])]
    mean = wm[centre + shift]
    for label, values in (("central", ds.predicted_loss.sel(dynamics="central").values),
                          ("gf", ds.loss.sel(dynamics="gf").values), ("igr", ds.loss.sel(dynamics="igr").values)):
        rel = np.abs(values[centre] - mean) / mean
        out[f"{label}_loss_rel_error"] = {"max": float(rel.max()), "mean": float(rel.mean())}
    return out


def analyse(ds, settle: int = SETTLE) -> dict:
    """The figures of the module docstring, from a run of studies/central_flow.toml: over the edge
    phase (``settle`` steps after GD's sharpness first reaches 0.95·2/η, to the end) and over the
    hovering phase (from where GD's sharpness, after overshooting 1.1·2/η, first comes back within
    5 % of 2/η; the edge phase when it never overshoots)."""
    study = json.loads(ds.attrs["study"])
    eta = float(study["optimizer"]["lr"])
    edge = 2.0 / eta
    steps = ds.step.values
    s_gd = ds.sharpness.sel(dynamics="sgd").values
    reached = np.flatnonzero(s_gd >= 0.95 * edge)
    if reached.size == 0:
        return {"eta": eta, "edge": edge, "reached_edge": False, "sharpness_max_gd": float(np.nanmax(s_gd))}
    onset = int(steps[reached[0]])
    last = steps < steps[-1]
    edge_phase = (steps >= onset + settle) & last
    over = np.flatnonzero((steps >= onset) & (s_gd > 1.1 * edge))
    hover_start = onset + settle
    overshoot = None
    if over.size:
        back = np.flatnonzero((np.arange(len(steps)) > over[0]) & (s_gd <= 1.05 * edge))
        if back.size:
            hover_start = int(steps[back[0]])
            overshoot = {"from_step": int(steps[over[0]]), "to_step": hover_start,
                         "max_over_edge": float(s_gd[over[0]:back[0]].max() / edge)}
    hover_phase = (steps >= hover_start) & last
    W = int(ds.loss_window_mean.attrs["window"])
    crit = np.flatnonzero(ds.critical_directions.sel(dynamics="central").values >= 1)
    s_c = ds.sharpness.sel(dynamics="central").values / edge
    return {
        "central_first_critical_step": int(steps[crit[0]]) if crit.size else None,
        "central_max_dev_from_first_critical": float(np.max(np.abs(s_c[crit[0]:] - 1))) if crit.size else None,
        "eta": eta, "edge": edge, "reached_edge": True, "onset_step": onset, "window": W, "overshoot": overshoot,
        "edge_phase": _phase_figures(ds, edge_phase, edge), "hover_phase": _phase_figures(ds, hover_phase, edge),
        "whole_run": _phase_figures(ds, last, edge),
        "critical_directions_max": int(np.nanmax(ds.critical_directions.sel(dynamics="central").values)),
        "status": {str(k): str(v) for k, v in zip(ds.dynamics.values, ds.status.values)},
        "wall_seconds": {str(k): float(v) for k, v in zip(ds.dynamics.values, ds.wall_seconds.values)},
        **({"symmetry_law_max_abs_diff_over_scale": _law(ds)} if "central_term" in ds else {}),
    }


LAW_STUDY = {
    "study": {"name": "central_flow_law", "dtype": "float64", "device": "cpu", "seed": 0},
    "model": {"name": "mlp", "widths": [16], "activation": "relu"},
    "data": {"name": "digits", "n": 200},
    "loss": {"name": "cross_entropy"},
    "optimizer": {"lr": 0.1, "steps": 40, "batch_size": "full"},
    "record": {"every": 1, "projections": 0, "snapshot_every": "ends"},
    "symmetry": {"enabled": True},
    "flows": [{"name": "central_flow", "label": "central"}],
}


def law_check(out_dir: Path, steps: int = 40) -> dict:
    """The symmetry law of ½∇⟨H, Σ⟩ on a run with rescale and translation groups (ReLU MLP 64-16-10,
    cross-entropy, 200 digits, float64, η with η·λ_max(θ0) = 2.4, 40 steps, no weight decay): the
    recorded ``central_term`` (from the field) against ``central_law`` (the law's right-hand side),
    and how far the term moves the rescale quantities (Q' = central_law exactly, λ = 0)."""
    from flowlab.spectrum import EigenTracker, HessianAt

    study = flowlab.parse_study(LAW_STUDY)
    problem = flowlab.build(study).problem
    s0 = EigenTracker(2, 1e-8).solve(HessianAt(problem, problem.theta0), problem.theta0).top
    lr = 2.4 / s0
    study = study.with_overrides([f"optimizer.lr={lr}", f"optimizer.steps={steps}"])
    ds = flowlab.run(study, out_dir, overwrite=True).load()
    kinds = ds.group_kind.values
    tr = kinds == "translation"
    term = ds.central_term.sel(dynamics="central").values
    law = ds.central_law.sel(dynamics="central").values
    scale = float(np.nanmax(np.abs(law[:, ~tr])))
    drift = ds.drift.sel(dynamics="central").values[:, ~tr]
    q0 = ds.quantity.sel(dynamics="central").values[0, ~tr]
    return {"eta": lr, "steps": steps, "status": [str(x) for x in ds.status.values],
            "groups": {str(k): int((kinds == k).sum()) for k in sorted(set(kinds))},
            "term_vs_law_max_abs_diff_over_scale": float(np.nanmax(np.abs(term - law)[:, ~tr]) / scale),
            "translation_term_max_over_scale": float(np.nanmax(np.abs(term[:, tr])) / scale) if tr.any() else 0.0,
            "rescale_max_abs_q0": float(np.abs(q0).max()), "rescale_max_abs_drift": float(np.abs(drift[-1]).max())}


def _law(ds) -> float:
    term = ds.central_term.sel(dynamics="central").values
    law = ds.central_law.sel(dynamics="central").values
    ok = np.isfinite(term) & np.isfinite(law)
    scale = float(np.abs(law[ok]).max()) if ok.any() else 0.0
    return float(np.abs(term - law)[ok].max() / scale) if scale else 0.0


def figure(ds, res: dict):
    import matplotlib.pyplot as plt

    t = ds.time.values
    eta, edge = res["eta"], res["edge"]
    colors = {"sgd": "k", "central": "C3", "gf": "C0", "igr": "C2"}
    names = {"sgd": "GD", "central": "central flow", "gf": "gradient flow", "igr": "IGR"}
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    a = ax[0, 0]
    for label in ("sgd", "gf", "igr", "central"):
        a.plot(t, ds.sharpness.sel(dynamics=label), color=colors[label], lw=1.0 if label == "sgd" else 1.6,
               label=names[label])
    a.axhline(edge, color="gray", ls="--", lw=1, label="2/η")
    a.set(xlabel="t = Σ η", ylabel="sharpness λ_max(H)", title="sharpness")
    a.legend(fontsize=8)
    a = ax[0, 1]
    a.plot(t, ds.loss.sel(dynamics="sgd"), color="k", lw=0.6, alpha=0.5, label="GD loss")
    W = res.get("window", 1)
    shift = (W - 1) // 2
    wm = ds.loss_window_mean.values
    a.plot(t[:len(t) - shift], wm[shift:], color="k", lw=1.6, label=f"GD loss, {W}-step mean (centred)")
    a.plot(t, ds.predicted_loss.sel(dynamics="central"), color="C3", lw=1.6, label="central: L + tr Σ/η")
    a.plot(t, ds.loss.sel(dynamics="central"), color="C3", ls=":", lw=1.2, label="central: L(θ)")
    a.plot(t, ds.loss.sel(dynamics="gf"), color="C0", lw=1.2, label="gradient flow: L(θ)")
    a.set(xlabel="t = Σ η", ylabel="loss", yscale="log", title="loss")
    a.legend(fontsize=8)
    a = ax[1, 0]
    for label in ("central", "gf", "igr"):
        a.plot(t, ds.distance_midpoint.sel(dynamics=label), color=colors[label], label=names[label])
    a.set(xlabel="t = Σ η", ylabel="|θ − θ*_GD|", yscale="log",
          title="distance to GD's averaged iterate θ* = (θ_{k−1} + 2θ_k + θ_{k+1})/4")
    a.legend(fontsize=8)
    a = ax[1, 1]
    a.plot(t, ds.sigma_trace.sel(dynamics="central"), color="C3", label="tr Σ")
    a.set(xlabel="t = Σ η", ylabel="tr Σ", title="central flow: tr Σ and critical directions")
    b = a.twinx()
    b.step(t, ds.critical_directions.sel(dynamics="central"), color="C1", where="post", label="critical directions")
    b.set_ylabel("critical directions")
    a.legend(loc="upper left", fontsize=8)
    b.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"full-batch GD at η = {eta:g} (2/η = {edge:g}) and its central flow", fontsize=11)
    fig.tight_layout()
    return fig


def _rows(ph: dict, W: int) -> list[str]:
    g, c, d = ph["gd_sharpness_over_edge"], ph["central_sharpness_over_edge"], ph["distance_to_gd_midpoint"]
    p, pg, pi = ph["central_loss_rel_error"], ph["gf_loss_rel_error"], ph["igr_loss_rel_error"]
    return [
        f"| GD sharpness ÷ (2/η): mean (min … max) | {g['mean']:.3f} ({g['min']:.3f} … {g['max']:.3f}) |",
        f"| GD: fraction of rows within ±10 % of 2/η | {g['within_10pct']:.2f} |",
        f"| central flow sharpness ÷ (2/η): mean (min … max) | {c['mean']:.5f} ({c['min']:.5f} … {c['max']:.5f}) |",
        f"| central flow: largest \\|S/(2/η) − 1\\| | {c['max_abs_dev']:.2e} |",
        f"| mean \\|θ − θ*_GD\\|: central / gradient flow / IGR | {d['central']['mean']:.4g} / {d['gf']['mean']:.4g} / "
        f"{d['igr']['mean']:.4g} |",
        f"| factor gradient flow ÷ central: mean; at the end | {ph['factor_gf_over_central']:.2f}; "
        f"{ph['factor_gf_over_central_final']:.2f} |",
        f"| factor IGR ÷ central: mean; at the end | {ph['factor_igr_over_central']:.2f}; "
        f"{ph['factor_igr_over_central_final']:.2f} |",
        f"| central L + tr Σ/η vs GD's {W}-step mean loss: max (mean) relative error | {p['max']:.4f} ({p['mean']:.4f}) |",
        f"| gradient flow's L vs the same: max (mean) | {pg['max']:.4f} ({pg['mean']:.4f}) |",
        f"| IGR's L vs the same: max (mean) | {pi['max']:.4f} ({pi['mean']:.4f}) |",
    ]


def summary_lines(res: dict) -> tuple[list[str], list[str]]:
    """(found, body) of summary.md, every number from ``res``."""
    if not res.get("reached_edge"):
        return ([f"GD did not reach the edge (max sharpness {res['sharpness_max_gd']:.3g} < 0.95·2/η = "
                 f"{0.95 * res['edge']:.3g})."], [])
    e, h, o, W = res["edge_phase"], res["hover_phase"], res["overshoot"], res["window"]
    p = e["central_loss_rel_error"]
    found = [
        f"GD's sharpness reaches 2/η at step {res['onset_step']} and then hovers at "
        f"{h['gd_sharpness_over_edge']['mean']:.2f}·2/η on average (steps {h['steps'][0]}–{h['steps'][1]}); "
        f"the central flow holds its own sharpness within {e['central_sharpness_over_edge']['max_abs_dev']:.1e} "
        f"of 2/η over the whole edge phase (steps {e['steps'][0]}–{e['steps'][1]}).",
        f"It stays closer to GD's averaged iterate than gradient flow and IGR, by factors "
        f"{e['factor_gf_over_central']:.1f} and {e['factor_igr_over_central']:.1f} on average over the edge phase "
        f"({ph_end(e)} at the end), and its predicted loss L + tr Σ/η tracks GD's {W}-step mean loss within "
        f"{100 * p['max']:.1f} % (mean {100 * p['mean']:.1f} %) over the edge phase and within "
        f"{100 * res['whole_run']['central_loss_rel_error']['max']:.1f} % over the whole run, where gradient "
        f"flow's loss is off by up to {100 * e['gf_loss_rel_error']['max']:.1f} % and IGR's by "
        f"{100 * e['igr_loss_rel_error']['max']:.1f} % (edge phase).",
    ]
    if o:
        found.append(f"Where a continuous model fails: GD first overshoots to {o['max_over_edge']:.2f}·2/η (steps "
                     f"{o['from_step']}–{o['to_step']}) while its unstable component grows from round-off; the "
                     "central flow, which enters the edge at the first crossing, leads GD there.")
    body = [f"Setting: studies/central_flow.toml — tanh MLP 64-64-64-10, MSE, 500 digits, {res['dtype']}, "
            f"full-batch GD at η = {res['eta']:g} for {res['steps']} steps; the central flow by flowlab:euler "
            "with dt = η/4, gradient flow and IGR by flowlab:rk4 with dt = 0.05; sharpness by warm-started "
            "LOBPCG at every step.", "",
            f"GD's sharpness first reaches 0.95·2/η at step {res['onset_step']}."]
    if o:
        body.append(f"It overshoots (above 1.1·2/η from step {o['from_step']}, up to {o['max_over_edge']:.2f}·2/η), "
                    f"and from step {o['to_step']} hovers about 2/η.")
    if res.get("central_first_critical_step") is not None:
        body.append(f"The central flow's first critical direction is at step {res['central_first_critical_step']}; "
                    "from there on its sharpness stays within "
                    f"{res['central_max_dev_from_first_critical']:.1e} × 2/η of 2/η.")
    r = res["whole_run"]
    body += ["", f"| figure | whole run, steps {r['steps'][0]}–{r['steps'][1]} | edge phase, steps "
             f"{e['steps'][0]}–{e['steps'][1]} | hovering phase, steps {h['steps'][0]}–{h['steps'][1]} |",
             "|---|---|---|---|"]
    for a, b, c in zip(_rows(r, W), _rows(e, W), _rows(h, W)):
        name, va = a.rsplit(" | ", 1)[0], a.rsplit(" | ", 1)[1]
        body.append(f"{name} | {va[:-2]} | {b.rsplit(' | ', 1)[1][:-2]} | {c.rsplit(' | ', 1)[1]}")
    body.append(f"| most critical directions at once | | {res['critical_directions_max']} | |")
    if "symmetry_law_max_abs_diff_over_scale" in res:
        body.append(f"| symmetry law of ½∇⟨H,Σ⟩: max \\|measured − law\\| ÷ max \\|law\\| | "
                    f"{res['symmetry_law_max_abs_diff_over_scale']:.2e} | | |")
    body += ["", "θ*_GD = (θ_{k−1} + 2θ_k + θ_{k+1})/4 (GD averaged over its period-2 oscillation); GD's mean loss "
             f"over steps k−{W - 1}…k is compared with the flows at step k − {(W - 1) // 2}.", "",
             "Wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in res["wall_seconds"].items()) + ".  "
             "Statuses: " + ", ".join(f"{k} {v}" for k, v in res["status"].items()) + ".", "",
             "![central flow](central_flow.png)"]
    law = res.get("law_check")
    if law:
        body += ["", "## Symmetry law of the extra term (docs/theory.md#symmetry-law-of-the-central-flow)", "",
                 f"ReLU MLP 64-16-10, cross-entropy, 200 digits, float64, η = {law['eta']:.4g} (η·λ_max(θ0) = 2.4), "
                 f"{law['steps']} steps, groups " + ", ".join(f"{v} {k}" for k, v in law["groups"].items())
                 + ", statuses " + ", ".join(law["status"]) + ":", "",
                 "| check | value |", "|---|---|",
                 f"| rescale: max \\|central_term − central_law\\| ÷ max \\|central_law\\| | "
                 f"{law['term_vs_law_max_abs_diff_over_scale']:.2e} |",
                 f"| translation: max \\|central_term\\| ÷ the same scale (law: 0) | "
                 f"{law['translation_term_max_over_scale']:.2e} |",
                 f"| rescale: the central flow's drift max \\|Q(T) − Q(0)\\| (max \\|Q(0)\\|; gradient flow: 0) | "
                 f"{law['rescale_max_abs_drift']:.3g} ({law['rescale_max_abs_q0']:.3g}) |"]
    return found, body


def ph_end(ph: dict) -> str:
    return f"{ph['factor_gf_over_central_final']:.1f} and {ph['factor_igr_over_central_final']:.1f}"


SMOKE = ["optimizer.steps=14", "optimizer.lr=0.4", "data.n=100", "model.widths=[16, 16]", "flows.0.window=3",
         "flows.1.dt=0.1", "flows.2.dt=0.1"]


def body(ctx) -> None:
    study = ctx.load(STUDY, smoke=SMOKE)
    ds = ctx.run(study, "run")
    res = analyse(ds, settle=2 if ctx.smoke else SETTLE)
    res.update(dtype=study.study.dtype, steps=study.optimizer.steps)
    res["law_check"] = law_check(ctx.runs / "law", steps=6 if ctx.smoke else 40)
    keep = [v for v in ("loss", "sharpness", "predicted_loss", "sigma_trace", "critical_directions",
                        "loss_window_mean", "distance_midpoint", "distance", "status", "wall_seconds") if v in ds]
    small = ds[keep]
    small.attrs = {k: ds.attrs[k] for k in ("study", "versions", "git_commit") if k in ds.attrs}
    ctx.save_dataset(small, "central_flow.nc")
    if res.get("reached_edge"):
        import matplotlib.pyplot as plt

        fig = figure(ds, res)
        ctx.savefig(fig, "central_flow.png")
        plt.close("all")
    ctx.write_json(res)
    found, lines = summary_lines(res)
    ctx.write_summary("The central flow at the edge of stability", found, lines)


if __name__ == "__main__":
    sys.exit(studykit.main("central_flow", body))
