"""The theory recorded beside real runs: exact discrete identities to round-off (float64)."""

import numpy as np
import pytest
import torch
from conftest import small_study

import flowlab


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
    assert err.max() <= 1e-10, err.max()
    # the measured quantities did move (the identity is not trivially satisfied)
    drift = np.abs(ds.drift.isel(dynamics=0).values[-1]) / ds.group_scale.values
    assert np.median(drift) > 1e-3


def test_variants_and_their_ordering_of_errors(tmp_path):
    ds = _run(tmp_path, {"weight_decay": 2e-2}, steps=150)
    assert list(ds.variant.values) == ["conservation", "gradient_flow", "paper", "paper_hat", "exact_discrete"]
    assert ds.theory.dims == ("variant", "time", "symmetry_group")
    worst = {v: _rel_err(ds, v).max() for v in ds.variant.values}
    # the discrete identity is exact; the continuous laws beat ignoring the gradient term
    assert worst["exact_discrete"] < 1e-12 < worst["paper_hat"] < min(worst["gradient_flow"], worst["conservation"])
    assert worst["paper"] < min(worst["gradient_flow"], worst["conservation"])
    # translation needs no gradient term: its continuous law is e^{−λt}, off only by O(ηλ)·λt
    tr = ds.group_kind.values == "translation"
    lam, eta, t = 2e-2, 0.1, float(ds.time[-1])
    assert _rel_err(ds, "paper")[:, tr].max() < 2 * eta * lam * lam * t


def test_momentum_variants_and_nesterov(tmp_path):
    ds = _run(tmp_path, {"weight_decay": 5e-3, "momentum": 0.9, "nesterov": True}, steps=30)
    assert list(ds.variant.values) == ["conservation", "gradient_flow", "exact_discrete", "oscillator",
                                       "momentum_first_order"]
    assert np.isnan(ds.theory.sel(variant="exact_discrete").values[1:]).all()
    assert "Nesterov" in ds.theory.attrs["exact_discrete"]
    assert np.isfinite(ds.theory.sel(variant="oscillator").values).all()


def test_theory_section(tmp_path):
    ds = _run(tmp_path, {"weight_decay": 1e-3}, steps=6, theory={"variants": ["paper", "exact_discrete"]})
    assert list(ds.variant.values) == ["paper", "exact_discrete"]
    off = _run(tmp_path / "b", {"weight_decay": 1e-3}, steps=6, theory={"enabled": False})
    assert "theory" not in off
    with pytest.raises(flowlab.ConfigError, match="theory.variants = 'papr'.*did you mean 'paper'"):
        flowlab.parse_study(small_study(theory={"variants": ["papr"]}))


def test_report_prints_theory_and_flow_laws(tmp_path, capsys):
    from flowlab.cli import main

    raw = small_study(model={"name": "mlp", "widths": [6], "activation": "identity", "batchnorm": True},
                      data={"name": "digits", "n": 60}, optimizer={"lr": 0.1, "steps": 6, "weight_decay": 0.01},
                      record={"every": 3},
                      flows=[{"name": "gradient_flow", "integrator": "torchdiffeq:dopri5", "rtol": 1e-8}])
    flowlab.run(flowlab.parse_study(raw), tmp_path / "o")
    assert main(["report", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "theory vs measured" in out and "exact_discrete" in out
    assert "obeys its law" in out and "gradient_flow@torchdiffeq:dopri5" in out
    assert (tmp_path / "o" / "theory_fig5.png").stat().st_size > 1000
