"""Recording through ``flowlab.run``: the exact discrete identities of docs/theory.md, read back from the
Dataset, and the commands ``flowlab symmetries / check / report``.

Plain SGD with coupled L2 (λ) and batches, per group (float64):
    S_{k+1} = (1 − η_kλ) S_k                             translation, S = ⟨θ_A, 1⟩
    Q_{k+1} = (1 − η_kλ)² Q_k + η_k² G_k                 scale |θ_A|², rescale |θ_A1|² − |θ_A2|²
so Q_k = c_k² Q_0 + A_k with c_k = Π_{j<k}(1 − η_jλ) and the recorded accumulator A_k.
Relative errors are |error| / group_scale.  The identities are exact in real arithmetic; each
update rounds θ, the measured quantity and the recursion a few times, and the errors add at most
linearly, so after K ≤ 30 updates the bound is 16·K·ε ≈ 1.1e-13 (measured ≤ 2e-15; the same bound
as tests/test_theory_runs.py).  BatchNorm is built with ε = 1e-300 (ε > 0 breaks scale invariance).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helper_models import bn_eps_defects

import flowlab
from flowlab.cli import main as cli_main

TOL = 16 * 30 * float(np.finfo(np.float64).eps)


def _study(tmp_path, name="symrun", steps=30, every=1, momentum=0.0, wd=0.05, model=None, symmetry=None,
           schedule=None):
    raw = {
        "study": {"name": name, "dtype": "float64", "device": "cpu", "seed": 3},
        "model": model or {"name": "helper_models:vgg_style", "batchnorm": True, "bn_eps": 1e-300},
        "data": {"name": "digits", "n": 96, "image": True},
        "optimizer": {"lr": 0.1, "steps": steps, "weight_decay": wd, "batch_size": 16, "momentum": momentum,
                      "schedule": schedule or {"name": "exponential", "gamma": 0.97}},
        "record": {"every": every, "projections": 2},
    }
    if symmetry is not None:
        raw["symmetry"] = symmetry
    return flowlab.parse_study(raw)


def _run(tmp_path, sub, **kw):
    return flowlab.run(_study(tmp_path, **kw), out=tmp_path / sub, overwrite=True).load()


@pytest.fixture(scope="module")
def fine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fine")
    return _run(tmp, "fine")


def _identity_errors(ds):
    Q = ds.quantity.isel(dynamics=0).values  # (time, group)
    c = ds.weight_decay_factor.values[:, None]
    A = ds.grad_term_acc.values
    scale = ds.group_scale.values
    t = ds.group_kind.values == "translation"
    err = np.where(t, np.abs(Q - c * Q[0]), np.abs(Q - c**2 * Q[0] - A)) / scale
    return err


def test_contract_variables_and_coords(fine):
    ds = fine
    G = ds.sizes["symmetry_group"]
    assert G > 0
    for name in ("quantity", "drift"):
        assert ds[name].dims == ("dynamics", "time", "symmetry_group")
    for name in ("grad_term", "grad_term_acc"):
        assert ds[name].dims == ("time", "symmetry_group")
    assert ds.weight_decay_factor.dims == ("time",)
    for coord in ("group_kind", "group_layer", "group_size", "group_unit", "group_scale"):
        assert ds[coord].dims == ("symmetry_group",)
    assert set(ds.group_kind.values) == {"translation", "scale", "rescale"}
    assert "momentum_P" not in ds  # only with momentum
    np.testing.assert_array_equal(ds.drift.values, ds.quantity.values - ds.quantity.values[:, :1])
    t = ds.group_kind.values == "translation"
    assert (ds.grad_term.values[:, t] == 0).all() and (ds.grad_term.values[0, ~t] != 0).any()
    assert json.loads(ds.quantity.attrs["skipped"])  # what was skipped, why


def test_exact_discrete_identities_sgd_weight_decay_batches(fine):
    ds = fine
    err = _identity_errors(ds)
    print(f"max relative identity error over {ds.sizes['time'] - 1} steps: {err.max():.2e}")
    assert err.max() <= TOL
    # the same, one step at a time, from the per-step gradient terms (independent of the accumulator)
    Q = ds.quantity.isel(dynamics=0).values
    G = ds.grad_term.values
    eta = np.diff(ds.time.values)[:, None]
    lam = 0.05
    t = ds.group_kind.values == "translation"
    pred = np.where(t, (1 - eta * lam) * Q[:-1], (1 - eta * lam) ** 2 * Q[:-1] + eta**2 * G[:-1])
    step_err = np.abs(Q[1:] - pred) / ds.group_scale.values
    assert step_err.max() <= TOL
    # and the recorded decay factor is Π(1 − η_jλ) of the schedule actually used
    c = np.concatenate([[1.0], np.cumprod(1 - eta[:, 0] * lam)])
    np.testing.assert_allclose(ds.weight_decay_factor.values, c, rtol=1e-14, atol=0)
    # the law is genuinely broken (so the identity is not trivially 0 = 0)
    assert np.abs(ds.drift.isel(dynamics=0).values[-1] / ds.group_scale.values).max() > 1e-3


def test_coarse_record_interval_loses_nothing(fine, tmp_path):
    coarse = _run(tmp_path, "coarse", every=7)
    steps = coarse.step.values
    assert list(steps) == [0, 7, 14, 21, 28, 30]
    sel = fine.sel(time=coarse.time.values)
    np.testing.assert_allclose(coarse.grad_term_acc.values, sel.grad_term_acc.values, rtol=1e-13, atol=0)
    np.testing.assert_allclose(coarse.quantity.values, sel.quantity.values, rtol=1e-13, atol=0)
    assert _identity_errors(coarse).max() <= TOL
    # the accumulator equals the decaying sum of every step's gradient term (numpy, from the fine run)
    eta, lam = np.diff(fine.time.values), 0.05
    A = np.zeros(fine.sizes["symmetry_group"])
    acc = [A.copy()]
    for k in range(len(eta)):
        A = (1 - eta[k] * lam) ** 2 * A + eta[k] ** 2 * fine.grad_term.values[k]
        acc.append(A.copy())
    np.testing.assert_allclose(coarse.grad_term_acc.values, np.array(acc)[steps], rtol=1e-12, atol=1e-300)


def test_momentum_recursions(tmp_path):
    beta, lam, eta = 0.9, 0.01, 0.05
    ds = flowlab.run(_study(tmp_path, momentum=beta, wd=lam, steps=25, schedule={"name": "constant"})
                     .with_overrides([f"optimizer.lr={eta}"]), out=tmp_path / "mom", overwrite=True).load()
    Q = ds.quantity.isel(dynamics=0).values
    P, V, U = ds.momentum_P.values, ds.momentum_V.values, ds.momentum_U.values
    t = ds.group_kind.values == "translation"
    scale = ds.group_scale.values
    assert np.isnan(P[:, t]).all() and np.isnan(U[:, ~t]).all() and (P[0, ~t] == 0).all()
    q_err = np.abs(Q[1:, ~t] - ((1 - 2 * eta * lam) * Q[:-1, ~t] - 2 * eta * beta * P[:-1, ~t] + eta**2 * V[1:, ~t]))
    p_err = np.abs(P[1:, ~t] - (beta * P[:-1, ~t] + lam * Q[:-1, ~t] - eta * V[1:, ~t]))
    s_err = np.abs(Q[1:, t] - (Q[:-1, t] - eta * U[1:, t]))
    u_err = np.abs(U[1:, t] - (beta * U[:-1, t] + lam * Q[:-1, t]))
    print(f"momentum recursions: {q_err.max() / scale[~t].min():.1e} {s_err.max():.1e}")
    assert (q_err / scale[~t]).max() <= TOL and (p_err / scale[~t]).max() <= TOL
    assert (s_err / scale[t]).max() <= TOL and (u_err / scale[t]).max() <= TOL


def test_symmetry_disabled_and_recording_does_not_perturb_the_run(tmp_path):
    """Detection traces the model (dropout, BatchNorm) with the RNG and running statistics restored:
    the trajectory is bit-for-bit the same with and without the recorder."""
    off = _run(tmp_path, "off", steps=4, symmetry={"enabled": False})
    on = _run(tmp_path, "on", steps=4)
    assert "quantity" not in off and "symmetry_group" not in off.dims and "quantity" in on
    np.testing.assert_array_equal(off.theta.values, on.theta.values)
    np.testing.assert_array_equal(off.loss.values, on.loss.values)


def test_config_errors():
    from flowlab.errors import ConfigError

    for bad, msg in [({"enable": True}, "unknown key"), ({"tolerance": -1}, "positive"),
                     ({"groups": [{"kind": "spin", "params": ["a"]}]}, "allowed"),
                     ({"groups": [{"kind": "scale", "incoming": ["a"], "outgoing": ["b"]}]}, "params"),
                     ({"exclude": [3]}, "strings")]:
        with pytest.raises(ConfigError, match=msg):
            _study(None, symmetry=bad)


def _toml(tmp_path, extra: str = "") -> str:
    text = f"""
