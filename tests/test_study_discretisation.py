"""studies/discretisation_error.py in smoke mode: what its output must say, checked on the output itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("discretisation_error")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / "discretisation_error.py"), "--smoke",
                           "--results", str(out / "results"), "--runs", str(out / "runs")],
                          capture_output=True, text=True, env=env, cwd=out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import xarray as xr

    ds = xr.open_dataset(out / "results" / "discretisation_error.nc", engine="h5netcdf").load()
    res = json.loads((out / "results" / "summary.json").read_text())
    return ds, res, (out / "results" / "summary.md").read_text()


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_errors_shrink_with_eta_and_modified_flows_beat_gradient_flow(smoke, model):
    ds = smoke[0]
    e = ds[f"{model}_err_theta"].values  # (flow, eta), η descending
    assert np.all(np.isfinite(e)) and np.all(e > 0)
    assert np.all(np.diff(e, axis=1) < 0), "the global error must fall with η for every flow"
    # the references were checked: each error is ≥ 100× its reference's own error
    assert np.all(ds[f"{model}_margin"].values >= 100)
    # at the smallest η every modified flow (order ≥ 2) is closer to GD than gradient flow (order 1)
    assert np.all(e[1:, -1] < e[0, -1])
    # the local order is the slope between neighbouring η
    eta = ds[f"eta_{model}"].values
    local = np.log(e[:, 0] / e[:, 1]) / np.log(eta[0] / eta[1])
    np.testing.assert_allclose(ds[f"{model}_local_order"].values[:, 0], local, rtol=1e-12)


def test_summary_numbers_are_the_datasets(smoke):
    ds, res, md = smoke
    m = res["models"]["tanh MLP"]
    for i, label in enumerate(("gf", "igr", "temporal", "second")):
        assert m["orders"][label]["err_largest_eta"] == pytest.approx(float(ds.mlp_err_theta.values[i, 0]), rel=1e-12)
        assert f"{m['orders'][label]['err_largest_eta']:.3g}" in md
    np.testing.assert_allclose(m["max_lam_eta"], ds.mlp_max_lam_eta.values, rtol=1e-12)
    assert "**Found.**" in md and "central flow" in md


def test_symmetry_drift_of_gradient_flow_is_all_error(smoke):
    """Gradient flow conserves every rescale quantity (λ = 0), so its drift error relative to GD's is 1
    (to its rk4 error), and GD's own drift is not zero."""
    ds = smoke[0]
    gd = ds.relu_drift_norm.sel(dynamics_relu="sgd").values
    assert np.all(gd > 1e-6)
    gf = ds.relu_drift_norm.sel(dynamics_relu="gf").values
    assert np.all(gf < 1e-3 * gd)
    rel = ds.relu_drift_err.sel(dynamics_relu="gf").values / gd
    np.testing.assert_allclose(rel, 1.0, atol=1e-3)
