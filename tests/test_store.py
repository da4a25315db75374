"""The trajectory store: what was recorded is what comes back (zarr and netCDF), streamed in chunks."""

import json
import math
import re

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import small_study

import flowlab
from flowlab.flows import Continuous, GradientFlow, integrator
from flowlab.recording import Recorder
from flowlab.sgd import DiscreteSGD


class Tape(Recorder):
    """Keeps an independent copy of everything the run hands to the recorders."""

    def __init__(self):
        self.rows, self.snaps = [], []

    def record(self, rows, point):
        self.rows.append((point.step, point.time, point.theta.clone(), float(point.loss)))

    def snapshot(self, rows, point):
        self.snaps.append((point.step, point.theta.clone()))


def _run(tmp_path, **kw):
    raw = small_study(**kw)
    tape = Tape()
    ds = flowlab.run(flowlab.parse_study(raw), tmp_path / "out", recorders=[tape])
    return ds, tape, raw


def test_round_trip_zarr_and_netcdf(tmp_path):
    ds, tape, _ = _run(tmp_path, optimizer={"steps": 37, "momentum": 0.9}, record={"every": 2, "chunk": 5,
                                                                                    "snapshot_every": 10})
    steps = [s for s, *_ in tape.rows]
    assert ds.step.values.tolist() == steps == list(range(0, 37, 2)) + [37]
    np.testing.assert_array_equal(ds.time.values, [t for _, t, *_ in tape.rows])
    np.testing.assert_array_equal(ds.loss.sel(dynamics="sgd").values, [loss for *_, loss in tape.rows])
    # projections: seeded Gaussian matrix applied to the recorded θ
    R = torch.randn(4, len(tape.rows[0][2]), generator=torch.Generator().manual_seed(0 + 7919),
                    dtype=torch.float64) / np.sqrt(len(tape.rows[0][2]))
    expected = torch.stack([R @ th for _, _, th, _ in tape.rows]).numpy()
    np.testing.assert_allclose(ds.projection.sel(dynamics="sgd").values, expected, rtol=1e-13, atol=1e-15)
    # snapshots: t = 0, every 10 steps (first record at or after), and the end
    assert ds.snapshot_step.values.tolist() == [0, 10, 20, 30, 37]
    np.testing.assert_array_equal(ds.theta.sel(dynamics="sgd").values, torch.stack([t for _, t in tape.snaps]).numpy())
    assert ds.snapshot.values.tolist() == [ds.time.values[steps.index(s)] for s in [0, 10, 20, 30, 37]]
    assert ds.status.values.tolist() == ["ok"] and int(ds.n_grad_evals.values[0]) == 38
    assert np.all(ds.distance.values == 0)
    # reopening gives the same Dataset; netCDF export too
    again = flowlab.open_result(tmp_path / "out", load=True)
    xr.testing.assert_identical(again, ds.load())
    nc = flowlab.export_netcdf(tmp_path / "out", tmp_path / "copy.nc")
    back = flowlab.open_result(nc, load=True)
    for name in ds.data_vars:
        np.testing.assert_array_equal(back[name].values, ds[name].values)
    assert back.attrs["study"] == ds.attrs["study"]


def test_attrs_hold_config_versions_and_layout(tmp_path):
    import json

    ds, _, raw = _run(tmp_path, optimizer={"steps": 3})
    cfg = json.loads(ds.attrs["study"])
    assert cfg["optimizer"]["lr"] == raw["optimizer"]["lr"] and cfg["model"]["widths"] == [16]
    versions = json.loads(ds.attrs["versions"])
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])
    layout = flowlab.ParamLayout.from_dict(json.loads(ds.attrs["param_layout"]))
    assert layout.size == ds.sizes["param"] and layout.names[0].endswith("weight")
    assert "git_commit" in ds.attrs


def test_snapshots_match_an_independent_run(tmp_path):
    ds, _, raw = _run(tmp_path, optimizer={"steps": 25, "momentum": 0.5, "weight_decay": 1e-3},
                      record={"every": 5, "snapshot_every": "ends"})
    built = flowlab.build(flowlab.parse_study(raw))
    sgd = DiscreteSGD(built.problem, built.study.optimizer, built.lrs, 0)
    for _ in range(25):
        sgd.evaluate()
        sgd.update()
    assert ds.snapshot_step.values.tolist() == [0, 25]
    np.testing.assert_array_equal(ds.theta.values[0, 0], built.problem.theta0.numpy())
    np.testing.assert_array_equal(ds.theta.values[0, -1], sgd.theta.numpy())


