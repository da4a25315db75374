"""Properties of studies/noise_vs_finite_step.py's smoke output (one smoke run, shared): the split of
SGD's symmetry breaking and what each continuous model reproduces must already hold on its few steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from flowlab import studykit

ROOT = Path(__file__).resolve().parents[1]
NAME = "noise_vs_finite_step"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("noise")
    spec = importlib.util.spec_from_file_location(NAME, ROOT / "studies" / f"{NAME}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = studykit.main(NAME, mod.body, ["--smoke", "--results", str(out / "results"), "--runs", str(out / "runs")])
    assert rc == 0
    res = out / "results"
    ds = xr.open_dataset(res / f"{NAME}.nc", engine="h5netcdf").load()
    q = xr.open_dataset(res / "quadratic_weak.nc", engine="h5netcdf").load()
    return ds, q, json.loads((res / "summary.json").read_text()), (res / "summary.md").read_text()


def _norm(v) -> float:
    return float(np.linalg.norm(np.asarray(v)))


def test_full_batch_drift_is_the_finite_step_part(smoke):
    """GD with λ = 0: Q_A(T) − Q_A(0) = Σ_k η²|g_A(θ_k)|², to round-off where the symmetry is exact (ReLU
    rescale, BN's (γ, β) rescale) and to BN's ε where it is not (BN scale), with no noise part."""
    ds = smoke[0].sel(batch="full")
    assert float(np.abs(ds.noise).max()) == 0.0
    for c in ds.case.values:
        tol = 1e-2 if str(c).endswith(":scale") else 1e-9
        assert float(ds.closure_rel.sel(case=c).max()) < tol, (c, ds.closure_rel.sel(case=c).values)
    assert float(ds.sgd_drift_norm.min()) > 0


def test_minibatch_split_adds_up_to_sgds_drift(smoke):
    """E ΔQ = F + N in expectation (the smoke's 4 replicas leave a gap of the Monte Carlo floor's size,
    about 0.3), and the noise part is there."""
    ds = smoke[0]
    mini = [b for b in ds.batch.values if b != "full"]
    assert float(ds.closure_rel.sel(batch=mini).max()) < 0.6, ds.closure_rel.values
    assert np.all(np.isfinite(ds.closure_max_z.sel(batch=mini).values))
    assert bool((ds.noise_norm > 0.1 * ds.finite_norm).sel(batch=mini).all()), ds.noise_share.values


def test_each_model_carries_its_part(smoke):
    """Gradient flow conserves Q; on minibatches IGR's mean drift lies near the finite-step part F and
    SME-1's near the noise part N, much nearer than to SGD's whole drift; at full batch IGR follows GD."""
    ds = smoke[0]
    mini = [b for b in ds.batch.values if b != "full"]
    for c in ds.case.values:
        G = int(ds.groups.sel(case=c))
        for b in ds.batch.values:
            for lr in ds.lr.values:
                r = ds.sel(case=c, batch=b, lr=lr)
                assert _norm(r.model_drift.sel(model="gf")[:G]) < 0.05 * float(r.sgd_drift_norm), (c, b, lr)
                if b not in mini:
                    continue
                d = r.sgd_drift[:G]
                for m, part in (("igr", r.finite), ("sme", r.noise)):
                    dm = r.model_drift.sel(model=m)[:G]
                    assert _norm(dm - part[:G]) < 0.6 * _norm(dm - d), (c, b, lr, m)
    full = ds.sel(batch="full")
    # with one batch the SGD modified loss is IGR's flow; SME-1 has no noise, so (extrapolated) no drift
    np.testing.assert_allclose(full.model_drift.sel(model="sgd_ml"), full.model_drift.sel(model="igr"),
                               rtol=0, atol=1e-12)
    assert float(full.drift_rel_error.sel(model="sme").min()) > 0.9
    assert float(full.drift_rel_error.sel(model="igr").max()) < 0.3


def test_summary_states_the_split_and_the_quadratic(smoke):
    ds, q, js, md = smoke
    assert "**Found.**" in md and "noisy quadratic" in md
    assert set(js["points"]) == {f"{c}, B={b}, lr={lr:g}" for c in ds.case.values for b in ds.batch.values
                                 for lr in ds.lr.values}
    # the closed forms beside flowlab's Monte Carlo weak errors of the quadratic: within 4 se
    e, se, ex = q.weak_loss.values, q.se_loss.values, q.exact_weak_loss.values
    assert np.all(np.abs(e - ex) < 4 * se), (e, se, ex)
