"""The paper's Fig. 4 (Kunin et al., ICLR 2021): GD and heavy ball on a 2-D quadratic beside the
continuous models meant to match them, as trajectories in the (θ1, θ2) plane.

L = ½θᵀAθ with A = [[2.5, −1.5], [−1.5, 2.5]] (docs/theory.md#the-2-d-quadratic-of-fig-4: the paper's Fig. 4 quadratic;
Hessian eigenvalues 4 and 1, eigenvectors (1, −1)/√2 and (1, 1)/√2), θ0 = (1, 0.25) (our choice, not
the paper's: off both eigenvectors, so that the paths bend).

- GD, η = 0.1, 20 steps (``fig4_quadratic_gd.toml``) beside gradient_flow, modified_loss (IGR),
  modified_temporal and modified_second_order;
- heavy ball, η = 0.01, β = 0.9, 50 steps (``fig4_quadratic_hb.toml``) beside gradient_flow,
  momentum_first_order, momentum_second_order and momentum_modified.

Each panel is one ``flowlab.run`` (flows by fixed-step RK4, float64, recorded at every step): the table
is its ``distance`` |θ_flow(t) − θ_discrete(t)| at matched t = Σ η (first-order momentum flows at
t − ηβ/(1−β)). The curves in the figure are the same flows on the same integrator, sampled on a fine
grid (``Integrator.trajectory``); both are checked against the closed form expm(tM)θ0 of each flow on
this quadratic, so the distances in the table are the models' and not the solver's. Two runs of a few
thousand RK4 steps in-process: no sweep.
"""

from __future__ import annotations

import sys

import numpy as np

from flowlab import studykit

A = np.array([[2.5, -1.5], [-1.5, 2.5]])
FAST = np.array([1.0, -1.0]) / np.sqrt(2)  # eigenvalue 4
SLOW = np.array([1.0, 1.0]) / np.sqrt(2)  # eigenvalue 1

PANELS = {
    "gd": dict(toml="fig4_quadratic_gd.toml", title="GD, η = 0.1, 20 steps", discrete="GD",
               smoke=["optimizer.steps=6"], dense=401),
    "hb": dict(toml="fig4_quadratic_hb.toml", title="heavy ball, η = 0.01, β = 0.9, 50 steps",
               discrete="heavy ball", smoke=["optimizer.steps=12"], dense=501),
}

DESCRIBE = {
    "gradient_flow": ("θ' = −∇L", "1 (GD); none (heavy ball)"),
    "modified_loss": ("IGR: θ' = −∇L − (η/2)H∇L", "2 (GD)"),
    "modified_temporal": ("(η/2)θ'' + θ' = −∇L", "2 (GD)"),
    "modified_second_order": ("θ' = −∇L − (η/2)H∇L − (η²/3)H²∇L", "3 (GD)"),
    "momentum_first_order": ("(1−β)θ' = −∇L, at t − ηβ/(1−β)", "1 (heavy ball)"),
    "momentum_second_order": ("(η(1+β)/2)θ'' + (1−β)θ' = −∇L", "2 (heavy ball)"),
    "momentum_modified": ("(1−β)θ' = −∇[L + η(1+β)/(4(1−β)²)‖∇L‖²], at t − ηβ/(1−β)", "2 (heavy ball)"),
}
COLORS = {"gradient_flow": "tab:blue", "modified_loss": "tab:red", "modified_temporal": "tab:green",
          "modified_second_order": "tab:purple", "momentum_first_order": "tab:green",
          "momentum_second_order": "tab:red", "momentum_modified": "tab:purple"}


