"""The theory recorded beside real runs: exact discrete identities to round-off (float64).

Round-off bound of an exact identity after K updates: each update rounds θ (relative ε), the
measured quantity (an n-term sum) and the recursion's state (a few operations), and the errors
add up at most linearly: |Q − Q_pred| / s_A ≤ 16·K·ε (measured ≤ 74ε after K = 120 updates, with
momentum 0.9; ≤ 41ε without).
"""

import math

import numpy as np
import pytest
import torch
from conftest import small_study

import flowlab

EPS = float(np.finfo(np.float64).eps)


def _run(tmp_path, optimizer, model=None, every=3, steps=120, eps=1e-30, **sections):
    raw = small_study(model=model or {"name": "mlp", "widths": [12, 10], "activation": "relu", "batchnorm": True},
                      data={"name": "digits", "n": 240},
                      optimizer={"lr": 0.1, "steps": steps, "batch_size": 40, **optimizer},
                      record={"every": every}, **sections)
    study = flowlab.parse_study(raw)
    built = flowlab.build(study)
    for m in built.problem.module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eps = eps  # BN's ε is what makes scale invariance approximate (docs/theory.md#batchnorm-epsilon); negligible here
    return flowlab.Run(study, tmp_path / "o", built=built).execute().load()


def _rel_err(ds, variant):
    Q = ds.quantity.isel(dynamics=0).values
    P = ds.theory.sel(variant=variant).values
    return np.abs(P - Q) / ds.group_scale.values


@pytest.mark.parametrize("optimizer", [
    {"weight_decay": 1e-2},
    {"weight_decay": 5e-3, "schedule": {"name": "step", "step_size": 50, "gamma": 0.5}},
    {"weight_decay": 5e-3, "momentum": 0.9},
    {"weight_decay": 1e-2, "momentum": 0.6, "dampening": 0.3},
])
def test_exact_discrete_matches_the_run(tmp_path, optimizer):
    ds = _run(tmp_path, optimizer)
    assert set(ds.group_kind.values) == {"translation", "scale", "rescale"}
    err = _rel_err(ds, "exact_discrete")
    assert np.isfinite(err).all()
    assert err.max() <= 16 * 120 * EPS, err.max()
    # the measured quantities did move (the identity is not trivially satisfied)
    drift = np.abs(ds.drift.isel(dynamics=0).values[-1]) / ds.group_scale.values
    assert np.median(drift) > 1e-3


def test_variants_and_their_ordering_of_errors(tmp_path):
    ds = _run(tmp_path, {"weight_decay": 2e-2}, steps=150)
    assert list(ds.variant.values) == ["conservation", "gradient_flow", "paper", "paper_hat", "exact_discrete"]
    assert ds.theory.dims == ("variant", "time", "symmetry_group")
    worst = {v: _rel_err(ds, v).max() for v in ds.variant.values}
    # the discrete identity is exact; the continuous laws beat ignoring the gradient term
    assert worst["exact_discrete"] <= 16 * 150 * EPS < worst["paper_hat"]
    assert worst["paper_hat"] < min(worst["gradient_flow"], worst["conservation"])
    assert worst["paper"] < min(worst["gradient_flow"], worst["conservation"])
    # translation needs no gradient term: its continuous law is e^{−λt}, off only by O(ηλ)·λt
    tr = ds.group_kind.values == "translation"
    lam, eta, t = 2e-2, 0.1, float(ds.time[-1])
    assert _rel_err(ds, "paper")[:, tr].max() < 2 * eta * lam * lam * t


def _green(gamma: float, w2: float):
    """C(t) and G(s) of x'' + 2γx' + w2·x (docs/theory.md#oscillator-regimes): x(t) = C(t)x(0) for
    x'(0) = 0, and G(s) the response of x to a unit impulse on x'."""
    d = gamma * gamma - w2
    if d < 0:  # underdamped
        om = math.sqrt(-d)
        return (lambda s: np.exp(-gamma * s) * (np.cos(om * s) + gamma / om * np.sin(om * s)),
                lambda s: np.exp(-gamma * s) * np.sin(om * s) / om)
    if d > 0:  # overdamped
        ap, am = -gamma + math.sqrt(d), -gamma - math.sqrt(d)
        return (lambda s: (ap * np.exp(am * s) - am * np.exp(ap * s)) / (ap - am),
                lambda s: (np.exp(ap * s) - np.exp(am * s)) / (ap - am))
    return lambda s: np.exp(-gamma * s) * (1 + gamma * s), lambda s: s * np.exp(-gamma * s)