[study]
name = "cli"
dtype = "float64"
device = "cpu"
[model]
name = "helper_models:tanh_net"
[data]
name = "digits"
n = 40
[optimizer]
lr = 0.1
steps = 6
batch_size = 8
{extra}
"""
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


def test_cli_symmetries_check_report(tmp_path, capsys):
    study = _toml(tmp_path)
    assert cli_main(["symmetries", study]) == 0
    out = capsys.readouterr().out
    assert "rescale" in out and "translation" in out and "tanh" in out  # found and skipped-with-reason
    assert cli_main(["check", study, "--hessian", "0"]) == 0
    assert "all groups at round-off" in capsys.readouterr().out
    assert cli_main(["run", study, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["report", str(tmp_path / "r"), "--by-layer"]) == 0
    out = capsys.readouterr().out
    assert "sgd" in out and "rescale" in out
    assert (tmp_path / "r" / "symmetry_drift.png").stat().st_size > 0
    assert (tmp_path / "r" / "symmetry_fig1.png").stat().st_size > 0


def test_cli_check_flags_a_wrong_group(tmp_path, capsys):
    study = _toml(tmp_path, """
[[symmetry.groups]]
kind = "rescale"
layer = "through-tanh"
incoming = ["1.weight[0]", "1.bias[0]"]
outgoing = ["3.weight[:, 0]"]
""")
    assert cli_main(["check", study]) == 1
    assert "FLAGGED" in capsys.readouterr().out


def _check_table(out: str) -> dict:
    """Rows of ``flowlab check``'s table: (kind, layer) -> (max gradient residual, max Hessian
    residual (0 where none was checked), status)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 7 and cells[0] in ("translation", "scale", "rescale"):
            rows[cells[0], cells[1]] = (float(cells[3]), 0.0 if cells[4] == "–" else float(cells[4]), cells[6])
    return rows