def test_divergence_is_a_status_and_keeps_the_data(tmp_path):
    ds, tape, _ = _run(tmp_path, model={"name": "mlp", "widths": [16], "activation": "relu"},
                       loss={"name": "mse"}, optimizer={"lr": 50.0, "steps": 400, "batch_size": None})
    status = str(ds.status.values[0])
    match = re.fullmatch(r"diverged: non-finite loss at step (\d+) \(t = (\S+)\)", status)
    assert match, status
    k = int(match[1])
    assert float(match[2]) == pytest.approx(50.0 * k, rel=1e-12)  # t_k = Σ η = 50 k
    assert 0 < k < 400 and ds.step.values[-1] == k
    assert np.isfinite(ds.loss.values[0, :-1]).all() and not np.isfinite(ds.loss.values[0, -1])


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_existing_result_is_not_overwritten(tmp_path):
    """A second run into the same folder is refused and leaves the old result as it was; with
    overwrite=True the folder holds exactly what the new run writes into an empty folder (no variable,
    dynamics, row or file of the old run left)."""
    old = small_study(optimizer={"steps": 9}, record={"full_loss": True, "chunk": 4},
                      flows=[{"name": "gradient_flow", "integrator": "flowlab:rk4", "dt": 0.05, "label": "gf"}])
    flowlab.run(flowlab.parse_study(old), tmp_path / "o")
    before = flowlab.open_result(tmp_path / "o", load=True)
    assert list(before.dynamics.values) == ["sgd", "gf"] and "full_loss" in before  # what must go
    new = small_study(study={"seed": 3}, optimizer={"steps": 4}, record={"every": 2})
    with pytest.raises(flowlab.FlowlabError, match="exists"):
        flowlab.run(flowlab.parse_study(new), tmp_path / "o")
    xr.testing.assert_identical(flowlab.open_result(tmp_path / "o", load=True), before)

    ds = flowlab.run(flowlab.parse_study(new), tmp_path / "o", overwrite=True).load()
    fresh = flowlab.run(flowlab.parse_study(new), tmp_path / "fresh").load()
    assert list(ds.dynamics.values) == ["sgd"] and "full_loss" not in ds and "flow_law" not in ds
    assert ds.step.values.tolist() == [0, 2, 4]
    assert _files(tmp_path / "o") == _files(tmp_path / "fresh")  # the zarr arrays and chunks, the json files
    ignore = ["wall_seconds"]  # and the attribute "created"
    a, b = ds.drop_vars(ignore), fresh.drop_vars(ignore)
    for x in (a, b):
        del x.attrs["created"]
    xr.testing.assert_identical(a, b)
    for name in ("study.json", "summary.json"):  # equal but for the folder's name and the wall times
        got, want = (json.loads((tmp_path / folder / name).read_text()) for folder in ("o", "fresh"))
        for d in (got, want):
            for key in ("out", "regenerate", "wall_seconds"):
                d.pop(key, None)
        assert got == want, name


class StopBefore(Recorder):
    """Raises KeyboardInterrupt (what Ctrl-C raises) just before update k."""

    def __init__(self, k):
        self.k = k

    def before_update(self, info):
        if info.step == self.k:
            raise KeyboardInterrupt


class Explode(GradientFlow):
    """Gradient flow whose field turns non-finite after t = 0.25: a flow that stops mid-run."""

    name = "explode"

    def vector_field(self, t, state, ops, hp):
        (v,) = super().vector_field(t, state, ops, hp)
        return (v * math.inf if float(t) > 0.25 else v,)


def test_interruption_marks_every_running_dynamics(tmp_path):
    """flowlab.run re-raises the KeyboardInterrupt after keeping the rows: every dynamics still running
    is ``interrupted at step k``; a flow that had stopped keeps its own status."""
    k = 8  # η = 0.1: t_8 = 0.8, long after the exploding flow stopped
    raw = small_study(optimizer={"steps": 20}, record={"chunk": 4})  # rows 0..8: two chunks and one row left
    flows = [Continuous(GradientFlow(), integrator("flowlab:rk4", dt=0.05), "gf"),
             Continuous(Explode(), integrator("flowlab:rk4", dt=0.05), "boom")]
    with pytest.raises(KeyboardInterrupt):
        flowlab.run(flowlab.parse_study(raw), tmp_path / "o", recorders=[StopBefore(k)], flows=flows)
    ds = flowlab.open_result(tmp_path / "o", load=True)
    status = dict(zip(ds.dynamics.values.tolist(), ds.status.values.tolist()))
    assert status["sgd"] == status["gf"] == f"interrupted at step {k}", status
    assert status["boom"].startswith("blew up"), status
    assert ds.step.values.tolist() == list(range(k + 1))
    assert np.isfinite(ds.loss.sel(dynamics=["sgd", "gf"]).values).all()
    boom = ds.loss.sel(dynamics="boom").values
    assert np.isfinite(boom[:3]).all() and np.isnan(boom[3:]).all()  # rows at t ≤ 0.2 kept, NaN from t = 0.3


