"""Properties of studies/fig4_quadratic.py's smoke output (the paper's Fig. 4 quadratic): what the
study claims must already hold on its few smoke steps, and its figure curves must be the run's flows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from flowlab import studykit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig4")
    spec = importlib.util.spec_from_file_location("fig4_quadratic", ROOT / "studies" / "fig4_quadratic.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = studykit.main("fig4_quadratic", mod.body, ["--smoke", "--results", str(out / "results"),
                                                    "--runs", str(out / "runs")])
    assert rc == 0
    return out / "results"


def _flows(summary, key):
    return {r["flow"]: r for r in summary[key]["flows"]}


def test_gd_flows_are_ordered_by_their_order(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    f = _flows(s, "gd")
    late = {k: r["late_max_dist"] for k, r in f.items()}
    # O(η³) < O(η²) (IGR) < O(η) (gradient flow), each by a clear factor at η = 0.1
    assert late["modified_second_order"] < 0.5 * late["modified_loss"] < 0.25 * late["gradient_flow"], late
    assert late["modified_temporal"] < 0.5 * late["gradient_flow"], late


def test_only_the_second_order_momentum_flow_overshoots_with_heavy_ball(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    f, disc = _flows(s, "hb"), s["hb"]["discrete"]
    assert disc["fast_crossings"] >= 1  # heavy ball crosses the sharp valley already in the smoke steps
    so = f["momentum_second_order"]
    assert so["fast_crossings"] == disc["fast_crossings"]
    for name in ("gradient_flow", "momentum_first_order", "momentum_modified"):
        assert f[name]["fast_crossings"] == 0, name
        assert so["max_dist"] < 0.05 * f[name]["late_max_dist"], name


def test_solver_error_is_far_below_every_distance(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    for key in ("gd", "hb"):
        for r in s[key]["flows"]:
            assert r["solver_error"] < 1e-3 * r["final_dist"], (key, r["flow"], r["solver_error"], r["final_dist"])


def test_dense_curves_end_where_the_run_ends(smoke):
    ds = xr.open_dataset(smoke / "fig4_quadratic.nc", engine="h5netcdf")
    for key in ("gd", "hb"):
        dense = ds[f"{key}_dense_theta"].values[:, -1]  # (flow, 2) at t = T
        run = ds[f"{key}_theta"].values[1:, -1]  # the run's flows at its last row, t = T
        assert list(ds[f"{key}_flow"].values) == list(ds[f"{key}_dynamics"].values[1:])
        np.testing.assert_allclose(dense, run, rtol=0, atol=1e-12)
        assert float(ds[f"{key}_dense_time"][-1]) == pytest.approx(float(ds[f"{key}_time"][-1]), abs=1e-12)