def test_cli_check_keep_eps(tmp_path, capsys):
    """``flowlab check --keep-eps``: with BatchNorm's ε = 1e-5 the scale residuals are what ε predicts
    (the closed form helper_models.bn_eps_defects: ε/(σ²+ε)·γ⟨∂L/∂out, ŷ⟩ / (|g_A||θ_A|)), and are
    flagged or not by the tolerance; without --keep-eps (ε set to ~0) they are at round-off.

    Bounds: the table prints 3 significant digits, so a printed residual is within 5e-3 (half a unit
    of x.xx) of the closed form; round-off residuals (gradient and Hessian) are a few ε·√n ≈ 1e-15
    (n ≤ 37; measured ≤ 6e-16), bounded here by 1e-13.  --tolerance 2·max(closed form, |∇ρ|/|g_A|) is above every
    scale residual (the Hessian one is ≤ |∇ρ|/|g_A|), half the smallest closed form is below all."""
    path = tmp_path / "eps.toml"
    path.write_text("""
[study]
name = "eps"
dtype = "float64"
device = "cpu"
[model]
name = "helper_models:vgg_style"
batchnorm = true
bn_eps = 1e-5
dropout = 0.0
[data]
name = "digits"
n = 40
image = true
[optimizer]
lr = 0.1
steps = 6
batch_size = 8
""")
    problem = flowlab.build(flowlab.load_study(str(path))).problem
    problem.load(problem.theta0)
    predicted, hess_bound = bn_eps_defects(problem.module, problem.X, problem.y)  # c1 channels 0-2, c2 channels 0-3
    per_layer = {"c1": predicted[:3], "c2": predicted[3:]}
    check = ["check", str(path), "--full-batch", "--hessian", "1"]

    assert cli_main(check) == 0
    out = capsys.readouterr().out
    rows = _check_table(out)
    assert len(rows) == 6 and all(st == "ok" and max(g, h) <= 1e-13 for g, h, st in rows.values()), rows
    assert "all groups at round-off" in out and "ε set to ~0" in out

    assert predicted.min() > 1.5e-8  # every ε-defect exceeds the default tolerance √ε(float64)
    assert cli_main([*check, "--keep-eps"]) == 1
    out = capsys.readouterr().out
    rows = _check_table(out)
    assert rows["scale", "c1"][2] == "FLAGGED units [0, 1, 2]"
    assert rows["scale", "c2"][2] == "FLAGGED units [0, 1, 2, 3]"
    for layer, pred in per_layer.items():
        assert abs(rows["scale", layer][0] - pred.max()) <= 5e-3 * pred.max(), (layer, rows["scale", layer], pred)
    others = [v for k, v in rows.items() if k[0] != "scale"]
    assert len(others) == 4 and all(st == "ok" and max(g, h) <= 1e-13 for g, h, st in others), rows
    assert "7 scale group(s) feed a normalisation with ε > 0" in out and "7 group(s) FLAGGED" in out

    high = 2 * max(predicted.max(), hess_bound.max())
    assert cli_main([*check, "--keep-eps", "--tolerance", f"{high:.3e}"]) == 0
    out = capsys.readouterr().out
    rows = _check_table(out)
    assert all(st == "ok" for _, _, st in rows.values()) and rows["scale", "c1"][0] > 1e3 * 1e-13
    assert "all groups at round-off" not in out and f"no group above the tolerance {high:.1e}" in out
    assert cli_main([*check, "--keep-eps", "--tolerance", f"{0.5 * predicted.min():.3e}"]) == 1
    rows = _check_table(capsys.readouterr().out)
    assert rows["scale", "c1"][2] == "FLAGGED units [0, 1, 2]"
    assert rows["scale", "c2"][2] == "FLAGGED units [0, 1, 2, 3]"
    assert all(st == "ok" for k, (_, _, st) in rows.items() if k[0] != "scale")