def linear_system(name: str, eta: float, beta: float, A: np.ndarray, theta0: np.ndarray):
    """(M, y0, shift): each flow on L = ½θᵀAθ is the linear ODE y' = My (θ = y[:2]), written here
    from docs/theory.md independently of the flow code (∇³L = 0 on a quadratic)."""
    n = len(theta0)
    eye, zero = np.eye(n), np.zeros((n, n))
    g0 = A @ theta0
    if name == "gradient_flow":
        return -A, theta0, 0.0
    if name == "modified_loss":
        return -(A + eta / 2 * A @ A), theta0, 0.0
    if name == "modified_second_order":
        return -(A + eta / 2 * A @ A + eta**2 / 3 * A @ A @ A), theta0, 0.0
    if name == "modified_temporal":
        return np.block([[zero, eye], [-2 / eta * A, -2 / eta * eye]]), np.concatenate([theta0, -g0]), 0.0
    if name == "momentum_first_order":
        return -A / (1 - beta), theta0, eta * beta / (1 - beta)
    if name == "momentum_second_order":
        m, c = eta * (1 + beta) / 2, 1 - beta
        return np.block([[zero, eye], [-A / m, -c / m * eye]]), np.concatenate([theta0, -g0 / (1 + beta)]), 0.0
    if name == "momentum_modified":
        return (-(A + eta * (1 + beta) / (2 * (1 - beta) ** 2) * A @ A) / (1 - beta), theta0,
                eta * beta / (1 - beta))
    raise KeyError(name)


def closed_form(name, eta, beta, A, theta0, times):
    from scipy.linalg import expm

    M, y0, shift = linear_system(name, eta, beta, A, theta0)
    return np.stack([(expm(max(t - shift, 0.0) * M) @ y0)[: len(theta0)] for t in times])


def dense_curve(study, spec, times):
    """θ of the flow ``spec`` at matched times ``times`` (its own time t − shift), on its own integrator."""
    import flowlab
    from flowlab.flows import Hyper, make_flow, make_integrator

    problem = flowlab.build(study).problem
    opt = study.optimizer
    hp = Hyper(lr=opt.lr, weight_decay=opt.weight_decay, momentum=opt.momentum)
    flow = make_flow(spec.name, spec.options)
    integ = make_integrator(spec.integrator, rtol=spec.rtol, atol=spec.atol, dt=spec.dt)
    shift = flow.time_shift(hp)
    own = np.maximum(times - shift, 0.0)
    started = own > 0
    th0 = problem.theta0.detach().cpu().numpy()
    out = np.tile(th0, (len(times), 1))
    theta, _ = integ.trajectory(flow, problem, hp, [0.0] + own[started].tolist())
    out[started] = theta.detach().cpu().numpy()[1:]
    return out


def sign_changes(x: np.ndarray) -> int:
    s = np.sign(x[np.abs(x) > 1e-12])
    return int(np.count_nonzero(s[1:] != s[:-1]))


def run_panel(ctx, key: str):
    p = PANELS[key]
    study = ctx.load(p["toml"], smoke=p["smoke"])
    ds = ctx.run(study, key)
    opt = study.optimizer
    eta, beta = opt.lr, opt.momentum
    theta = ds.theta.values  # (dynamics, snapshot, 2): every step
    t = ds.snapshot.values
    theta0 = theta[0, 0]
    T = float(t[-1])
    dense_t = np.linspace(0.0, T, p["dense"])
    labels = [str(d) for d in ds.dynamics.values]
    rows, curves, exact_err = [], {}, {}
    late = t >= T / 2
    for i, spec in enumerate(study.flows, start=1):
        name = spec.name
        assert labels[i] == spec.label and ds.status.values[i] == "ok", (labels[i], ds.status.values[i])
        curve = dense_curve(study, spec, dense_t)
        curves[name] = curve
        exact_dense = closed_form(name, eta, beta, A, theta0, dense_t)
        exact_rec = closed_form(name, eta, beta, A, theta0, t)
        err = max(np.abs(curve - exact_dense).max(), np.abs(theta[i] - exact_rec).max())
        exact_err[name] = float(err)
        d = ds.distance.values[i]
        rows.append(dict(
            flow=name, equation=DESCRIBE[name][0], order=DESCRIBE[name][1],
            max_dist=float(np.nanmax(d)), late_max_dist=float(np.nanmax(d[late])), final_dist=float(d[-1]),
            fast_crossings=sign_changes(theta[i] @ FAST), slow_crossings=sign_changes(theta[i] @ SLOW),
            solver_error=float(err), shift=float(eta * beta / (1 - beta)) if "first_order" in name
            or name == "momentum_modified" else 0.0, grad_evals=int(ds.n_grad_evals.values[i])))
    disc = dict(fast_crossings=sign_changes(theta[0] @ FAST), slow_crossings=sign_changes(theta[0] @ SLOW),
                final_norm=float(np.linalg.norm(theta[0, -1])))
    return dict(key=key, title=p["title"], discrete=p["discrete"], eta=eta, beta=beta, steps=opt.steps, T=T,
                ds=ds, t=t, theta=theta, labels=labels, dense_t=dense_t, curves=curves, rows=rows, disc=disc,
                theta0=theta0, dt=study.flows[0].dt)


