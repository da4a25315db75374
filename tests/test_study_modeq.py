"""Properties of studies/modified_equation_validation.py's smoke output (one smoke run, shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "modified_equation_validation"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    import xarray as xr

    tmp = tmp_path_factory.mktemp("modeq")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / f"{NAME}.py"), "--smoke", "--results",
                           str(tmp / "results"), "--runs", str(tmp / "runs")],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = tmp / "results"
    ds = xr.open_dataset(res / f"{NAME}.nc", engine="h5netcdf").load()
    return ds, json.loads((res / "summary.json").read_text()), (res / "summary.md").read_text()


def test_errors_are_finite_and_models_placed(smoke):
    ds, _, _ = smoke
    pe = ds.param_error
    for i in range(ds.sizes["point"]):
        beta = float(ds.momentum[i])
        have = {str(m) for m in ds.model.values if np.isfinite(pe.values[i, list(ds.model.values).index(m)])}
        want = {"gf", "igr", "igr_fd", "temporal", "second_order"} if beta == 0 else {"gf", "mom1", "mom2", "mom_mod"}
        assert have == want, (beta, have)
    assert (pe.values[np.isfinite(pe.values)] >= 0).all()


def test_translation_is_conserved_by_gd_and_every_flow(smoke):
    """⟨θ_A, 1⟩ of the last layer is conserved exactly by GD, heavy ball and every flow when λ = 0."""
    ds, _, _ = smoke
    tr = ds.symmetry_error.sel(kind="translation").values[ds.weight_decay.values == 0]
    assert np.nanmax(tr) < 1e-12
    wtr = ds.weak_symmetry_error.sel(kind="translation").values
    assert np.nanmax(wtr) < 1e-12


def test_kinks_break_the_hvp_correction_and_tanh_does_not(smoke):
    _, js, _ = smoke
    k = js["figures"]["kinks"]
    for a in ("relu", "tanh"):
        assert k[a]["hvp_check_h1e-6"] < 1e-6       # the HVP itself is right
    assert k["relu"]["fd_vs_hvp_eta0.1"] > 10 * k["tanh"]["fd_vs_hvp_eta0.1"]
    assert k["tanh"]["fd_vs_hvp_eta0.1"] < 0.1


def test_smooth_control_orders_the_modified_flows(smoke):
    """On the tanh network the modified equations work: IGR ≪ gradient flow, the second-order flow below IGR;
    with momentum, the second-order momentum flow beats gradient flow."""
    ds, _, _ = smoke
    c = ds.control_param_error
    b0 = c.isel(control_point=int(np.flatnonzero(ds.control_momentum.values == 0)[0]))
    assert float(b0.sel(model="igr")) < float(b0.sel(model="gf")) / 5
    assert float(b0.sel(model="second_order")) < float(b0.sel(model="igr"))
    hb = ds.param_error.values[ds.momentum.values > 0]
    models = list(ds.model.values)
    assert (hb[:, models.index("mom2")] < hb[:, models.index("gf")]).all()


def test_summary_states_the_measured_winners(smoke):
    """The Found paragraph names, for every weak row and test function, the winner the Dataset gives."""
    import importlib.util

    ds, js, md = smoke
    spec = importlib.util.spec_from_file_location("modeq", ROOT / "studies" / f"{NAME}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    found = md.split("**Found.**", 1)[1].split("\n\n", 1)[0]
    models = [str(m) for m in ds.weak_model.values]
    for beta in np.unique(ds.weak_momentum.values):
        rows = np.flatnonzero(ds.weak_momentum.values == beta)
        best = [models[int(np.nanargmin(ds.weak_loss_error.values[i]))] for i in rows]
        for i, b in zip(rows, best):
            assert js["figures"]["weak"]["loss"][i]["winner"] == b
        counts = {m: best.count(m) for m in dict.fromkeys(best)}
        said = f"β = {beta:g}: " + ", ".join(f"{mod.NAMES[m]} at {c} of {len(rows)} η" for m, c in counts.items())
        assert said in found, said
    assert sum(js["figures"]["wins_beta0"].values()) == 2  # smoke grid: one η, two λ at β = 0
