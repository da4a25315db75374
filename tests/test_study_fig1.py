"""Properties of studies/fig1_neurons_vs_parameters.py and its smoke output (the paper's Fig. 1): the
roughness measures mean what the summary says, the kept coordinates of θ are the channels whose squared
norms are plotted, and the theory / gradient-flow contrast already shows on the smoke steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from flowlab import studykit

ROOT = Path(__file__).resolve().parents[1]
NAME = "fig1_neurons_vs_parameters"


def _module():
    spec = importlib.util.spec_from_file_location(NAME, ROOT / "studies" / f"{NAME}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig1")
    rc = studykit.main(NAME, _module().body, ["--smoke", "--results", str(out / "results"),
                                              "--runs", str(out / "runs")])
    assert rc == 0
    return out / "results"


def test_roughness_measures():
    mod = _module()
    n = 400
    t = np.linspace(0.0, 1.0, n + 1)
    smooth = np.stack([np.exp(-3 * t), 1 + t**2, np.sin(np.pi * t)], axis=1)   # two monotone, one up-down
    tv = mod.tv_over_range(smooth)
    assert tv[:2] == pytest.approx(1.0, abs=1e-12)
    assert tv[2] == pytest.approx(2.0, abs=1e-9)
    walk = np.cumsum(np.random.default_rng(0).standard_normal((n + 1, 200)), axis=0)
    # a random walk of n steps: TV ~ n·E|ξ| = n·√(2/π), range ~ √n·(a constant of order 1)
    assert np.median(mod.tv_over_range(walk)) > 0.3 * np.sqrt(n)
    # increment std ÷ range: ~1/√n for the walk, ~1/n for a smooth curve
    assert 0.2 / np.sqrt(n) < np.median(mod.increment_std_over_range(walk)) < 2 / np.sqrt(n)
    assert mod.increment_std_over_range(smooth).max() < 3 / n


def test_kept_coordinates_are_the_plotted_channels(smoke):
    ds = xr.open_dataset(smoke / f"{NAME}.nc", engine="h5netcdf")
    s = json.loads((smoke / "summary.json").read_text())
    assert s["focus_norm_recomputed_max_rel_err"] < 1e-12   # float64, inside the run
    mod = _module()
    for c in mod.FOCUS_CHANNELS:
        cols = (ds.param_set.values == "channel") & (ds.param_channel.values == c)
        assert (ds.param_layer.values[cols] == mod.FOCUS_LAYER).all()
        ch = np.flatnonzero((ds.channel_layer.values == mod.FOCUS_LAYER) & (ds.channel_unit.values == c))
        assert ch.size == 1
        recomputed = (ds.theta.values[:, cols].astype(np.float64) ** 2).sum(axis=1)
        np.testing.assert_allclose(recomputed, ds.sq_norm.values[:, ch[0]], rtol=1e-5)   # float32 copies
    assert ds.sizes["time"] == s["rows"] and np.all(np.diff(ds.time.values) > 0)


def test_theory_beats_gradient_flow_and_weights_are_rougher(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    assert s["status"] == "ok"
    allrow = next(r for r in s["layers"] if r["layer"] == "all conv layers")
    assert allrow["max_rel_err_paper"] < 1e-3 and allrow["max_rel_err_exact_discrete"] < 1e-3
    assert allrow["max_rel_err_gradient_flow"] > 100 * allrow["max_rel_err_paper"]
    assert allrow["param_tv_over_range"] > allrow["norm_tv_over_range"]


def test_summary_numbers_are_the_json_numbers(smoke):
    s = json.loads((smoke / "summary.json").read_text())
    text = (smoke / "summary.md").read_text()
    for r in s["layers"]:
        assert f"| {r['layer']} |" in text
        assert f"{r['max_rel_err_paper']:.2e}" in text and f"{r['param_tv_over_range']:.2f}" in text
