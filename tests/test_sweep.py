"""Sweeps on dask.distributed (issue 12): the [sweep] section, `flowlab sweep` on a LocalCluster and
on a scheduler started as a user would, resumption, and the combined Dataset against the points run
one by one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import small_toml

import flowlab
from flowlab.cli import main
from flowlab.config import load_study
from flowlab.errors import ConfigError
from flowlab.sweep.config import point_study

STUDY = small_toml("sw", steps=6) + """
[record]
every = 2
projections = 2
[[flows]]
name = "gradient_flow"
integrator = "flowlab:rk4"
label = "gf"
"""

SWEEP = """
[sweep]
"optimizer.lr" = [0.2, 0.1, 0.05]
"optimizer.weight_decay" = [0.0, 5e-4]
"study.seed" = [0, 1]
"""


def _study(tmp_path, sweep=SWEEP, extra="") -> Path:
    path = tmp_path / "sw.toml"
    path.write_text(STUDY + extra + sweep)
    return path


def _same(a: xr.Dataset, b: xr.Dataset, names=("loss", "distance", "projection", "quantity", "theta")) -> None:
    for name in names:
        np.testing.assert_array_equal(np.asarray(a[name].values), np.asarray(b[name].values), err_msg=name)


def test_a_twelve_point_sweep_on_a_local_cluster_equals_the_points_run_one_by_one(tmp_path, capsys):
    path = _study(tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2"]) == 0
    assert "12/12 points ok" in capsys.readouterr().out
    ds = flowlab.open_result(out)
    assert ds.sweep_status.dims == ("lr", "weight_decay", "seed") and (ds.sweep_status.values == "ok").all()
    assert ds.loss.dims[:3] == ("lr", "weight_decay", "seed")
    assert ds.loss.chunks is not None  # lazy, dask-backed
    study = load_study(path)
    for lr in (0.2, 0.05):
        for seed in (0, 1):
            single = flowlab.run(point_study(study, {"optimizer.lr": lr, "optimizer.weight_decay": 5e-4,
                                                     "study.seed": seed}), tmp_path / f"one-{lr}-{seed}")
            _same(ds.sel(lr=lr, weight_decay=5e-4, seed=seed), single)
    # t = Σ η differs with η: time is a coordinate along lr
    assert np.allclose(ds.time.sel(lr=0.05).values, 0.05 * ds.step.values)
    # the sweep's report: one row per point, the figure of merit against each numeric axis
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "12 points" in text and "max distance from SGD vs lr (log–log slope): gf" in text
    report = json.loads((out / "sweep_report.json").read_text())
    assert len(report["points"]) == 12 and (out / "sweep_lr.png").exists()
    from flowlab.sweep.report import merit_slopes

    slope = merit_slopes(ds)["lr"]["gf"]
    lrs = np.array([0.2, 0.1, 0.05])
    merit = [float(ds.distance.sel(lr=lr, dynamics="gf").max("time").mean().values) for lr in lrs]
    assert slope == pytest.approx(np.polyfit(np.log(lrs), np.log(merit), 1)[0], rel=1e-12)
    assert report["slopes"]["lr"]["gf"] == pytest.approx(slope)
    # resume: nothing to do, nothing recomputed
    stamps = {p: (p / "point.json").stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert main(["sweep", str(path), "--out", str(out), "--resume"]) == 0
    assert stamps == {p: (p / "point.json").stat().st_mtime_ns for p in (out / "points").iterdir()}


def test_resume_reruns_only_missing_and_failed_points(tmp_path, capsys):
    path = _study(tmp_path, sweep='[sweep]\n"optimizer.lr" = [0.2, 0.1, 0.05]\n')
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1"]) == 0
    points = sorted((out / "points").iterdir())
    kept = (points[0] / "point.json").stat().st_mtime_ns
    (points[1] / "point.json").write_text(json.dumps({"status": "failed: RuntimeError: injected"}))
    (points[2] / "point.json").unlink()  # unfinished (a killed run)
    ds = flowlab.open_result(out)
    assert list(ds.sweep_status.values) == ["ok", "failed: RuntimeError: injected", "missing"]
    assert np.isnan(ds.loss.sel(lr=0.05).values).all()
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1", "--resume"]) == 0
    assert (points[0] / "point.json").stat().st_mtime_ns == kept
    ds = flowlab.open_result(out)
    assert (ds.sweep_status.values == "ok").all() and np.isfinite(ds.loss.sel(lr=0.05, dynamics="sgd").values).all()


def test_failed_points_do_not_sink_the_sweep(tmp_path, capsys):
    # an unknown activation fails the point's build (recorded, the others go on); two widths give points
    # of different shapes (aligned with NaN)
    path = _study(tmp_path, sweep='[sweep]\n"optimizer.lr" = [0.1, 50.0]\n"model.widths" = [[8], [4, 4]]\n'
                                  '"model.activation" = ["tanh", "nonexistent"]\n')
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2"]) == 1
    ds = flowlab.open_result(out)
    status = ds.sweep_status
    assert (status.sel(activation="tanh").values == "ok").all()
    assert all("nonexistent" in s for s in np.ravel(status.sel(activation="nonexistent").values))
    # every dynamics' own status is there per point (a diverged dynamics would say so)
    assert set(np.ravel(ds.status.sel(activation="tanh").values)) == {"ok"}
    assert set(np.ravel(ds.status.sel(activation="nonexistent").values)) == {"missing"}
    assert "differ in shape" in ds.attrs["sweep_alignment"]
    assert np.isfinite(ds.loss.sel(lr=0.1, activation="tanh", dynamics="sgd").isel(time=-1).values).all()


@pytest.mark.parametrize("sweep,field", [
    ('[sweep]\n"optimizer.lrr" = [0.1, 0.2]\n', "sweep.optimizer.lrr"),
    ('[sweep]\n"optimizer.lr" = ["fast"]\n', "sweep.optimizer.lr"),
    ('[sweep]\n"optimizer.lr" = []\n', "sweep.optimizer.lr"),
    ('[sweep]\n"optimizer.lr" = [0.1, 0.2]\nzip = [["optimizer.lr", "study.seed"]]\n', "sweep.zip"),
])
def test_bad_sweeps_are_one_line(tmp_path, capsys, sweep, field):
    path = _study(tmp_path, sweep=sweep)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1, err


def test_unreachable_scheduler_and_foreign_folder(tmp_path, capsys):
    path = _study(tmp_path, sweep='[sweep]\n"optimizer.lr" = [0.2, 0.1]\n')
    t0 = time.monotonic()
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--scheduler" in err and len(err.splitlines()) == 1
    assert time.monotonic() - t0 < 30
    out = tmp_path / "s"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "1"]) == 0
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace("steps = 6", "steps = 7"))
    capsys.readouterr()
    assert main(["sweep", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "belongs to another study" in err and "optimizer.steps" in err


def test_sweep_on_a_scheduler_started_as_a_user_would(tmp_path):
    path = _study(tmp_path, sweep='[sweep]\n"optimizer.lr" = [0.2, 0.1]\n"study.seed" = [0, 1]\n')
    sched_file = tmp_path / "scheduler.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    sched = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--scheduler-file", str(sched_file), "--port", "0",
                              "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        for _ in range(100):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.2)
        worker = subprocess.Popen([str(bin_dir / "dask"), "worker", "--scheduler-file", str(sched_file), "--nthreads",
                                   "1", "--nworkers", "1"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        out = tmp_path / "remote"
        assert main(["sweep", str(path), "--out", str(out), "--scheduler-file", str(sched_file)]) == 0
        local = tmp_path / "local"
        assert main(["sweep", str(path), "--out", str(local), "--workers", "1"]) == 0
        _same(flowlab.open_result(out), flowlab.open_result(local))
    finally:
        for proc in (worker, sched):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


def test_sweep_section_is_checked_when_the_study_is_read(tmp_path):
    path = _study(tmp_path, sweep='[sweep]\nlr = [0.1]\n')
    with pytest.raises(ConfigError, match="sweep.lr"):
        load_study(path)


def test_a_killed_worker_does_not_lose_or_recompute_points(tmp_path):
    """SIGKILL one of two worker processes mid-sweep: dask reschedules its point, the sweep completes
    with every point, and no point that had finished is run again."""
    import signal
    import threading

    from distributed import Client, LocalCluster

    from flowlab.sweep.runner import run_sweep

    path = _study(tmp_path, sweep='[sweep]\n"optimizer.lr" = [0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625]\n',
                  extra="").read_text().replace("steps = 6", "steps = 300")
    (tmp_path / "slow.toml").write_text(path)
    study = load_study(tmp_path / "slow.toml")
    out = tmp_path / "sweep"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("ds", run_sweep(study, out, client=client,
                                                                                      log=lambda m: None)))
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(out.glob("points/*/point.json")):
            time.sleep(0.05)
        finished = {p: p.stat().st_mtime_ns for p in out.glob("points/*/point.json")}
        assert finished, "no point finished in time"
        pids = list(client.run(os.getpid).values())
        os.kill(pids[0], signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
    ds = result["ds"]
    assert (ds.sweep_status.values == "ok").all()
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())


def test_gpu_check_study_runs_tiny_on_the_cpu(tmp_path):
    """studies/gpu_check.toml (VGG-16, Tiny-ImageNet shapes, every recorder, GF and IGR) at toy size on
    the CPU; the float32 / TF32 choices are in the attrs."""
    from flowlab.config import load_study

    study = load_study(Path(__file__).resolve().parents[1] / "studies" / "gpu_check.toml", [
        "study.device=\"cpu\"", "data.n=8", "data.size=32", "data.classes=10", "model.width=0.0625",
        "model.classifier=[16, 16]", "optimizer.steps=2", "optimizer.batch_size=4", "record.every=1"])
    ds = flowlab.run(study, tmp_path / "gpu")
    assert list(ds.status.values) == ["ok", "ok", "ok"] and set(ds.dynamics.values) == {"sgd", "gf", "igr"}
    assert ds.attrs["tf32"] == 0 and ds.attrs["dtype"] == "float32" and "float32_matmul_precision" in ds.attrs
    assert {"quantity", "theory", "flow_law", "projection"} <= set(ds.data_vars)


def test_a_sweep_of_ensembles(tmp_path, capsys):
    """Points that are ensembles keep their ``sample`` dim in the sweep's Dataset; the report averages it."""
    path = _study(tmp_path, sweep='[sweep]\n"optimizer.lr" = [0.1, 0.05]\n', extra='[ensemble]\nsize = 3\n')
    text = path.read_text().replace("batch_size = 20", "batch_size = 20\nsampling = \"with_replacement\"")
    text = text.replace('name = "gradient_flow"\nintegrator = "flowlab:rk4"\nlabel = "gf"', 'name = "sme"\nlabel = "sme"')
    path.write_text(text)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), "--workers", "2"]) == 0
    ds = flowlab.open_result(out)
    assert ds.loss.dims == ("lr", "dynamics", "sample", "time") and ds.sizes["sample"] == 3
    assert float(ds.loss.sel(dynamics="sme").isel(time=-1).std("sample").max()) > 0  # SME paths differ
    capsys.readouterr()
    assert main(["report", str(out), "--no-figures"]) == 0
    assert "ensemble of 3 replicas" in capsys.readouterr().out