def _trajectories(ax, P):
    for name, c in P["curves"].items():
        wide = name == "gradient_flow"  # drawn wide and pale: a first-order momentum flow runs along its path
        ax.plot(c[:, 0], c[:, 1], color=COLORS[name], lw=4.5 if wide else 1.6, alpha=0.45 if wide else 1.0,
                zorder=1 if wide else 2, label=f"{name}: {DESCRIBE[name][0]}")
        ax.plot(*c[-1], "s", color=COLORS[name], ms=5, zorder=3)
    ax.plot(P["theta"][0, :, 0], P["theta"][0, :, 1], "ko", ms=3.5, zorder=4,
            label=f"{P['discrete']} iterates θ_k (■: each flow at the final t = {P['T']:g})")
    ax.plot(*P["theta0"], "k*", ms=10)
    ax.plot(0, 0, "kx", ms=8)


def _contours(ax, lo, hi, n=14):
    x = np.linspace(lo[0], hi[0], 200)
    y = np.linspace(lo[1], hi[1], 200)
    X, Y = np.meshgrid(x, y)
    Z = 0.5 * (A[0, 0] * X**2 + 2 * A[0, 1] * X * Y + A[1, 1] * Y**2)
    cs = ax.contour(X, Y, Z, levels=np.geomspace(max(Z.min(), 1e-5), Z.max(), n), colors="0.75", linewidths=0.7)
    ax.clabel(cs, fontsize=6, fmt="%.2g")