def test_store_is_readable_while_running(tmp_path):
    """Rows reach the disk in chunks during the run (a reader sees a growing prefix)."""
    seen = []

    class Peek(Recorder):
        def after_update(self, info):
            if info.step in (30, 60):
                from flowlab.store import open_result

                rt = getattr(self, "rt", None)
                if rt is None:
                    return
                rt.wait()
                seen.append(open_result(tmp_path / "o").sizes["time"])

    raw = small_study(optimizer={"steps": 70}, record={"chunk": 8})
    study = flowlab.parse_study(raw)
    run = flowlab.Run(study, tmp_path / "o", recorders=[Peek()])
    import flowlab.store as store

    original = store.TrajectoryWriter.__init__

    def spy_init(self, *a, **k):
        original(self, *a, **k)
        run.extra_recorders[0].rt = self

    store.TrajectoryWriter.__init__ = spy_init
    try:
        run.execute()
    finally:
        store.TrajectoryWriter.__init__ = original
    assert seen == [24, 56]  # whole chunks of 8 rows written so far


def test_recorder_variables_with_their_own_dims(tmp_path):
    """Variables without a dynamics dim and with the time dim in the middle round-trip in order."""
    from flowlab.recording import Variable

    class R(Recorder):
        def variables(self, ctx):
            return [Variable("per_run", ("kind_", "time", "slot"), shape=(2, 3),
                             coords={"kind_": np.array(["a", "b"], dtype=object), "slot": np.arange(3)}),
                    Variable("per_dynamics", ("dynamics", "slot", "time"), shape=(3,))]

        def record(self, rows, point):
            k = float(point.step)
            rows.put("per_run", None, torch.tensor([[k, 1.0, 2.0], [-k, 3.0, 4.0]], dtype=torch.float64))
            rows.put("per_dynamics", point.index, torch.tensor([k, k + 1, k + 2], dtype=torch.float64))

    raw = small_study(optimizer={"steps": 11}, record={"chunk": 4})
    ds = flowlab.run(flowlab.parse_study(raw), tmp_path / "o", recorders=[R()]).load()
    steps = ds.step.values.astype(float)
    assert ds.per_run.dims == ("kind_", "time", "slot") and ds.per_run.shape == (2, 12, 3)
    np.testing.assert_array_equal(ds.per_run.values[0, :, 0], steps)
    np.testing.assert_array_equal(ds.per_run.values[1, :, 0], -steps)
    np.testing.assert_array_equal(ds.per_run.values[1, :, 2], 4.0)
    assert ds.per_dynamics.dims == ("dynamics", "slot", "time")
    np.testing.assert_array_equal(ds.per_dynamics.values[0, 2], steps + 2)


DATA = __import__("pathlib").Path(__file__).resolve().parent / "data"


def test_dynamics_dim_selects_by_keyword(tmp_path):
    """``ds.x.sel(dynamics=...)`` selects (a dim named ``method`` was swallowed by sel's own keyword)."""
    raw = small_study(optimizer={"steps": 3}, flows=[{"name": "gradient_flow", "integrator": "flowlab:rk4",
                                                      "dt": 0.05, "label": "gf"}])
    ds = flowlab.run(flowlab.parse_study(raw), tmp_path / "o").load()
    assert ds.loss.dims == ("dynamics", "time")
    assert ds.loss.sel(dynamics="sgd").dims == ("time",)
    np.testing.assert_array_equal(ds.loss.sel(dynamics="gf").values, ds.loss.values[1])
    assert ds.quantity.dims == ("dynamics", "time", "symmetry_group")
    kinds = ds.quantity.groupby(group_kind=xr.groupers.UniqueGrouper()).max()  # no dim swallowed by groupby either
    assert set(kinds.group_kind.values) == set(ds.group_kind.values)
    from flowlab.recording import XARRAY_KEYWORDS

    assert not XARRAY_KEYWORDS & set(ds.dims)


@pytest.mark.parametrize("path", ["old_layout", "old_layout/trajectory.zarr", "old_layout.nc"])
def test_old_layout_store_opens_with_the_new_dims(path):
    """tests/data holds a store (and its netCDF export) written before the dim renames."""
    ds = flowlab.open_result(DATA / path, load=True)
    assert "method" not in ds.dims and "group" not in ds.dims
    assert list(ds.dynamics.values) == ["sgd", "gf"]
    assert ds.quantity.dims == ("dynamics", "time", "symmetry_group")
    assert ds.theory.dims == ("variant", "time", "symmetry_group")
    assert ds.group_kind.dims == ("symmetry_group",)
    np.testing.assert_array_equal(ds.loss.sel(dynamics="gf").values, ds.loss.values[1])
    assert ds.loss.sel(dynamics="sgd").shape == (ds.sizes["time"],)


def test_old_layout_store_reports_and_exports(tmp_path, capsys):
    from flowlab.cli import main

    assert main(["report", str(DATA / "old_layout"), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "gf" in out and "translation" in out
    path = flowlab.export_netcdf(DATA / "old_layout", tmp_path / "new.nc")
    assert "dynamics" in flowlab.open_result(path).dims


def test_variable_dims_old_names_and_clashes():
    from flowlab.recording import Variable

    with pytest.warns(DeprecationWarning, match="now named"):
        v = Variable("x", ("method", "time", "group"), shape=(3,))
    assert v.dims == ("dynamics", "time", "symmetry_group") and v.per_dynamics
    with pytest.raises(ValueError, match="keywords of xarray"):
        Variable("y", ("time", "dim"), shape=(2,))