def _momentum_closed_forms(ds, eta: float, lam: float, beta: float):
    """(momentum_first_order, oscillator, γ² − ω²) at every row, from the Dataset's own terms:
    Q(0), G_j = grad_term[j] and V_{j+1} = momentum_V[j + 1] (the buffer after update j), for a
    constant η and ``record.every = 1`` (docs/theory.md#theory-variants):

        mfo(t_k) = e^{−2λ̃t_k}Q(0) + κ Σ_{j<k} η² e^{−2λ̃(t_k − t_j)} G_j,  translation e^{−λ̃t_k}S(0)
        λ̃ = λ(1 + 2cλ)/(1−β),  c = η(1+β)/(4(1−β)²),  κ = (1+β)/(1−β)³
        osc(t_k) = C(t_k)Q(0) + Σ_{j<k} 2ηV_{j+1} G(t_k − t_j),  γ = (1−β)/(η(1+β)), ω² = 4λ/(η(1+β))
                   translation: C(t_k)S(0) with ω²/2, no forcing
    """
    Q = ds.quantity.values[0]
    q0, t = Q[0], ds.time.values
    np.testing.assert_allclose(np.diff(t), eta, rtol=4 * len(t) * EPS, atol=0)  # t_k = Σ η: K roundings
    np.testing.assert_array_equal(ds.step.values, np.arange(len(t)))  # every update has its row
    tr = ds.group_kind.values == "translation"
    G, V = ds.grad_term.values, ds.momentum_V.values
    c = eta * (1 + beta) / (4 * (1 - beta) ** 2)
    rate = lam * (1 + 2 * c * lam) / (1 - beta)
    kappa = (1 + beta) / (1 - beta) ** 3
    gamma, w2 = (1 - beta) / (eta * (1 + beta)), 4 * lam / (eta * (1 + beta))
    C, green = _green(gamma, w2)
    C_tr, _ = _green(gamma, w2 / 2)
    mfo, osc = np.empty_like(Q), np.empty_like(Q)
    for k in range(len(t)):
        j = np.arange(k)
        forced = (np.exp(-2 * rate * (t[k] - t[j]))[:, None] * G[j]).sum(0)
        mfo[k] = np.exp(-2 * rate * t[k]) * q0 + kappa * eta**2 * forced
        osc[k] = C(t[k]) * q0 + (2 * eta * V[j + 1] * green(t[k] - t[j])[:, None]).sum(0)
    mfo[:, tr] = np.exp(-rate * t)[:, None] * q0[tr]
    osc[:, tr] = C_tr(t)[:, None] * q0[tr]
    return mfo, osc, gamma * gamma - w2


def _assert_momentum_variants(ds, eta, lam, beta):
    """The recorded oscillator and momentum_first_order equal their closed forms to round-off:
    16·K·ε of max(|value|, s_A) after K updates (the recursion's matrix powers and the closed
    form's sums each round a few times per update; measured ≤ 5ε per update)."""
    mfo, osc, disc = _momentum_closed_forms(ds, eta, lam, beta)
    K = ds.sizes["time"] - 1
    scale = ds.group_scale.values
    for variant, want in (("momentum_first_order", mfo), ("oscillator", osc)):
        got = ds.theory.sel(variant=variant).values
        err = np.abs(got - want) / np.maximum(np.abs(want), scale)
        assert err.max() <= 16 * K * EPS, (variant, err.max())
        # not trivially equal: the forcing moved the prediction off its unforced part
        moved = np.abs(want - want[:1]) / scale
        assert moved[:, ds.group_kind.values != "translation"].max() > 1e-3, variant
    return disc


@pytest.mark.parametrize("lam, regime", [(5e-3, "overdamped"), (5e-2, "underdamped")])
def test_momentum_variants_match_their_closed_forms(tmp_path, lam, regime):
    eta, beta = 0.1, 0.9
    ds = _run(tmp_path, {"weight_decay": lam, "momentum": beta}, every=1, steps=60)
    assert list(ds.variant.values) == ["conservation", "gradient_flow", "exact_discrete", "oscillator",
                                       "momentum_first_order"]
    disc = _assert_momentum_variants(ds, eta, lam, beta)
    assert (disc > 0) == (regime == "overdamped")


def test_momentum_variants_and_nesterov(tmp_path):
    ds = _run(tmp_path, {"weight_decay": 5e-3, "momentum": 0.9, "nesterov": True}, every=1, steps=30)
    assert list(ds.variant.values) == ["conservation", "gradient_flow", "exact_discrete", "oscillator",
                                       "momentum_first_order"]
    assert np.isnan(ds.theory.sel(variant="exact_discrete").values[1:]).all()
    assert "Nesterov" in ds.theory.attrs["exact_discrete"]
    # the oscillator and the first-order law need only G and V: defined for Nesterov too
    _assert_momentum_variants(ds, 0.1, 5e-3, 0.9)


