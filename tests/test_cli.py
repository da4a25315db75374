"""The command line: run (progress, table), list, export."""

import numpy as np
from conftest import ROOT

import flowlab
from flowlab.cli import main


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
    # a second run into the same folder is refused, then allowed with --overwrite
    rc = main(["run", str(ROOT / "studies" / "quickstart.toml"), "--out", str(out), "--quiet",
               "--set", "optimizer.steps=2"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_list_shows_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("models:", "datasets:", "losses:", "mlp", "vgg16", "digits", "mnist1d", "image_folder", "npz",
                 "cross_entropy", "mse"):
        assert word in text


def test_export_of_a_missing_result(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), "--netcdf", str(tmp_path / "x.nc")]) == 2
    assert "no trajectory.zarr" in capsys.readouterr().err
