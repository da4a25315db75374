"""The command line: run (progress, table), list, export; overwrite, interruption (exit 130), --debug,
the default output folder, help and usage errors."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, small_toml

import flowlab
from flowlab.cli import main
from flowlab.parts import default_parts


def test_run_quickstart_then_export(tmp_path, capsys):
    out = tmp_path / "qs"
    rc = main(["run", str(ROOT / "studies" / "quickstart.toml"), "--out", str(out), "--quiet",
               "--set", "optimizer.steps=20", "--set", "record.every=4"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "sgd" in text and "ok" in text and "trajectory.zarr" in text
    ds = flowlab.open_result(out)
    assert ds.step.values.tolist() == [0, 4, 8, 12, 16, 20]
    assert ds.dynamics.values[0] == "sgd"
    rc = main(["export", str(out), "--netcdf", str(tmp_path / "qs.nc")])
    assert rc == 0 and (tmp_path / "qs.nc").exists()
    back = flowlab.open_result(tmp_path / "qs.nc")
    np.testing.assert_array_equal(back.loss.values, ds.loss.values)
    # a second run into the same folder is refused (one line, exit 2) and leaves the result alone ...
    again = ["run", str(ROOT / "studies" / "quickstart.toml"), "--out", str(out), "--quiet", "--set", "optimizer.steps=2"]
    rc = main(again)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--overwrite" in err and len(err.splitlines()) == 1
    assert flowlab.open_result(out).step.values.tolist() == [0, 4, 8, 12, 16, 20]
    # ... then allowed with --overwrite: the folder holds the new run only
    assert main([*again, "--overwrite"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    new = flowlab.open_result(out, load=True)
    assert new.step.values.tolist() == [0, 1, 2] and new.snapshot_step.values.tolist() == [0, 2]
    assert json.loads(new.attrs["study"])["optimizer"]["steps"] == 2
    assert new.status.values.tolist() == ["ok"] * len(ds.dynamics)
    np.testing.assert_array_equal(new.loss.values[0, :1], back.loss.values[0, :1])  # same θ0, same first batch
    assert flowlab.open_result(tmp_path / "qs.nc").sizes["time"] == 6  # the export is a separate file


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("models:", "datasets:", "losses:", "mlp", "vgg16", "digits", "mnist1d", "image_folder", "npz",
                 "cross_entropy", "mse"):
        assert word in text


def test_export_of_a_missing_result(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--netcdf", str(tmp_path / "x.nc")]) == 2
    assert "no trajectory.zarr" in capsys.readouterr().err


SMALL_EXTRA = """
[record]
chunk = 4
snapshot_every = 3
[[flows]]
name = "gradient_flow"
integrator = "flowlab:rk4"
dt = 0.05
label = "gf"
"""


def _study(folder, name="small", steps=12):
    path = folder / f"{name}.toml"
    path.write_text(small_toml(name, steps) + SMALL_EXTRA)
    return path


class SigintBefore(flowlab.Recorder):
    """Sends this process a real SIGINT (Ctrl-C) just before update k: Python raises KeyboardInterrupt
    in the main thread at the next bytecode, still inside this hook, so the interruption is at step k."""

    def __init__(self, k):
        self.k = k

    def before_update(self, info):
        if info.step == self.k:
            signal.raise_signal(signal.SIGINT)


def test_interrupted_run_exits_130_and_keeps_the_data(tmp_path, capsys):
    """Ctrl-C during `flowlab run`: the run stops at the next safe point (after update k), writes a
    checkpoint, exits 130 saying where the data are and the command that resumes; every dynamics
    ``interrupted at step k``; the rows recorded so far readable (equal to an uninterrupted run's),
    and the resumed run equal to the uninterrupted one."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C raises KeyboardInterrupt
    k, path = 5, _study(tmp_path)
    stop = flowlab.Part(name="stop", setup=lambda setup: flowlab.Contribution(recorders=[SigintBefore(k)]))
    out = tmp_path / "cut"
    try:
        rc = main(["run", str(path), "--out", str(out), "--quiet"], parts=default_parts().with_parts(stop))
    except KeyboardInterrupt:
        pytest.fail("flowlab run let the KeyboardInterrupt through")
    captured = capsys.readouterr()
    assert rc == 130, captured.err
    lines = captured.err.strip().splitlines()
    assert lines[-2] == f"flowlab: stopped before update {k + 1}; rows so far and a checkpoint are in {out}."
    assert lines[-1] == f"Resume with: flowlab run {path} --out {out} --resume"
    cut = flowlab.open_result(out, load=True)
    assert cut.status.values.tolist() == [f"interrupted at step {k}"] * 2
    assert json.loads((out / "summary.json").read_text())["status"] == {"sgd": f"interrupted at step {k}",
                                                                          "gf": f"interrupted at step {k}"}
    assert cut.step.values.tolist() == list(range(k + 1))  # row k (θ_k, before update k) was recorded
    assert cut.snapshot_step.values.tolist() == [0, 3]
    assert int(cut.n_grad_evals.values[0]) == k + 1
    assert main(["run", str(path), "--out", str(tmp_path / "full"), "--quiet"]) == 0
    full = flowlab.open_result(tmp_path / "full", load=True)
    for name, var in cut.data_vars.items():
        if "time" in var.dims:
            np.testing.assert_array_equal(var.values, full[name].isel(time=slice(0, k + 1)).values, err_msg=name)
    np.testing.assert_array_equal(cut.theta.values, full.theta.isel(snapshot=slice(0, 2)).values)
    assert main(["run", str(path), "--out", str(out), "--resume", "--quiet"]) == 0
    capsys.readouterr()
    resumed = flowlab.open_result(out, load=True)
    for name, var in full.data_vars.items():
        if name not in ("wall_seconds", "compile_seconds"):
            np.testing.assert_array_equal(var.values, resumed[name].values, err_msg=name)


def test_debug_shows_the_traceback(tmp_path, capsys):
    """Bad input: one line and exit 2; with `flowlab --debug` the exception itself (its traceback)."""
    path = tmp_path / "bad.toml"
    path.write_text(_study(tmp_path).read_text().replace("lr = 0.1", "lr = -0.1"))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flowlab: error: optimizer.lr = -0.1: expected a number > 0"
    with pytest.raises(flowlab.ConfigError, match=r"^optimizer\.lr = -0\.1: expected a number > 0$"):
        main(["--debug", "run", str(path), "--out", str(tmp_path / "o"), "--quiet"])
    assert capsys.readouterr().err == ""  # the exception is raised, not printed as a line


def test_default_output_folder(tmp_path, monkeypatch, capsys):
    """Without --out: [study] out, else runs/<name>, both relative to the working directory (not to
    the study file); --out wins over both."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    _study(tmp_path / "cfg", name="dflt", steps=2)
    assert main(["run", "cfg/dflt.toml", "--quiet"]) == 0
    assert f"written to {Path('runs') / 'dflt'}/trajectory.zarr" in capsys.readouterr().out
    assert flowlab.open_result(tmp_path / "runs" / "dflt").step.values.tolist() == [0, 1, 2]
    assert not (tmp_path / "cfg" / "runs").exists()
    assert main(["run", "cfg/dflt.toml", "--quiet", "--set", "study.out=elsewhere/x"]) == 0
    assert (tmp_path / "elsewhere" / "x" / "trajectory.zarr").is_dir()
    assert main(["run", "cfg/dflt.toml", "--quiet", "--set", "study.out=elsewhere/y", "--out", "given"]) == 0
    assert (tmp_path / "given" / "trajectory.zarr").is_dir() and not (tmp_path / "elsewhere" / "y").exists()
    capsys.readouterr()
    flowlab.run(flowlab.load_study("cfg/dflt.toml", ['study.name="api"']))  # the Python API: the same default
    assert (tmp_path / "runs" / "api" / "trajectory.zarr").is_dir()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["api", "dflt"]


def test_help_and_usage_errors(capsys):
    """`flowlab --help` lists every command; a usage error is one line on stderr that points to the
    help, exit 2; a bare `flowlab` prints the help and exits 2."""
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: flowlab [-h] [--debug] COMMAND ...")
    for name, cmd in default_parts().commands.items():
        assert f"    {name}" in text and cmd.help.split()[0] in text
    assert main([]) == 2
    assert capsys.readouterr().out == text
    for argv, hint in ((["bogus"], "see flowlab --help"), (["run"], "see flowlab run --help"),
                       (["export"], "see flowlab export --help"), (["run", "s.toml", "--bogus"], "see flowlab run --help"),
                       (["--bogus", "list"], "see flowlab --help")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("flowlab: error: ") and err.endswith(f"({hint})"), err
        if argv == ["bogus"]:
            assert "invalid choice: 'bogus' (choose from 'run', 'list', 'export', 'report'" in err
