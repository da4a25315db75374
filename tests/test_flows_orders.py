"""Measured orders of every flow against GD / heavy ball (the `orders` analysis), float64.

Expected: GF 1, modified_loss 2, modified_temporal 2, modified_second_order 3,
momentum_first_order 1, momentum_second_order 2, momentum_modified 2 (β = 0.5), each within ±0.2
(the issue's acceptance band).  Errors over the second half of the horizon (after the start-up
transient); reference solutions checked ≥ 100× more accurate than the error by tightening.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ROOT

import flowlab
from flowlab.cli import main as cli_main
from flowlab.flows.orders import format_table, measure_orders

EXPECTED = {"gradient_flow": 1, "modified_loss": 2, "modified_temporal": 2, "modified_second_order": 3,
            "momentum_first_order": 1, "momentum_second_order": 2, "momentum_modified": 2}


def _check(ds, names):
    table = format_table(ds)
    for name in names:
        i = list(ds.flow.values).index(name)
        assert int(ds.expected_order.values[i]) == EXPECTED[name]
        assert abs(float(ds.order_theta.values[i]) - EXPECTED[name]) <= 0.2, table
        assert bool(ds.reference_ok.values[i]), table  # reference ≥ 100× more accurate than e(η)
        assert bool(ds.passed.values[i])
    return table


def _quadratic_study():
    # eigenvalues 0.8 and 0.2: every η below is far from the edge of stability (ηλ ≤ 0.08)
    return flowlab.parse_study({
        "study": {"name": "q_orders", "dtype": "float64", "device": "cpu"},
        "model": {"name": "quadratic", "A": [[0.5, -0.3], [-0.3, 0.5]], "theta0": [1.0, -0.5]},
        "data": {"name": "points"},
        "optimizer": {"lr": 0.1, "steps": 1, "weight_decay": 0.01},
    })


@pytest.mark.slow
def test_orders_on_a_quadratic_all_flows():
    """Linear dynamics, no third derivative: the η-expansion flows at η = 0.1 … 0.025; the momentum
    flows at η = 0.05 … 0.0125 (their η² coefficient carries powers of 1/(1−β) and the asymptotic
    regime starts lower, docs/theory.md#start-up-and-time-shift)."""
    study = _quadratic_study()
    gd = [n for n in EXPECTED if not n.startswith("momentum")]
    hb = [n for n in EXPECTED if n.startswith("momentum")]
    ds = measure_orders(study, [0.1, 0.05, 0.025], horizon=4.0, flows=gd)
    _check(ds, gd)
    assert np.all(ds.beta.values == 0.0)
    ds = measure_orders(study, [0.05, 0.025, 0.0125], horizon=4.0, flows=hb, momentum=0.5)
    _check(ds, hb)
    assert np.all(ds.beta.values == 0.5)


TINY_FLOWS = ["gradient_flow", "modified_loss", "modified_temporal", "modified_second_order"]
TINY_MOMENTUM_FLOWS = ["momentum_first_order", "momentum_second_order", "momentum_modified"]


def _tiny_tanh_study(flows=None):
    """A 1-hidden-layer tanh net (4 units) on 32 points of a Gaussian mixture, full batch, float64."""
    return flowlab.parse_study({
        "study": {"name": "tiny", "dtype": "float64", "device": "cpu"},
        "model": {"name": "mlp", "widths": [4], "activation": "tanh"},
        "data": {"name": "gaussian_mixture", "n": 32, "dim": 3, "classes": 3},
        "loss": {"name": "cross_entropy"},
        "optimizer": {"lr": 0.1, "steps": 1, "weight_decay": 1e-3},
        "flows": flows or [],
    })


def test_orders_on_a_small_tanh_network():
    """The default-run check on a real (tiny) network: the η-expansion flows against GD, with a
    third derivative (modified_second_order) and the stiff second-order form (modified_temporal)."""
    ds = measure_orders(_tiny_tanh_study(), [0.2, 0.1, 0.05], horizon=1.0, flows=TINY_FLOWS, rtol=1e-8)
    names = TINY_FLOWS
    _check(ds, names)
    # function space tells the same story
    for i in range(len(names)):
        assert abs(float(ds.order_output.values[i]) - EXPECTED[names[i]]) <= 0.3


def test_momentum_orders_on_a_small_tanh_network():
    """The momentum flows against heavy ball (β = 0.5) on the same tiny network.  Their η²
    coefficient carries powers of 1/(1−β), so the asymptotic regime starts at smaller η and they
    are measured at η = 0.05 … 0.0125 over T = 2 (docs/theory.md#start-up-and-time-shift)."""
    ds = measure_orders(_tiny_tanh_study(), [0.05, 0.025, 0.0125], horizon=2.0, flows=TINY_MOMENTUM_FLOWS,
                        momentum=0.5, rtol=1e-8)
    _check(ds, TINY_MOMENTUM_FLOWS)
    assert np.all(ds.beta.values == 0.5) and list(ds.discrete.values) == ["heavy_ball"] * 3
    # the first-order form is compared at its own time t − ηβ/(1−β), the others unshifted
    np.testing.assert_allclose(ds.time_shift.values[0], ds.lr.values * 0.5 / (1 - 0.5), rtol=1e-15, atol=0)
    assert np.all(ds.time_shift.values[1] == 0.0) and np.all(ds.time_shift.values[2] == ds.time_shift.values[0])


def test_orders_cli_writes_the_table_and_dataset(tmp_path, capsys):
    path = tmp_path / "q.toml"
    path.write_text('[study]\nname = "q"\ndevice = "cpu"\n[model]\nname = "quadratic"\nA = [[0.5, -0.3], [-0.3, 0.5]]\n'
                    '[data]\nname = "points"\n[optimizer]\nlr = 0.1\nsteps = 1\n')
    code = cli_main(["orders", str(path), "--lr", "0.1,0.05", "--horizon", "1", "--flows",
                     "gradient_flow,modified_loss", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0
    assert "gradient_flow" in out and "expected" in out
    import xarray as xr

    ds = xr.open_dataset(tmp_path / "o" / "orders.nc", engine="h5netcdf")
    assert ds.sizes["lr"] == 2 and "order_theta" in ds and "err_output" in ds
    assert cli_main(["orders", str(path), "--lr", "0.1,0.03", "--horizon", "1"]) == 2  # T not a multiple of 0.03


def test_orders_cli_momentum_sets_the_heavy_ball_beta(tmp_path, capsys):
    """``flowlab orders --momentum 0.25``: the momentum flows and the heavy ball they are measured
    against both take β = 0.25 (the study has no momentum, so the default would be 0.5).  The flow
    side shows in the time shift ηβ/(1−β); the discrete side in the orders: against a heavy ball
    with another β the error would not fall with η at all."""
    path = tmp_path / "q.toml"
    path.write_text('[study]\nname = "q"\ndevice = "cpu"\n[model]\nname = "quadratic"\nA = [[0.5, -0.3], [-0.3, 0.5]]\n'
                    '[data]\nname = "points"\n[optimizer]\nlr = 0.1\nsteps = 1\n')
    code = cli_main(["orders", str(path), "--lr", "0.1,0.05", "--horizon", "1", "--flows",
                     "momentum_first_order,momentum_second_order", "--momentum", "0.25", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0 and out.count("HB β=0.25") == 2, out
    import xarray as xr

    ds = xr.open_dataset(tmp_path / "o" / "orders.nc", engine="h5netcdf")
    assert np.all(ds.beta.values == 0.25)
    np.testing.assert_allclose(ds.time_shift.values[0], ds.lr.values * 0.25 / 0.75, rtol=1e-15, atol=0)
    assert bool(ds.passed.all()), format_table(ds)


@pytest.mark.slow
def test_orders_on_the_tanh_study_all_flows():
    """The acceptance check: every flow's order within ±0.2 on studies/orders_tanh.toml (a 1210-
    parameter tanh MLP on 128 digits, full batch, β = 0.5), η = 0.1 … 0.0125, T = 2."""
    study = flowlab.load_study(ROOT / "studies" / "orders_tanh.toml")
    ds = measure_orders(study, [0.1, 0.05, 0.025, 0.0125], horizon=2.0, momentum=0.5)
    table = _check(ds, EXPECTED)
    print(table)
    assert np.all(ds.margin.values >= 100)


def test_orders_on_a_small_tanh_network_with_diffrax():
    """The same default-run check with every flow integrated by diffrax (the JAX backend)."""
    names = ["gradient_flow", "modified_loss", "modified_second_order"]
    study = _tiny_tanh_study([{"name": n, "integrator": "diffrax:Dopri5", "rtol": 1e-8, "label": n} for n in names])
    ds = measure_orders(study, [0.2, 0.1, 0.05], horizon=1.0)
    _check(ds, names)


@pytest.mark.slow
def test_orders_on_the_tanh_study_all_flows_with_diffrax():
    """The acceptance check reproduced on the JAX backend: studies/orders_tanh_diffrax.toml (the same
    model, data and discrete runs as orders_tanh.toml, every flow a diffrax:Dopri5 session)."""
    study = flowlab.load_study(ROOT / "studies" / "orders_tanh_diffrax.toml")
    assert {f.integrator for f in study.flows} == {"diffrax:Dopri5"}
    ds = measure_orders(study, [0.1, 0.05, 0.025, 0.0125], horizon=2.0, momentum=0.5)
    table = _check(ds, EXPECTED)
    print(table)
    assert np.all(ds.margin.values >= 100)