def figure(panels):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 11.5), gridspec_kw={"height_ratios": [1.25, 1]})
    for col, P in enumerate(panels):
        ax = axes[0, col]
        pts = np.concatenate([P["theta"].reshape(-1, 2)] + list(P["curves"].values()))
        lo, hi = pts.min(0), pts.max(0)
        pad = 0.15 * (hi - lo).max()
        _contours(ax, lo - pad, hi + pad)
        _trajectories(ax, P)
        ax.set_aspect("equal")
        ax.set_xlabel("θ1")
        ax.set_ylabel("θ2")
        ax.set_title(f"{P['title']}:\ntrajectories on contours of L = ½θᵀAθ (★ θ0, × minimum)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), fontsize=7)
        ax = axes[1, col]
        for i, name in enumerate(P["curves"], start=1):
            d = P["ds"].distance.values[i]
            ax.semilogy(P["t"][1:], np.maximum(d[1:], 1e-17), color=COLORS[name], marker=".", ms=3, label=name)
        shift = P["eta"] * P["beta"] / (1 - P["beta"])
        if shift > 0:
            ax.axvline(shift, color="0.4", ls=":", lw=1, label=f"ηβ/(1−β) = {shift:g}: first-order flows start")
        ax.set_xlabel("t = Σ η (time)")
        ax.set_ylabel(f"|θ_flow(t) − θ_{P['discrete']}(t)|")
        ax.set_title(f"{P['title']}: distance to the iterates at matched t")
        ax.legend(fontsize=7)
    fig.suptitle("Fig. 4 (Kunin et al. 2021): discrete updates vs their continuous models on a 2-D quadratic "
                 "(RK4, float64)")
    fig.tight_layout()
    return fig


def times(n: int) -> str:
    return f"{n} time" + ("" if n == 1 else "s")


def fmt(x: float) -> str:
    return f"{x:.2e}"


def table(P) -> list[str]:
    lines = [f"**{P['title']}** (t = Σ η ∈ [0, {P['T']:.3g}], RK4 dt = {P['dt']:g}; {P['discrete']}'s "
             f"eigencomponent sign changes: fast {P['disc']['fast_crossings']}, slow {P['disc']['slow_crossings']}; "
             f"|θ_final| = {fmt(P['disc']['final_norm'])})", "",
             "| flow | model | order vs | max \\|Δθ\\| | max \\|Δθ\\|, t ≥ T/2 | final \\|Δθ\\| | sign changes fast / slow "
             "| solver error vs closed form |", "|---|---|---|---|---|---|---|---|"]
    for r in P["rows"]:
        lines.append(f"| {r['flow']} | {r['equation']} | {r['order']} | {fmt(r['max_dist'])} | "
                     f"{fmt(r['late_max_dist'])} | {fmt(r['final_dist'])} | {r['fast_crossings']} / "
                     f"{r['slow_crossings']} | {fmt(r['solver_error'])} |")
    return lines


def found(P) -> list[str]:
    rows = sorted(P["rows"], key=lambda r: r["late_max_dist"])
    best, gf = rows[0], next(r for r in P["rows"] if r["flow"] == "gradient_flow")
    d = P["disc"]
    out = []
    if P["key"] == "gd":
        order = ", ".join(f"{r['flow']} ({fmt(r['late_max_dist'])})" for r in rows)
        out.append(f"GD (η = {P['eta']:g}): over t ≥ T/2 the flows are, closest first, {order}; "
                   f"{best['flow']} stays {gf['late_max_dist'] / best['late_max_dist']:.0f}× closer to the "
                   f"iterates than gradient flow, and ends {fmt(best['final_dist'])} from them against "
                   f"gradient flow's {fmt(gf['final_dist'])}.")
        worst_max = max(P["rows"], key=lambda r: r["max_dist"])
        if worst_max["flow"] != "gradient_flow":
            out.append(f"Over the whole run {worst_max['flow']} has the largest distance "
                       f"({fmt(worst_max['max_dist'])}, early, against gradient flow's {fmt(gf['max_dist'])}).")
    else:
        osc = [r for r in P["rows"] if r["fast_crossings"] == d["fast_crossings"]
               and r["slow_crossings"] == d["slow_crossings"]]
        names = ", ".join(r["flow"] for r in osc) or "no flow"
        out.append(f"Heavy ball (η = {P['eta']:g}, β = {P['beta']:g}) overshoots the valley: its iterates "
                   f"change sign {times(d['fast_crossings'])} along the sharp eigenvector and "
                   f"{times(d['slow_crossings'])} along the flat one; {names} does the same.")
        out.append(f"{best['flow']} follows heavy ball (max |Δθ| {fmt(best['max_dist'])}, final "
                   f"{fmt(best['final_dist'])}, with |θ_final| = {fmt(d['final_norm'])}).")
        fails = [r for r in P["rows"] if r not in osc]
        for r in fails:
            signs = ("never changes sign" if r["fast_crossings"] == r["slow_crossings"] == 0 else
                     f"changes sign {times(r['fast_crossings'])} / {times(r['slow_crossings'])}")
            out.append(f"{r['flow']} fails: it {signs} "
                       f"and ends {fmt(r['final_dist'])} from heavy ball "
                       f"({r['final_dist'] / d['final_norm']:.1f}× |θ_final|; max over t ≥ T/2 "
                       f"{fmt(r['late_max_dist'])}).")
        corr = P["eta"] * (1 + P["beta"]) / (2 * (1 - P["beta"]) ** 2)
        out.append(f"The first-order momentum flows cannot oscillate at all; momentum_modified's O(η²) correction "
                   f"η(1+β)/(2(1−β)²) = {corr:.2f} is not small at β = {P['beta']:g}.")
    return out


def save(ctx, panels):
    import xarray as xr

    data = {}
    for P in panels:
        k = P["key"]
        data[f"{k}_theta"] = ((f"{k}_dynamics", f"{k}_time", "component"), P["theta"])
        data[f"{k}_distance"] = ((f"{k}_dynamics", f"{k}_time"), P["ds"].distance.values)
        data[f"{k}_dense_theta"] = ((f"{k}_flow", f"{k}_dense_time", "component"),
                                    np.stack(list(P["curves"].values())))
    coords = {}
    for P in panels:
        k = P["key"]
        coords.update({f"{k}_dynamics": P["labels"], f"{k}_time": P["t"], f"{k}_flow": list(P["curves"]),
                       f"{k}_dense_time": P["dense_t"]})
    coords["component"] = ["theta1", "theta2"]
    ds = xr.Dataset(data, coords=coords, attrs={
        "description": "Fig. 4 quadratic: discrete iterates and flows (theta at every step, matched t), "
                       "their distance, and each flow densely sampled (same integrator)",
        "A": A.tolist(), "theta0": panels[0]["theta0"].tolist()})
    ctx.save_dataset(ds, "fig4_quadratic.nc")


def body(ctx):
    panels = [run_panel(ctx, "gd"), run_panel(ctx, "hb")]
    ctx.savefig(figure(panels), "fig4_quadratic.png")
    save(ctx, panels)
    worst_solver = max(r["solver_error"] for P in panels for r in P["rows"])
    smallest = min(r["final_dist"] for P in panels for r in P["rows"])
    ctx.write_json({P["key"]: dict(eta=P["eta"], beta=P["beta"], steps=P["steps"], discrete=P["disc"],
                                   flows=P["rows"]) for P in panels})
    body_lines = [f"L = ½θᵀAθ, A = [[2.5, −1.5], [−1.5, 2.5]] (the paper's Fig. 4 quadratic, eigenvalues 4 and 1), "
                  f"θ0 = ({panels[0]['theta0'][0]:g}, {panels[0]['theta0'][1]:g}) (our choice, not the paper's), "
                  "no weight decay, float64. Each panel is one `flowlab run` in-process "
                  "(`studies/fig4_quadratic_gd.toml`, `studies/fig4_quadratic_hb.toml`); flows by `flowlab:rk4`. "
                  "|Δθ| = |θ_flow(t) − θ_discrete(t)| at matched t = Σ η, recorded at every step (the first-order "
                  "momentum flows at t − ηβ/(1−β), θ0 before). Sign changes: of the iterate's component along "
                  "the sharp (λ = 4, fast) and flat (λ = 1, slow) eigenvectors over the recorded steps — an "
                  "overshoot of the minimum. Solver error: max |θ_RK4 − expm(tM)θ0| over the recorded and the "
                  f"dense times; the largest, {fmt(worst_solver)}, is "
                  f"{smallest / worst_solver:.0e}× below the smallest final distance in the tables ({fmt(smallest)}).",
                  "", "![trajectories](fig4_quadratic.png)", ""]
    for P in panels:
        body_lines += table(P) + [""]
    ctx.write_summary("Fig. 4: GD and heavy ball on a 2-D quadratic beside their continuous models",
                      found=found(panels[0]) + found(panels[1]), body=body_lines)


if __name__ == "__main__":
    sys.exit(studykit.main("fig4_quadratic", body))
