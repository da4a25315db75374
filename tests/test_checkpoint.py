"""Checkpoint and resume (issue 13 item 1): a run stopped anywhere — SIGTERM at a safe point,
SIGKILL at a random update, in the middle of a store flush, in the middle of a flow's integration
interval — and resumed with ``flowlab run STUDY --resume`` gives the Dataset of the uninterrupted
run, bitwise (CPU, float64), every variable but the timings.

The study (tests/data/resume_study.toml) has SGD with momentum, weight decay and minibatches, an
adaptive torchdiffeq flow (dopri5), a diffrax flow (Tsit5), a fixed-step second-order flow, an SDE
(sme, Euler–Maruyama), symmetry, theory and noise-split recording, rows flushed every 3 records
and a checkpoint every 4 updates; the ensemble variant runs K = 3 replicas of SGD and of the SDE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT

import flowlab
from flowlab.checkpoint import NAME
from flowlab.cli import main
from flowlab.recording import Recorder

STUDY = ROOT / "tests" / "data" / "resume_study.toml"
TIMINGS = ("wall_seconds", "compile_seconds")


def assert_identical(a, b) -> None:
    assert list(a.data_vars) == list(b.data_vars)
    assert a.sizes == b.sizes
    for name in a.data_vars:
        if name in TIMINGS:
            continue
        x, y = a[name].values, b[name].values
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), (name, np.nanmax(np.abs(x - y)))
        else:
            assert np.array_equal(x, y), name
    for c in ("time", "step", "snapshot_step"):
        np.testing.assert_array_equal(a[c].values, b[c].values)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    runs = {}
    for name, sets in (("single", []), ("ensemble", ["ensemble.size=3"])):
        study = flowlab.load_study(STUDY, sets)
        runs[name] = flowlab.run(study, out=out / name, overwrite=True).load()
        assert runs[name].status.values.tolist() == ["ok"] * runs[name].sizes["dynamics"]
        assert not (out / name / NAME).exists()  # a finished run removes its checkpoint
    return runs


class _Term(Recorder):
    """Sends this process SIGTERM right after update ``at`` − 1."""

    def __init__(self, at: int):
        self.at = at

    def after_update(self, info) -> None:
        if info.step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("kind,at", [("single", 3), pytest.param("single", 17, marks=pytest.mark.slow),
                                     ("ensemble", 9)])
def test_sigterm_stops_at_a_safe_point_and_resume_is_bitwise(tmp_path, reference, kind, at):
    sets = ["ensemble.size=3"] if kind == "ensemble" else []
    study = flowlab.load_study(STUDY, sets)
    with pytest.raises(KeyboardInterrupt) as info:
        flowlab.run(study, out=tmp_path, overwrite=True, recorders=[_Term(at)])
    assert info.value.step == at and info.value.checkpointed
    partial = flowlab.open_result(tmp_path, load=True)
    assert all(s.startswith("interrupted") for s in partial.status.values)
    assert (tmp_path / NAME).exists()
    resumed = flowlab.run(study, out=tmp_path, resume=True).load()
    assert_identical(reference[kind], resumed)
    assert not (tmp_path / NAME).exists()


# ------------------------------------------------------------------ SIGKILL in a subprocess

KILLER = textwrap.dedent('''
    import os, signal, sys
    import flowlab
    where, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    count = [0]

    def bump():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if where == "update":  # between two updates
        from flowlab.sgd import DiscreteSGD
        orig = DiscreteSGD.update
        def update(self):
            orig(self)
            bump()
        DiscreteSGD.update = update
    elif where == "flush":  # inside a store append: time written, the variables not yet
        import flowlab.store as S
        def _append(self, dim, arrays, steps, times):
            step_name = "step" if dim == "time" else "snapshot_step"
            self.group[dim].append(times, axis=0)
            bump()
            self.group[step_name].append(steps, axis=0)
            for name, values in arrays.items():
                self.group[name].append(values, axis=self.variables[name].axis)
            self.rows_written[dim] += len(times)
        S.TrajectoryWriter._append = _append
    elif where == "integration":  # inside an adaptive torchdiffeq interval
        from flowlab.flows import integrators as I
        orig_call = I._Field.__call__
        def call(self, t, y):
            bump()
            return orig_call(self, t, y)
        I._Field.__call__ = call
    flowlab.run(flowlab.load_study(sys.argv[4], sys.argv[5:]), out=out, overwrite=True)
    print("finished without being killed")
''')


def _killed_then_resumed(tmp_path, where: str, n: int, sets: tuple[str, ...] = ()):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), where, str(n), str(out), str(STUDY), *sets], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert (out / NAME).exists()
    rc = main(["run", str(STUDY), "--out", str(out), "--resume", "--quiet", *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    return flowlab.open_result(out, load=True)


def test_sigkill_in_the_middle_of_a_store_flush(tmp_path, reference):
    # the 5th append: past the first checkpoint (update 4), with rows after it on disk
    assert_identical(reference["single"], _killed_then_resumed(tmp_path, "flush", 5))


@pytest.mark.slow
@pytest.mark.parametrize("where,seed,kind", [("update", 0, "single"), ("update", 1, "single"), ("flush", 2, "single"),
                                             ("integration", 3, "single"), ("integration", 4, "single"),
                                             ("update", 5, "ensemble"), ("flush", 6, "ensemble")])
def test_sigkill_at_random_points(tmp_path, reference, where, seed, kind):
    """Kill points drawn at random (seeded): an update in 5..23, an append in 3..12, a vector-field
    evaluation of the dopri5 flow in 30..78 (it takes 80 in all, 26 before the first checkpoint)."""
    rng = np.random.default_rng(seed)
    n = int({"update": rng.integers(5, 24), "flush": rng.integers(3, 13),
             "integration": rng.integers(30, 79)}[where])
    sets = ("ensemble.size=3",) if kind == "ensemble" else ()
    assert_identical(reference[kind], _killed_then_resumed(tmp_path, where, n, sets))


# ------------------------------------------------------------------ bad input


def test_resume_refuses_another_study_and_bad_checkpoints(tmp_path, capsys):
    study = flowlab.load_study(STUDY, ["optimizer.steps=8"])
    with pytest.raises(KeyboardInterrupt):
        flowlab.run(study, out=tmp_path, overwrite=True, recorders=[_Term(5)])
    capsys.readouterr()
    # another learning rate: one line naming the first differing key
    rc = main(["run", str(STUDY), "--out", str(tmp_path), "--resume", "--quiet", "--set", "optimizer.steps=8",
               "--set", "optimizer.lr=0.2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "optimizer.lr" in err and "0.2" in err, err
    # the checkpoint's own frequency may change
    rc = main(["run", str(STUDY), "--out", str(tmp_path), "--resume", "--quiet", "--set", "optimizer.steps=8",
               "--set", "checkpoint.every=2"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    # nothing to resume, --resume with --overwrite, a truncated and a foreign checkpoint file
    rc = main(["run", str(STUDY), "--out", str(tmp_path / "none"), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not found" in err and len(err.splitlines()) == 1
    rc = main(["run", str(STUDY), "--out", str(tmp_path), "--resume", "--overwrite", "--quiet"])
    assert rc == 2 and "give one" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        flowlab.run(study, out=tmp_path, overwrite=True, recorders=[_Term(5)])
    capsys.readouterr()
    data = (tmp_path / NAME).read_bytes()
    (tmp_path / NAME).write_bytes(data[: len(data) // 2])
    rc = main(["run", str(STUDY), "--out", str(tmp_path), "--resume", "--quiet", "--set", "optimizer.steps=8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unreadable" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    (tmp_path / NAME).write_bytes(b"not a checkpoint")
    rc = main(["run", str(STUDY), "--out", str(tmp_path), "--resume", "--quiet", "--set", "optimizer.steps=8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "checkpoint" in err and len(err.splitlines()) == 1


def test_checkpoint_files_hold_no_pickled_objects(tmp_path):
    """The checkpoint loads with ``weights_only=True`` (tensors and plain containers only)."""
    import torch

    study = flowlab.load_study(STUDY, ["optimizer.steps=8"])
    with pytest.raises(KeyboardInterrupt):
        flowlab.run(study, out=tmp_path, overwrite=True, recorders=[_Term(5)])
    payload = torch.load(tmp_path / NAME, weights_only=True)
    assert payload["next_step"] == 5 and payload["store"]["time"] == 3  # rows 0, 2, 4
    assert len(payload["followers"]) == 4


def test_an_unfinished_sweep_point_continues_from_its_checkpoint(tmp_path, reference, monkeypatch):
    """``flowlab sweep --resume`` / a rescheduled task: a point folder with a checkpoint and no
    point.json continues from the checkpoint (the run is not restarted: fewer updates are taken)."""
    import json

    from flowlab.sgd import DiscreteSGD
    from flowlab.sweep.runner import POINT_FILE, run_point

    study = flowlab.load_study(STUDY)
    out = tmp_path / "p0000"
    with pytest.raises(KeyboardInterrupt):
        flowlab.run(study, out=out, overwrite=True, recorders=[_Term(13)])
    updates = []
    orig = DiscreteSGD.update
    monkeypatch.setattr(DiscreteSGD, "update", lambda self: (updates.append(self.step), orig(self))[1])
    info = run_point(json.dumps(study.to_dict()), str(STUDY), str(out))
    assert info["status"] == "ok" and json.loads((out / POINT_FILE).read_text())["status"] == "ok"
    assert updates[0] == 13 and len(updates) == study.optimizer.steps - 13
    assert_identical(reference["single"], flowlab.open_result(out, load=True))


def test_disk_full_and_unwritable_output_say_one_line_and_keep_the_checkpoint(tmp_path, reference, capsys,
                                                                              monkeypatch):
    """A store write failing with ENOSPC mid-run: one line (exit 2), the checkpoint before it intact;
    once there is room, --resume completes the run bitwise."""
    import errno

    from flowlab.store import TrajectoryWriter

    out = tmp_path / "run"
    calls = [0]
    orig = TrajectoryWriter._append

    def full(self, *a, **kw):
        calls[0] += 1
        if calls[0] > 4:  # a few flushes in: past the first checkpoints
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, *a, **kw)

    monkeypatch.setattr(TrajectoryWriter, "_append", full)
    rc = main(["run", str(STUDY), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "No space left on device" in err and "--resume" in err, err
    assert (out / NAME).exists()
    monkeypatch.setattr(TrajectoryWriter, "_append", orig)
    assert main(["run", str(STUDY), "--out", str(out), "--quiet", "--resume"]) == 0
    capsys.readouterr()
    assert_identical(reference["single"], flowlab.open_result(out, load=True))
    # an output folder that cannot be made (a file in its way): one line
    (tmp_path / "file").write_text("x")
    rc = main(["run", str(STUDY), "--out", str(tmp_path / "file" / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--out" in err and "no folder can be made" in err, err