def test_cli_bad_input_exits_2(tmp_path, capsys):
    study = _toml(tmp_path, "[symmetry]\nenabeld = true\n")
    assert cli_main(["symmetries", study]) == 2
    err = capsys.readouterr().err
    assert "symmetry.enabeld" in err and "did you mean 'enabled'" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert cli_main(["check", _toml(tmp_path, "[[symmetry.groups]]\nkind = \"scale\"\nparams = [\"nope\"]\n")]) == 2


@pytest.mark.parametrize("model", [
    {"name": "helper_models:vgg_style", "batchnorm": True, "bn_eps": 1e-300, "dropout": 0.0},
    {"name": "helper_models:res_mlp"},
])
def test_gradient_flow_conserves_every_quantity(tmp_path, model):
    """θ' = −∇L (full batch, no weight decay) by RK4 with dt = 0.0025: every quantity constant to
    ≤ 1e-8 relative to its scale, while full-batch GD with η = 0.1 drifts by η²Σ|g_A|² terms, far more.

    RK4's conservation error is O(dt⁴) on smooth stretches; ReLU kinks lower the observed order to
    ~2.5 (measured 2.6e-8 at dt = 0.01, 8e-10 at dt = 0.0025 on the BatchNorm net over t = 1)."""
    pytest.importorskip("flowlab.flows")
    raw = _study(tmp_path, steps=5, wd=0.0, model=model, schedule={"name": "constant"}).to_dict()
    raw["optimizer"]["batch_size"] = "full"
    raw["flows"] = [{"name": "gradient_flow", "integrator": "flowlab:rk4", "dt": 0.0025, "label": "gf"}]
    ds = flowlab.run(flowlab.parse_study(raw), out=tmp_path / "gf", overwrite=True).load()
    assert list(ds.dynamics.values) == ["sgd", "gf"] and str(ds.status.values[1]) == "ok"
    rel = np.abs(ds.drift.values) / ds.group_scale.values  # (dynamics, time, symmetry_group)
    print(f"gradient flow: max relative drift {rel[1].max():.1e}; gd {rel[0].max():.1e}")
    assert rel[1].max() <= 1e-8
    assert rel[0].max() > 100 * rel[1].max()