def test_theory_section(tmp_path):
    ds = _run(tmp_path, {"weight_decay": 1e-3}, steps=6, theory={"variants": ["paper", "exact_discrete"]})
    assert list(ds.variant.values) == ["paper", "exact_discrete"]
    off = _run(tmp_path / "b", {"weight_decay": 1e-3}, steps=6, theory={"enabled": False})
    assert "theory" not in off
    with pytest.raises(flowlab.ConfigError, match="theory.variants = 'papr'.*did you mean 'paper'"):
        flowlab.parse_study(small_study(theory={"variants": ["papr"]}))


def _printed_tables(out: str) -> dict[str, list[list[str]]]:
    """The rows of ``flowlab report``'s tables, by table (drift, theory, flows), as lists of cells."""
    titles = {"max |Q(t) − Q(0)| / scale": "drift", "theory vs measured": "theory", "flows: their own law": "flows"}
    tables, current = {}, None
    for line in out.splitlines():
        hit = [name for title, name in titles.items() if title in line]
        if hit:
            current = hit[0]
            tables[current] = []
        elif current and line.strip().startswith("│"):
            tables[current].append([c.strip() for c in line.strip().strip("│").split("│")])
        elif line.strip().startswith("└"):
            current = None
    return tables


def _expected_theory(ds, by_layer=False):
    """|Q − Q_pred| / max(|Q(0)|, scale) per variant × kind (× layer), from the Dataset's arrays."""
    Q = ds.quantity.values[0]  # sgd: (time, symmetry_group)
    last = np.flatnonzero(np.isfinite(Q).all(axis=1))[-1]  # a diverged run: up to its last finite row
    den = np.maximum(np.abs(Q[0]), ds.group_scale.values)
    kinds, layers = ds.group_kind.values.astype(str), ds.group_layer.values.astype(str)
    keys = [(k, la) for k in ("translation", "scale", "rescale") for la in dict.fromkeys(layers[kinds == k])] \
        if by_layer else [(k, None) for k in ("translation", "scale", "rescale") if (kinds == k).any()]
    rows = []
    for v in ds.variant.values:
        err = (np.abs(ds.theory.sel(variant=v).values - Q) / den)[:last + 1]
        for k, la in keys:
            m = (kinds == k) & ((layers == la) if by_layer else True)
            rows.append((str(v), k, la, int(m.sum()), err[:, m].max(), err[-1, m].max()))
    return rows


def _expected_drift(ds, by_layer=False):
    """max over time and groups of |Q(t) − Q(0)| / max(scale, 1e-8 · median scale of the kind), per
    dynamics × kind (× layer), and the time of that maximum (docs/theory.md#relative-drift)."""
    Q = ds.quantity.values  # (dynamics, time, symmetry_group)
    scale = ds.group_scale.values
    kinds, layers = ds.group_kind.values.astype(str), ds.group_layer.values.astype(str)
    eff = scale.copy()
    for k in set(kinds):
        m = kinds == k
        eff[m] = np.maximum(scale[m], 1e-8 * np.median(scale[m & (scale > 0)]))
    rel = np.abs(Q - Q[:, :1]) / eff
    keys = [(k, la) for k in ("translation", "scale", "rescale") for la in dict.fromkeys(layers[kinds == k])] \
        if by_layer else [(k, None) for k in ("translation", "scale", "rescale") if (kinds == k).any()]
    rows = []
    for i, d in enumerate(ds.dynamics.values):
        for k, la in keys:
            m = (kinds == k) & ((layers == la) if by_layer else True)
            block = np.where(np.isfinite(rel[i][:, m]), rel[i][:, m], -np.inf)  # NaN rows of a stopped run
            t = np.unravel_index(np.argmax(block), block.shape)[0]
            rows.append((str(d), k, la, int(m.sum()), block.max(), float(ds.time.values[t])))
    return rows


def _close(printed: str, value: float, digits: int = 3) -> bool:
    """A number printed with ``digits`` significant digits is within half a unit of its last digit."""
    return abs(float(printed) - value) <= 0.5 * 10.0 ** (1 - digits) * abs(value) * (1 + 1e-9)


