"""Reliability (issue 13): divergence and solver failure are results (every dynamics stops alone,
with the reason and the step / time in its status), progress reaches a log, rows reach the store
at least every ``[record] flush_seconds``, and the same study gives the same numbers."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import small_study, small_toml

import flowlab
from flowlab.cli import main
from flowlab.errors import ConfigError
from flowlab.recording import Recorder

STATUS = re.compile(r"diverged: non-finite loss at step (\d+) \(t = (\S+)\)")


# ------------------------------------------------------------------------- divergence

DIVERGENT = """
[study]
name = "divergent"
dtype = "float64"
device = "cpu"
[model]
name = "mlp"
widths = [8]
activation = "relu"
[data]
name = "digits"
n = 100
[loss]
name = "mse"
[optimizer]
lr = 1000.0
steps = {steps}
[record]
every = 5
[[flows]]
name = "gradient_flow"
integrator = "flowlab:euler"
label = "euler"
"""


def test_a_divergent_learning_rate_is_a_result_with_a_complete_report(tmp_path, capsys):
    """η = 1000 on a ReLU MLP (full batch, MSE): GD's loss overflows to inf after a few dozen
    steps.  `flowlab run` exits 0 with SGD ``diverged: non-finite loss at step k (t = 1000 k)``; the
    explicit-Euler gradient flow with dt = η (GD itself, on the clock's grid) blows up alone, with
    its own time; what was recorded before is kept; `flowlab report` exits 0, shows the statuses
    and writes its figures (loss, symmetry drift, theory)."""
    steps = 80
    study = tmp_path / "divergent.toml"
    study.write_text(DIVERGENT.format(steps=steps))
    out = tmp_path / "out"
    rc = main(["run", str(study), "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0, text
    ds = flowlab.open_result(out, load=True)
    status = dict(zip(ds.dynamics.values.tolist(), ds.status.values.tolist()))
    match = STATUS.fullmatch(status["sgd"])
    assert match, status
    k = int(match[1])
    assert 0 < k < steps and float(match[2]) == pytest.approx(1000.0 * k, rel=1e-12)
    assert status["sgd"] in text  # the table of `flowlab run` shows it
    # the flow stopped alone, on its own, saying when
    assert re.match(r"(blew up|diverged): .*t ?= ?[0-9.e+]+", status["euler"]), status["euler"]
    # SGD's rows: finite before k, its non-finite loss at k, nothing after
    sgd_loss = ds.loss.sel(dynamics="sgd").values
    at = int(np.flatnonzero(ds.step.values == k)[0])
    assert np.isfinite(sgd_loss[:at]).all() and not np.isfinite(sgd_loss[at]) and np.isnan(sgd_loss[at + 1:]).all()
    assert ds.step.values[0] == 0 and np.isfinite(ds.quantity.sel(dynamics="sgd").values[:at]).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == status

    rc = main(["report", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "diverged: non-finite loss at step" in text and "max |Q(t) − Q(0)|" in text
    wrote = re.findall(r"wrote (\S+\.png)", text)
    assert {Path(p).name for p in wrote} >= {"loss.png", "symmetry_drift.png", "symmetry_fig1.png", "theory_fig5.png"}
    for p in wrote:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p


class Poke(Recorder):
    """Makes replica / path ``which`` of the dynamics ``label`` non-finite at step ``step``: SGD's
    θ after update ``step`` (so its loss at step + 1 is non-finite), a flow's state as it is
    recorded at ``step`` (points hand recorders the live buffers)."""

    def __init__(self, label, which, step):
        self.label, self.which, self.step = label, which, step

    def after_update(self, info):
        if self.label == "sgd" and info.step == self.step:
            info.theta[self.which] = math.inf

    def record(self, rows, point):
        if point.label == self.label != "sgd" and point.step == self.step:
            point.theta[self.which] = math.inf


def _ensemble_study(**kw):
    return flowlab.parse_study(small_study(
        optimizer={"steps": 12, "batch_size": 20, "sampling": "with_replacement"},
        record={"every": 2, "projections": 2}, ensemble={"size": 3, "vectorise": False},
        flows=[{"name": "sme", "label": "sme"}, {"name": "gradient_flow", "integrator": "flowlab:rk4", "label": "gf"}],
        **kw))


def test_replicas_and_paths_of_an_ensemble_stop_alone(tmp_path):
    """A replica of SGD and a path of an SDE made non-finite stop alone: the status names them with
    the step and the time, their rows are NaN from there, and every other replica, path and
    dynamics is bitwise what the same run gives without them (the ensemble loops over its
    replicas: vectorise = false)."""
    study = _ensemble_study()
    ref = flowlab.run(study, tmp_path / "ref").load()
    ds = flowlab.run(study, tmp_path / "poked", recorders=[Poke("sgd", 1, 4), Poke("sme", 2, 6)]).load()
    status = dict(zip(ds.dynamics.values.tolist(), ds.status.values.tolist()))
    times = flowlab.build(study).times
    t5, t8 = float(times[5]), float(times[8])
    assert status["sgd"] == f"partly diverged: 1 of 3 replicas: 1 non-finite loss at step 5 (t = {t5:.6g})"
    # the path is found non-finite at the next recording step, 8
    assert status["sme"] == f"partly diverged: 1 of 3 paths: 2 non-finite state at step 8 (t = {t8:.6g})"
    assert status["gf"] == "ok"
    steps = ds.step.values.tolist()
    assert steps == list(range(0, 13, 2))  # a replica that stops adds no row
    loss = ds.loss
    assert np.isnan(loss.sel(dynamics="sgd", sample=1).values[steps.index(6):]).all()
    assert np.isnan(loss.sel(dynamics="sme", sample=2).values[steps.index(8):]).all()
    keep = {"sgd": [0, 2], "sme": [0, 1], "gf": [0, 1, 2]}
    for name in ("loss", "distance", "projection", "quantity", "theta"):
        for label, samples in keep.items():
            if name == "distance":  # against SGD's replica of the same sample: both must be alive
                samples = [s for s in samples if s in keep["sgd"]]
            got = ds[name].sel(dynamics=label, sample=samples)
            want = ref[name].sel(dynamics=label, sample=samples)
            np.testing.assert_array_equal(got.values, want.values, err_msg=f"{name} {label}")
    for label, s, k in (("sgd", 1, 4), ("sme", 2, 6)):  # rows before the poke are the reference's
        upto = steps.index(k) + 1
        np.testing.assert_array_equal(ds.loss.sel(dynamics=label, sample=s).values[:upto],
                                      ref.loss.sel(dynamics=label, sample=s).values[:upto])


def test_every_replica_diverged_is_a_diverged_run(tmp_path):
    """Full batch: every replica is the same run, so all diverge at the same step and the ensemble's
    SGD is ``diverged``, listing them."""
    raw = small_study(model={"name": "mlp", "widths": [8], "activation": "relu"}, loss={"name": "mse"},
                      data={"name": "digits", "n": 100}, optimizer={"lr": 1000.0, "steps": 80, "batch_size": None},
                      record={"every": 10, "projections": 2}, ensemble={"size": 2}, symmetry={"enabled": False})
    ds = flowlab.run(flowlab.parse_study(raw), tmp_path / "o").load()
    status = str(ds.status.values[0])
    match = re.fullmatch(r"diverged: non-finite loss in every replica, the last at step (\d+) \(t = (\S+)\); "
                         r"replicas: 0 non-finite loss at step (\d+) \(t = \S+\), 1 non-finite loss at step (\d+) "
                         r"\(t = \S+\)", status)
    assert match, status
    k = int(match[1])
    assert int(match[3]) == int(match[4]) == k and ds.step.values[-1] == k


# --------------------------------------------------------------------------- flushes

def test_flush_seconds_is_validated():
    for bad in (0, -1.0, "soon", float("nan"), True):
        with pytest.raises(ConfigError, match=r"^record\.flush_seconds = .*expected a number > 0"):
            flowlab.parse_study(small_study(record={"flush_seconds": bad}))
    assert flowlab.parse_study(small_study()).record.flush_seconds == 60.0


KILLED = textwrap.dedent('''
    import sys, time, pathlib
    import flowlab
    import flowlab.runner
    from flowlab.recording import Recorder

    writers = []

    class Writer(flowlab.runner.TrajectoryWriter):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            writers.append(self)

    class Hang(Recorder):
        """Once rows are on disk (the time flush: chunks are far larger than the run so far), wait
        for the writer to finish, say so, and hang until killed."""

        def after_update(self, info):
            w = writers[0]
            if w.rows_written["time"] > 0:
                w.wait()
                pathlib.Path(sys.argv[2]).write_text(str(w.rows_written["time"]))
                time.sleep(3600)

    flowlab.runner.TrajectoryWriter = Writer
    study = flowlab.load_study(sys.argv[1])
    flowlab.run(study, sys.argv[3], recorders=[Hang()])
''')


def test_a_killed_run_leaves_rows_flushed_by_time(tmp_path):
    """``[record] flush_seconds`` small, chunks far larger than the run can fill: the only way rows
    reach the store is the time bound.  Once they are there the run hangs and is killed with
    SIGKILL; the store opens with flowlab.open_result, holds those rows — equal to an uninterrupted
    run's first rows — and the statuses of the last flush (``running``); `flowlab report` on it
    exits 0."""
    study = tmp_path / "s.toml"
    study.write_text(small_toml("killed", steps=100000) + "[record]\nchunk = 100000\nflush_seconds = 0.5\n")
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    ready, out = tmp_path / "ready", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(study), str(ready), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), (proc.poll(), proc.stdout.read().decode() if proc.poll() is not None else "")
        n = int(ready.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    ds = flowlab.open_result(out, load=True)
    assert ds.sizes["time"] == n > 0 and ds.step.values.tolist() == list(range(n))
    assert ds.status.values.tolist() == ["running"]
    assert ds.sizes["snapshot"] >= 1 and int(ds.snapshot_step.values[0]) == 0  # θ0 was flushed with them
    raw = flowlab.load_study(study).with_overrides([f"optimizer.steps={n - 1}"])
    full = flowlab.run(raw, tmp_path / "full", progress=False).load()
    for name in ("loss", "distance", "projection", "quantity"):
        np.testing.assert_array_equal(ds[name].values, full[name].values, err_msg=name)
    assert main(["report", str(out), "--no-figures"]) == 0


# -------------------------------------------------------------------------- progress

def test_progress_in_a_log_is_plain_lines(tmp_path):
    """`flowlab run` with stderr to a file (not a terminal): plain progress lines — step, t, loss,
    each dynamics' status, elapsed, ETA — and no bar; the interval from $FLOWLAB_PROGRESS_SECONDS."""
    study = tmp_path / "s.toml"
    study.write_text(small_toml("logged", steps=30) + textwrap.dedent("""
        [[flows]]
        name = "gradient_flow"
        integrator = "flowlab:rk4"
        dt = 0.05
        label = "gf"
    """))
    log = tmp_path / "run.log"
    env = {**os.environ, "FLOWLAB_PROGRESS_SECONDS": "1e-9"}
    with open(log, "w") as err:
        rc = subprocess.run([sys.executable, "-m", "flowlab", "run", str(study), "--out", str(tmp_path / "o")],
                            stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=600).returncode
    text = log.read_text()
    assert rc == 0, text
    lines = [ln for ln in text.splitlines() if ln.startswith("flowlab logged: ")]
    assert len(lines) == 31, text  # one per step (the interval is ~0) and the last one again at the end
    pattern = (r"flowlab logged: step (\d+)/30 \(\d+%\); t = (\S+); loss (\S+); sgd (running|ok), gf (running|ok); "
               r"elapsed \d+:\d\d:\d\d(; ETA \d+:\d\d:\d\d)?")
    steps = []
    for ln in lines:
        m = re.fullmatch(pattern, ln)
        assert m, ln
        steps.append(int(m[1]))
        assert float(m[2]) == pytest.approx(0.1 * int(m[1]), rel=1e-12) and math.isfinite(float(m[3]))
    assert steps == list(range(1, 31)) + [30]
    assert all("; ETA " in ln for ln in lines[:29])  # while steps remain
    assert "ETA" not in lines[-1] and "sgd ok, gf ok" in lines[-1]  # the end: every dynamics' final status
    assert "\x1b[" not in text and "━" not in text  # no terminal codes, no bar


def test_a_bad_progress_interval_is_one_line(tmp_path, capsys, monkeypatch):
    study = tmp_path / "s.toml"
    study.write_text(small_toml("x", steps=2))
    monkeypatch.setenv("FLOWLAB_PROGRESS_SECONDS", "often")
    assert main(["run", str(study), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("flowlab: error: FLOWLAB_PROGRESS_SECONDS = 'often': expected a number of seconds > 0"), err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------- determinism

DETERMINISM = textwrap.dedent("""
    [study]
    name = "same"
    seed = 7
    dtype = "float64"
    device = "cpu"
    [model]
    name = "mlp"
    widths = [8]
    activation = "relu"
    [data]
    name = "digits"
    n = 100
    [optimizer]
    lr = 0.1
    momentum = 0.5
    steps = 8
    batch_size = 20
    sampling = "with_replacement"
    [record]
    every = 2
    snapshot_every = 4
    projections = 3
    [ensemble]
    size = 3
    [[flows]]
    name = "momentum_second_order"
    integrator = "flowlab:rk4"
    label = "hb"
    [[flows]]
    name = "sme_momentum"
    label = "smom"
""")

RUN_ONCE = textwrap.dedent('''
    import sys
    import flowlab
    flowlab.run(sys.argv[1], sys.argv[2])
''')


def _comparable(ds):
    ds = ds.drop_vars("wall_seconds")
    ds.attrs = {k: v for k, v in ds.attrs.items() if k != "created"}
    return ds


def test_the_same_study_gives_the_same_numbers_and_records_its_seeds(tmp_path):
    """SGD with momentum, a flow, an SDE flow and an ensemble of 3: a run in this process (after
    drawing from every global generator, and leaving them as they were) and a run in a fresh
    interpreter are identical, every variable bitwise; the ``seeds`` attribute holds every seed
    derived from study.seed; another study.seed changes the numbers."""
    from flowlab.seeds import derive_seed

    study = tmp_path / "same.toml"
    study.write_text(DETERMINISM)
    script = tmp_path / "once.py"
    script.write_text(RUN_ONCE)
    subprocess.run([sys.executable, str(script), str(study), str(tmp_path / "fresh")], check=True, timeout=600,
                   env={**os.environ, "PYTHONHASHSEED": "random"})
    import random

    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(5)
    torch.randn(3), np.random.rand(2), random.random()  # the generators' states are not their seeds'
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    here = flowlab.run(study, tmp_path / "here").load()
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    fresh = flowlab.open_result(tmp_path / "fresh", load=True)
    assert here.status.values.tolist() == ["ok"] * 3
    xr.testing.assert_identical(_comparable(here), _comparable(fresh))  # values compared with ==: bitwise
    for name, var in _comparable(here).data_vars.items():
        if var.dtype.kind == "f":  # and bit for bit, NaNs included
            assert var.values.tobytes() == fresh[name].values.tobytes(), name

    seeds = json.loads(here.attrs["seeds"])
    assert seeds == {
        "study": 7, "model_init": 7, "data": 7, "data_subset": 0, "global": derive_seed(7, "global"),
        "sgd": [derive_seed(7, "sgd", s) for s in range(3)], "sgd_streams": "replica", "smom": derive_seed(7, "smom"),
        "projections": 7 + 7919, "noise_split": derive_seed(7, "noise-split")}
    assert seeds["sgd"][0] == 7 and len(set(seeds["sgd"])) == 3

    other = flowlab.run(flowlab.load_study(study, ["study.seed=8"]), tmp_path / "other").load()
    for label in ("sgd", "smom"):
        assert not np.array_equal(other.loss.sel(dynamics=label).values, here.loss.sel(dynamics=label).values)