@pytest.mark.parametrize("every,momentum,chunk", [(1, 0.0, 1000), (1, 0.9, 7), (3, 0.9, 1000), (2, 0.0, 3)])
def test_staged_blocks_equal_the_step_by_step_computation(tmp_path, monkeypatch, every, momentum, chunk):
    """The recorder stages ĝ, θ, v (and v_{k+1}) and computes a block at a time (issue 12 item 6);
    with one slot it computes every step as it comes.  Both must record the same numbers to
    round-off, whatever the blocks, rows, chunks and flushes in between: the blocks (16 slots)
    straddle row chunks of 3 and 7 rows and the theory's drains.  Tolerance: the two differ only
    in the order of the float64 sums over a group's members (≤ a few hundred terms), so each
    error is a few ulp of the group's scale (Σ|terms|); 64 ε bounds it."""
    from flowlab.symmetry.recorder import SymmetryRecorder

    def run(sub):
        st = _study(tmp_path, steps=40, every=every, momentum=momentum, wd=0.01)
        st = flowlab.parse_study({**st.to_dict(), "record": {**st.to_dict()["record"], "chunk": chunk}})
        return flowlab.run(st, out=tmp_path / sub, overwrite=True).load()

    blocks = run("blocks")
    monkeypatch.setattr(SymmetryRecorder, "max_slots", 1)
    steps = run("steps")
    names = ["quantity", "drift", "grad_term", "grad_term_acc", "weight_decay_factor", "theory"]
    if momentum:
        names += ["momentum_P", "momentum_V", "momentum_U"]
    for name in names:
        a, b = blocks[name].values, steps[name].values
        assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)), name
        assert np.isfinite(a).sum() > 0, name
        scale = np.nanmax(np.abs(b))
        np.testing.assert_allclose(a, b, rtol=0, atol=64 * np.finfo(np.float64).eps * scale, err_msg=name)
    # and both are the projector's own numbers at θ (snapshot rows hold θ: t = 0 and the end)
    study = _study(tmp_path)
    proj = flowlab.symmetry.study_groups(study, flowlab.build(study).problem).projector("cpu")
    steps_at = list(blocks.step.values)
    checked = 0
    for s, k in enumerate(blocks.snapshot_step.values):
        if k not in steps_at:
            continue
        theta = blocks.theta.sel(dynamics="sgd").isel(snapshot=s).values
        q = proj.quantities(torch.as_tensor(theta)).numpy()
        row = blocks.quantity.sel(dynamics="sgd").isel(time=steps_at.index(k)).values
        np.testing.assert_allclose(row, q, rtol=0, atol=64 * np.finfo(np.float64).eps * np.abs(q).max())
        checked += 1
    assert checked >= 2