def test_report_numbers_match_the_dataset(tmp_path, capsys):
    """``flowlab report`` and its tables (theory_table, drift_table, flow_law_table) give the numbers
    docs/theory.md defines, recomputed here from the Dataset's own arrays (quantity, theory, flow_law,
    group_scale).  The functions repeat the same float64 operations: rtol 1e-14 (a few ε of
    reordering), atol 0.  The printed tables round to 3 significant digits (.3g, .2e) and t to 4."""
    from flowlab.cli import main
    from flowlab.symmetry.report import drift_table
    from flowlab.theory.report import flow_law_table, theory_table

    # λ = 0.2: gradient_flow's scale error peaks before the end (max ≠ final)
    raw = small_study(model={"name": "mlp", "widths": [6], "activation": "identity", "batchnorm": True},
                      data={"name": "digits", "n": 60}, optimizer={"lr": 0.1, "steps": 20, "weight_decay": 0.2},
                      record={"every": 2},
                      flows=[{"name": "gradient_flow", "integrator": "torchdiffeq:dopri5", "rtol": 1e-8}])
    ds = flowlab.run(flowlab.parse_study(raw), tmp_path / "o").load()
    assert any(w[4] > w[5] for w in _expected_theory(ds))
    for by_layer in (False, True):
        got = theory_table(ds, by_layer)
        want = _expected_theory(ds, by_layer)
        assert [(r["variant"], r["kind"], r.get("layer"), r["groups"]) for r in got] == [w[:4] for w in want]
        np.testing.assert_allclose([[r["max_rel_error"], r["final_rel_error"]] for r in got], [w[4:] for w in want],
                                   rtol=1e-14, atol=0)
        got = drift_table(ds, by_layer)
        want = _expected_drift(ds, by_layer)
        assert [(r["dynamics"], r["kind"], r.get("layer"), r["groups"]) for r in got] == [w[:4] for w in want]
        np.testing.assert_allclose([r["max_rel_drift"] for r in got], [w[4] for w in want], rtol=1e-14, atol=0)
        assert [r["at_time"] for r in got] == [w[5] for w in want]
    # edited copies: a group whose scale is 0 (measured against the floor 1e-8 × its kind's median
    # scale), a quantity that peaks mid-run (the time of the maximum), a run that stopped with NaN
    scale = ds.group_scale.values.copy()
    scale[np.flatnonzero(ds.group_kind.values == "rescale")[0]] = 0.0
    edited = ds.assign_coords(group_scale=("symmetry_group", scale))
    Q = edited.quantity.values.copy()
    Q[:, 3, ds.group_kind.values == "scale"] *= 3.0
    Q[0, -1] = np.nan
    edited["quantity"] = (edited.quantity.dims, Q)
    edited["drift"] = (edited.quantity.dims, Q - Q[:, :1])
    got, want = drift_table(edited), _expected_drift(edited)
    np.testing.assert_allclose([r["max_rel_drift"] for r in got], [w[4] for w in want], rtol=1e-14, atol=0)
    assert [r["at_time"] for r in got] == [w[5] for w in want]
    assert float(edited.time[3]) in [r["at_time"] for r in got]
    got, want = theory_table(edited), _expected_theory(edited)
    np.testing.assert_allclose([[r["max_rel_error"], r["final_rel_error"]] for r in got], [w[4:] for w in want],
                               rtol=1e-14, atol=0)
    # each flow against its own law and against sgd, relative to the scale
    Q, law, sc = ds.quantity.values, ds.flow_law.values, ds.group_scale.values
    kinds = ds.group_kind.values.astype(str)
    rows = flow_law_table(ds)
    assert [(r["dynamics"], r["kind"]) for r in rows] == [(str(ds.dynamics.values[1]), k)
                                                          for k in ("translation", "scale", "rescale")]
    for r in rows:
        m = kinds == r["kind"]
        np.testing.assert_allclose([r["obeys_law"], r["tracks_sgd"]],
                                   [(np.abs(Q[1] - law[1]) / sc)[:, m].max(), (np.abs(Q[1] - Q[0]) / sc)[:, m].max()],
                                   rtol=1e-14, atol=0)

    assert main(["report", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    printed = _printed_tables(out)
    theory = _expected_theory(ds)
    assert [row[:3] for row in printed["theory"]] == [[v, k, str(n)] for v, k, _, n, _, _ in theory]
    for row, (_, _, _, _, worst, final) in zip(printed["theory"], theory):
        assert _close(row[3], worst) and _close(row[4], final), (row, worst, final)
    drift = _expected_drift(ds)
    assert [row[:3] for row in printed["drift"]] == [[d, k, str(n)] for d, k, _, n, _, _ in drift]
    for row, (_, _, _, _, worst, at) in zip(printed["drift"], drift):
        assert _close(row[3], worst) and _close(row[4], at, 4), (row, worst, at)
    assert len(printed["flows"]) == 3
    for row, r in zip(printed["flows"], rows):
        assert row[0] == r["dynamics"] and _close(row[3], r["obeys_law"]) and _close(row[4], r["tracks_sgd"])
    assert "obeys its law" in out and "gradient_flow@torchdiffeq:dopri5" in out
    assert (tmp_path / "o" / "theory_fig5.png").stat().st_size > 1000
