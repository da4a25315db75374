"""Validation everywhere (issue 13, item 3): every bad input the user can hand over — study values and
files, builder options, data files, result stores, sweep folders, command-line arguments — gives exit
status 2 and ONE line naming the field, the value and what is allowed; never a traceback.  A partial
store (a run still going, or killed) is reported; nothing is unpickled from a user's file; a hypothesis
fuzz of study files finds nothing but FlowlabError.

(tests/test_config.py covers the study sections' keys and values one by one; the cases here are the
other inputs.)"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, small_study, small_toml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowlab
from flowlab.cli import main
from flowlab.errors import FlowlabError
from flowlab.parts import default_parts

BASE = small_toml("v", 4)


def _study(tmp_path: Path, text: str = "", base: str = BASE, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(base + text)
    return path


def _set(base: str, old: str, new: str) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


def _data(tmp_path: Path, table: str) -> Path:
    """The base study with its [data] table replaced."""
    return _study(tmp_path, base=_set(BASE, '[data]\nname = "digits"\nn = 100', "[data]\n" + table))


class Unpickled:
    """Unpickling this creates the file ``path``: the proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> Path:
    """A finished run (6 steps, chunks of 2 rows) to copy and damage."""
    folder = tmp_path_factory.mktemp("result")
    study = folder / "r.toml"
    study.write_text(small_toml("r", 6) + "[record]\nchunk = 2\nprojections = 2\n[[flows]]\nname = \"gradient_flow\"\n"
                     "integrator = \"flowlab:rk4\"\ndt = 0.05\nlabel = \"gf\"\n")
    assert main(["run", str(study), "--out", str(folder / "out"), "--quiet"]) == 0
    return folder / "out"


def _copy(result: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(result, out)
    return out


def _arrays(store: Path):
    for meta in sorted(store.glob("*/.zarray")):
        dims = json.loads((meta.parent / ".zattrs").read_text())["_ARRAY_DIMENSIONS"]
        yield meta, dims


def _shrink(out: Path, rows: int, names: tuple[str, ...] | None = None, status: str | None = None) -> None:
    """Make ``out`` look like a run stopped early: arrays along ``time`` cut to ``rows`` (only
    ``names`` when given: stopped between two arrays' appends), no consolidated metadata, every
    status ``status``."""
    z = out / "trajectory.zarr"
    (z / ".zmetadata").unlink()
    for meta, dims in _arrays(z):
        if "time" in dims and (names is None or meta.parent.name in names):
            info = json.loads(meta.read_text())
            info["shape"][dims.index("time")] = rows
            meta.write_text(json.dumps(info))
    if status is not None:
        import zarr

        g = zarr.open_group(str(z), mode="r+", zarr_format=2)
        g["status"][...] = np.array([status] * g["status"].shape[0], dtype=g["status"].dtype)


# ----------------------------------------------------------------- the bad inputs
def _npz(tmp_path: Path, **arrays) -> str:
    np.savez(tmp_path / "d.npz", **arrays)
    return f'name = "npz"\npath = "{tmp_path / "d.npz"}"'


def _image_folder(tmp_path: Path) -> str:
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return f'name = "image_folder"\nroot = "{tmp_path / "imgs"}"'


def _foreign_zarr(tmp_path: Path) -> Path:
    import xarray as xr

    xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(tmp_path / "other.zarr", zarr_format=2)
    return tmp_path / "other.zarr"


def _garbage(path: Path, text: str = "garbage") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sweep_folder(tmp_path: Path, manifest: str) -> Path:
    _garbage(tmp_path / "sw" / "sweep.json", manifest)
    return tmp_path / "sw"


def _run(*args) -> list[str]:
    return ["run", *map(str, args), "--quiet"]


#: id -> (tmp_path, result) -> (argv, the words the one line must hold)
CASES = {
    # the study file itself
    "study is a folder": lambda t, r: (_run(t), [f"study file = '{t}': is a folder"]),
    "study is not UTF-8": lambda t, r: (_run(_bytes(t / "s.toml", b"[study]\nname = '\xff'\n")),
                                        [f"study file = '{t / 's.toml'}': is not a UTF-8 text file"]),
    "study declares a table twice": lambda t, r: (_run(_study(t, "[optimizer]\nlr = 0.2\n")),
                                                  ["is not valid TOML: Cannot declare ('optimizer',) twice"]),
    # study values the section checks bound
    "study.name is a path": lambda t, r: (_run(_study(t, base=_set(BASE, 'name = "v"', 'name = "../elsewhere"'))),
                                          ["study.name = '../elsewhere': expected a name without '/'"]),
    "study.seed beyond 32 bits": lambda t, r: (_run(_study(t), "--set", "study.seed=1099511627776"),
                                               ["study.seed = 1099511627776: expected at most 4,294,967,295"]),
    "optimizer.steps absurd": lambda t, r: (_run(_study(t), "--set", "optimizer.steps=1000000000000"),
                                            ["optimizer.steps = 1000000000000: expected at most 100,000,000"]),
    "record.chunk absurd": lambda t, r: (_run(_study(t), "--set", "record.chunk=1000000000"),
                                         ["record.chunk = 1000000000: expected at most 1,000,000"]),
    "record.projections absurd": lambda t, r: (_run(_study(t), "--set", "record.projections=1000000"),
                                               ["record.projections = 1000000: expected at most 10,000"]),
    "study.device no such GPU": lambda t, r: (_run(_study(t), "--set", 'study.device="cuda:7"'),
                                              ["study.device = 'cuda:7': "]),
    "theory.variants not a list": lambda t, r: (_run(_study(t, "[theory]\nvariants = 5\n")),
                                                ["theory.variants = 5: expected a list of: conservation"]),
    # builder options, checked against the builders' annotations (where the builder takes the value
    # silently, or fails in a way of its own)
    "model.widths a string": lambda t, r: (_run(_study(t), "--set", 'model.widths="64"'),
                                           ["model.widths = '64': expected a list"]),
    "model.batchnorm a word": lambda t, r: (_run(_study(t), "--set", 'model.batchnorm="yes"'),
                                            ["model.batchnorm = 'yes': expected true or false"]),
    "data.image not a boolean": lambda t, r: (_run(_study(t), "--set", 'data.image="yes"'),
                                              ["data.image = 'yes': expected true or false"]),
    "model.in_features fractional": lambda t, r: (_run(_study(t), "--set", "model.in_features=64.0"),
                                                  ["model.in_features = 64.0: expected an integer"]),
    "schedule.gamma a word": lambda t, r: (_run(_study(t, "[optimizer.schedule]\nname = \"step\"\ngamma = \"slow\"\n")),
                                           ["optimizer.schedule.gamma = 'slow': expected a number"]),
    "flows.0.fd_step a word": lambda t, r: (_run(_study(t, '[[flows]]\nname = "modified_loss"\nfd_step = "small"\n')),
                                            ["flows.0.fd_step = 'small': expected a number"]),
    "teacher_student n < 0": lambda t, r: (_run(_data(t, 'name = "teacher_student"\nn = -4\nclassify = true\n'
                                                         'outputs = 3')),
                                           ["data.n = -4: expected a positive integer"]),
    "data function returns a string": lambda t, r: (_run(_data(t, 'name = "os:getcwd"')),
                                                    ["data.name = 'os:getcwd': a data function must return (X, y) or "
                                                     "a torch Dataset, not str"]),
    # data files
    "npz not a zip": lambda t, r: (_run(_data(t, f'name = "npz"\npath = "{_garbage(t / "d.npz")}"')),
                                   [f"data.path = '{t / 'd.npz'}': not a readable .npz file"]),
    "npz without the array": lambda t, r: (_run(_data(t, _npz(t, x=np.zeros((4, 64)), y=np.zeros(4, int)) + '\nx = "X"')),
                                           ["data.x = 'X': not an array in d.npz; arrays there: x, y"]),
    "npz lengths differ": lambda t, r: (_run(_data(t, _npz(t, x=np.zeros((10, 64)), y=np.zeros(9, int)))),
                                        ["data.y = 'y': d.npz has 10 examples in 'x' but 9 in 'y'"]),
    "npz of strings": lambda t, r: (_run(_data(t, _npz(t, x=np.array(["a"] * 10), y=np.zeros(10, int)))),
                                    ["data.x = 'x': array 'x' in d.npz holds <U1 values: expected numbers"]),
    "npz of a scalar": lambda t, r: (_run(_data(t, _npz(t, x=np.float64(3.0), y=np.zeros(10, int)))),
                                     ["data.x = 'x': array 'x' in d.npz has shape ()"]),
    "npz with a NaN": lambda t, r: (_run(_data(t, _npz(t, x=np.where(np.arange(640).reshape(10, 64) == 200, np.nan, 1.0),
                                                       y=np.arange(10) % 3)), "--set", "optimizer.batch_size=5"),
                                    ["data.name = 'npz': its inputs hold NaN or inf (first at example 3)"]),
    "image folder with a broken image": lambda t, r: (_run(_data(t, _image_folder(t))),
                                                      [f"data.root = '{t / 'imgs' / 'cat' / 'a.png'}': not a readable "
                                                       "image"]),
    # the output folder
    "--out is a file": lambda t, r: (_run(_study(t), "--out", _garbage(t / "f")),
                                     [f"--out = '{t / 'f'}': is a file; the output is a folder"]),
    "--out under a file": lambda t, r: (_run(_study(t), "--out", _garbage(t / "f").joinpath("sub")),
                                        [f"--out = '{t / 'f' / 'sub'}': {t / 'f'} is a file"]),
    "--check with a result there": lambda t, r: (["run", str(_study(t)), "--out", str(r), "--check"],
                                                 [f"--out = '{r}': holds a result (trajectory.zarr): pass --overwrite"]),
    # other commands' arguments
    "bench --only unknown": lambda t, r: (["bench", "--only", "sgd,flow", "--out", str(t / "b.md")],
                                          ["--only = 'flow': allowed: sgd, symmetry, flows", "did you mean 'flows'?"]),
    "orders --momentum 2": lambda t, r: (["orders", str(_study(t)), "--lr", "0.1,0.05", "--horizon", "1",
                                          "--momentum", "2"], ["--momentum = 2.0: expected a number in [0, 1)"]),
    "orders --rtol < 0": lambda t, r: (["orders", str(_study(t)), "--lr", "0.1,0.05", "--horizon", "1", "--rtol", "-1"],
                                       ["--rtol = -1.0: expected a number > 0"]),
    "orders --horizon inf": lambda t, r: (["orders", str(_study(t)), "--lr", "0.1,0.05", "--horizon", "inf"],
                                          ["--horizon = inf: expected a number > 0"]),
    "orders --weak --samples 1": lambda t, r: (["orders", str(_study(t)), "--weak", "--lr", "0.1,0.05", "--horizon", "1",
                                                "--samples", "1"], ["ensemble.size = 1: a weak error needs an ensemble"]),
    "export into a file's folder": lambda t, r: (["export", str(r), "--netcdf", str(_garbage(t / "f") / "x.nc")],
                                                 [f"{t / 'f'}: "]),
    # result stores
    "report a text file": lambda t, r: (["report", str(_garbage(t / "r.txt"))],
                                        [f"result {t / 'r.txt'}: a file that is not a netCDF export"]),
    "report a broken netCDF": lambda t, r: (["report", str(_garbage(t / "r.nc"))],
                                            [f"result {t / 'r.nc'}: not a readable netCDF file"]),
    "report a foreign zarr": lambda t, r: (["report", str(_foreign_zarr(t))],
                                           ["not a flowlab result, or a damaged one: it lacks status, wall_seconds"]),
    "report a store that is a file": lambda t, r: (["report", str(_garbage(t / "o" / "trajectory.zarr").parent)],
                                                   ["trajectory.zarr is a file, not a zarr store"]),
    "report an empty store": lambda t, r: (["report", str((t / "e" / "trajectory.zarr").mkdir(parents=True) or t / "e")],
                                           ["trajectory.zarr holds no arrays"]),
    "report a store with broken metadata": lambda t, r: (
        ["report", str(_broken_metadata(_copy(r, t)))], ["the metadata of 'loss' cannot be read; the store is damaged"]),
    "report a store without loss": lambda t, r: (["report", str(_without(_copy(r, t), "loss"))],
                                                 ["not a flowlab result, or a damaged one: it lacks loss"]),
    # sweep folders
    "sweep.json not JSON": lambda t, r: (["report", str(_sweep_folder(t, "{not json"))],
                                         ["cannot read sweep.json (JSONDecodeError)"]),
    "sweep.json without its keys": lambda t, r: (["report", str(_sweep_folder(t, '{"axes": {}}'))],
                                                 ["sweep.json is not a sweep manifest, or a damaged one (KeyError"]),
    "sweep.json point outside the sweep": lambda t, r: (
        ["report", str(_sweep_folder(t, json.dumps({"names": {"optimizer.lr": "lr"}, "dims": ["lr"],
                                                    "axes": {"optimizer.lr": [0.1, 0.2]},
                                                    "points": [{"id": "p0000", "index": [5]}]})))],
        ["point p0000 has index [5] outside the sweep's shape [2]"]),
}


def _broken_metadata(out: Path) -> Path:
    (out / "trajectory.zarr" / "loss" / ".zarray").write_text("{broken")
    return out


def _without(out: Path, name: str) -> Path:
    shutil.rmtree(out / "trajectory.zarr" / name)
    (out / "trajectory.zarr" / ".zmetadata").unlink()
    return out


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("flowlab: error: "), err
    return err


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, result, capsys):
    argv, words = CASES[case](tmp_path, result)
    rc = main(argv)
    err = _one_line(capsys)
    assert rc == 2, err
    for w in words:
        assert w in err, (w, err)


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_a_pickled_npz_is_never_unpickled(tmp_path, capsys):
    """An .npz whose object array would, unpickled, create a file: refused, and the file never appears."""
    marker = tmp_path / "unpickled"
    np.savez(tmp_path / "d.npz", x=np.array([Unpickled(str(marker))] * 10, dtype=object), y=np.zeros(10, int))
    assert main(_run(_data(tmp_path, f'name = "npz"\npath = "{tmp_path / "d.npz"}"'))) == 2
    err = _one_line(capsys)
    assert "not a readable .npz file (Object arrays cannot be loaded when allow_pickle=False)" in err
    assert not marker.exists()


def test_a_store_with_a_pickle_codec_is_refused(result, tmp_path, capsys):
    """A zarr array stored with the pickle codec (an object array): one line, nothing unpickled."""
    import numcodecs

    out = _copy(result, tmp_path)
    z = out / "trajectory.zarr"
    marker = tmp_path / "unpickled"
    (z / "evil").mkdir()
    (z / "evil" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": None,
        "order": "C", "filters": [{"id": "pickle", "protocol": pickle.HIGHEST_PROTOCOL}]}))
    (z / "evil" / ".zattrs").write_text(json.dumps({"_ARRAY_DIMENSIONS": ["evil"]}))
    (z / "evil" / "0").write_bytes(numcodecs.Pickle().encode(np.array([Unpickled(str(marker))], dtype=object)))
    (z / ".zmetadata").unlink()
    assert main(["report", str(out), "--no-figures"]) == 2
    err = _one_line(capsys)
    assert "the array 'evil' holds Python objects (a pickle codec); flowlab never unpickles" in err
    assert not marker.exists()


def test_a_damaged_chunk_is_one_line_in_a_real_process(result, tmp_path):
    """A chunk whose bytes were cut (a damaged disk): one line naming the variable; not even zarr's
    event loop complains at exit."""
    out = _copy(result, tmp_path)
    chunk = sorted(p for p in (out / "trajectory.zarr" / "loss").iterdir() if not p.name.startswith("."))[0]
    chunk.write_bytes(chunk.read_bytes()[:7])
    proc = subprocess.run([sys.executable, "-m", "flowlab", "report", str(out), "--no-figures"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "the variable 'loss' cannot be read; the store is damaged" in proc.stderr


# ----------------------------------------------------------------- partial stores
def test_report_of_a_run_killed_before_its_first_rows(result, tmp_path, capsys):
    """Every status `running`, no rows: the summary and a line saying so, exit 0."""
    out = _copy(result, tmp_path)
    _shrink(out, 0, status="running")
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "partial result: 2 dynamics still 'running'" in text and "no records yet" in text
    assert flowlab.open_result(out).sizes["time"] == 0


@pytest.mark.parametrize("rows", [1, 3])
def test_report_of_a_running_run(result, tmp_path, capsys, rows):
    """A run still going: the rows written so far, reported with every part's tables and figures."""
    out = _copy(result, tmp_path)
    _shrink(out, rows, status="running")
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert f"reporting the {rows} records written so far" in captured.out and "wrote " in captured.out
    full = flowlab.open_result(result, load=True)
    part = flowlab.open_result(out, load=True)
    np.testing.assert_array_equal(part.loss.values, full.loss.values[:, :rows])


def test_report_of_a_run_killed_between_two_arrays_writes(result, tmp_path, capsys):
    """Killed after some arrays of a chunk were appended and before others: the store opens cut to
    the rows every array has, says so, and its values are the full run's."""
    out = _copy(result, tmp_path)
    full = flowlab.open_result(result, load=True)
    n = full.sizes["time"]
    _shrink(out, n - 2, names=("loss", "distance"), status="running")
    part = flowlab.open_result(out, load=True)
    assert part.sizes["time"] == n - 2 and "time: " + str(n - 2) in part.attrs["store_repaired"]
    for name, var in part.variables.items():
        ref = full[name]
        if "time" in ref.dims:
            ref = ref.isel(time=slice(0, n - 2))
        if name != "status":
            np.testing.assert_array_equal(var.values, ref.values, err_msg=name)
    assert set(part.variables) == set(full.variables)
    assert main(["report", str(out), "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "note: the run stopped between the writes of one chunk's arrays" in text


def test_a_stale_consolidated_copy_is_not_trusted(result, tmp_path):
    """Rows appended after the metadata was consolidated (a resumed run): the arrays' own shapes win."""
    out = _copy(result, tmp_path)
    z = out / "trajectory.zarr"
    meta = json.loads((z / ".zmetadata").read_text())
    for key, info in meta["metadata"].items():
        if key.endswith("/.zarray"):
            dims = meta["metadata"][key.replace(".zarray", ".zattrs")]["_ARRAY_DIMENSIONS"]
            if "time" in dims:
                info["shape"][dims.index("time")] = 2
    (z / ".zmetadata").write_text(json.dumps(meta))
    full = flowlab.open_result(result)
    assert flowlab.open_result(out).sizes["time"] == full.sizes["time"] > 2


# ----------------------------------------------------------------- run --check, usage, bugs
def test_run_check_builds_everything_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _study(tmp_path, '[[flows]]\nname = "modified_loss"\nintegrator = "flowlab:rk4"\ndt = 0.05\n')
    assert main(["run", str(path), "--check"]) == 0
    text = capsys.readouterr().out
    assert "v: ok" in text and "dynamics sgd, modified_loss@flowlab:rk4" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]  # no runs/ folder, nothing else
    # what only building finds (a model that does not fit the data) is found by --check too
    assert main(["run", str(path), "--check", "--set", "model.in_features=10"]) == 2
    assert "do not fit the model" in _one_line(capsys)


def test_usage_errors_name_the_command(capsys):
    """Every command's usage error is one line pointing at ITS help (never 'flowlab flowlab')."""
    for name in default_parts().commands:
        assert main([name, "--no-such-option"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith(f"(see flowlab {name} --help)"), err
        assert "flowlab flowlab" not in err
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("(see flowlab --help)") and "flowlab flowlab" not in err


def _boom(args):
    raise KeyError("a bug")


def test_a_bug_is_one_line_with_the_traceback_in_a_file(capsys):
    """An exception that is not bad input: exit 1, one line naming it and a file holding its traceback."""
    part = flowlab.Part(name="buggy", commands=(flowlab.Command("boom", "raises", lambda p: None, _boom),))
    parts = default_parts().with_parts(part)
    assert main(["boom"], parts=parts) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flowlab: internal error: KeyError: 'a bug'"), err
    where = Path(err.split("traceback in ")[1].split(";")[0])
    try:
        assert "Traceback" in where.read_text() and "_boom" in where.read_text()
    finally:
        where.unlink()
    with pytest.raises(KeyError):
        main(["--debug", "boom"], parts=parts)


def test_messages_are_one_line_and_values_are_cut():
    """A ConfigError with a multi-line value or a huge one still reads as one short line."""
    err = flowlab.ConfigError("data.values", list(range(100_000)), "expected a list of points")
    assert "\n" not in str(err) and len(str(err)) < 300
    err = flowlab.ConfigError("x\ny", "a\nb", "line one\nline two")
    assert "\n" not in str(err)
    assert "\n" not in str(FlowlabError("two\nlines"))


# ----------------------------------------------------------------- fuzz of study files
BASES = [small_study(), *(tomllib.loads((ROOT / "studies" / f"{n}.toml").read_text())
                          for n in ("quickstart", "noisy_quadratic", "stochastic_mlp", "orders_tanh"))]


def _vocabulary() -> dict[str, list[str]]:
    """Section → keys a study may have there (the sections' fields and small builders' parameters)."""
    from dataclasses import fields

    from flowlab.config import OptimizerSection, RecordSection, StudySection
    from flowlab.data import DATASETS
    from flowlab.models import MODELS

    def params(*fns):
        return sorted({n for f in fns for n in inspect.signature(f).parameters if n not in ("input_shape", "num_outputs")})

    return {
        "study": [f.name for f in fields(StudySection)],
        "optimizer": [f.name for f in fields(OptimizerSection)],
        "record": [f.name for f in fields(RecordSection)],
        "model": ["name", *params(MODELS["mlp"], MODELS["cnn"], MODELS["quadratic"])],
        "data": ["name", "chunk_size", *params(DATASETS["digits"], DATASETS["gaussian_mixture"], DATASETS["points"])],
        "loss": ["name", "hvp"],
        "symmetry": ["enabled", "detect", "exclude", "tolerance", "groups"],
        "theory": ["enabled", "variants", "flow_laws"],
        "ensemble": ["size", "vectorise", "streams"],
        "flows": ["name", "integrator", "rtol", "atol", "dt", "label", "integrator_options", "correction"],
        "sweep": ["optimizer.lr", "zip"],
    }


VOCABULARY = _vocabulary()
#: names that resolve to cheap builders (a fuzzed study is built, so no VGG on 64×64 images)
NAMES = ["mlp", "linear", "quadratic", "cnn", "digits", "gaussian_mixture", "teacher_student", "points", "whitened",
         "cross_entropy", "mse", "identity", "gradient_flow", "modified_loss", "sme", "flowlab:rk4", "flowlab:euler",
         "torchdiffeq:dopri5", "torchdiffeq:rk4", "cosine", "step", "full", "ends", "auto", "cpu", "float32", "relu",
         "tanh", "hvp", "translation", "paper", "", "x", "os:getcwd", "no.such:thing"]


def _values(huge: bool):
    """TOML values; without ``huge``, numbers small enough that building the study stays cheap."""
    ints = st.integers(-2**70, 2**70) if huge else st.integers(-3, 64)
    floats = st.floats() if huge else st.floats(-10, 10) | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan])
    scalars = st.booleans() | ints | floats | st.text(max_size=8) | st.sampled_from(NAMES)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(sorted({k for ks in VOCABULARY.values() for k in ks})) | st.text(max_size=6), inner,
        max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


@st.composite
def mutated_studies(draw, huge: bool = True):
    """A valid study with one to three mutations: a value replaced (by one of its own type, or by
    anything), a key removed, a known or random key added to a table, a section replaced."""
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    values = _values(huge)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(raw))
        how = draw(st.sampled_from(["same type", "same type", "anything", "remove", "add key", "section"]))
        if how == "section":
            name = draw(st.sampled_from(sorted(VOCABULARY)))
            raw[name] = draw(st.dictionaries(st.sampled_from(VOCABULARY[name]), values, max_size=3)
                             | (st.lists(st.dictionaries(st.sampled_from(VOCABULARY[name]), values, max_size=4),
                                         max_size=2) if name == "flows" else values))
            continue
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        parent = raw
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
        if how == "remove":
            del parent[key]
        elif how == "add key":
            table = old if isinstance(old, dict) else parent if isinstance(parent, dict) else raw
            section = str(path[0])
            table[draw(st.sampled_from(VOCABULARY.get(section, ["x"])) | st.text(max_size=6))] = draw(values)
        elif how == "anything" or isinstance(old, dict):
            parent[key] = draw(values)
        elif isinstance(old, bool):
            parent[key] = not old
        elif isinstance(old, int | float):
            parent[key] = draw(values.filter(lambda v: isinstance(v, int | float)) | st.just(-old)
                               | (st.just(old * 1000) if huge else st.just(old + 1)))
        elif isinstance(old, str):
            parent[key] = draw(st.sampled_from([old + "x", old[:-1], old.upper(), *NAMES]))
        elif isinstance(old, list):
            parent[key] = old[: draw(st.integers(0, len(old)))] + draw(st.lists(values, max_size=2))
    return raw


def _toml(raw) -> str:
    """A study mapping as TOML text, sometimes broken (a cut, or a stray character)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items()) + "}"
        return json.dumps(str(v))

    return "\n".join(f"{json.dumps(str(k))} = {value(v)}" for k, v in raw.items()) + "\n"


def _accepts_or_one_line(fn) -> bool:
    try:
        fn()
    except FlowlabError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))
        return False
    return True


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=mutated_studies(), cut=st.integers(0, 400), stray=st.sampled_from(["", "[", "=", "\"", "\x00", "]]", "\\"]))
def test_fuzz_study_files_give_flowlab_errors_only(tmp_path_factory, raw, cut, stray):
    """Mutated study files, also as (possibly broken) TOML text through load_study: accepted, or a
    one-line FlowlabError; never another exception."""
    _accepts_or_one_line(lambda: flowlab.parse_study(raw))
    path = tmp_path_factory.mktemp("fuzz") / "s.toml"
    text = _toml(raw)
    path.write_text(text[:cut] + stray + text[cut:] if stray else text)
    _accepts_or_one_line(lambda: flowlab.load_study(path))


def _preflight(raw, folder: Path) -> None:
    from flowlab.preflight import preflight

    study = flowlab.parse_study(raw)
    study = study.with_overrides(['study.device="cpu"']) if study.study.device != "cpu" else study
    preflight(study, folder / "out")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=mutated_studies(huge=False))
def test_fuzz_studies_through_run_check(tmp_path_factory, raw):
    """Mutated studies, parsed AND built as `flowlab run --check` builds them (data, model, loss,
    flows, symmetry groups): accepted, or a one-line FlowlabError."""
    _accepts_or_one_line(lambda: _preflight(raw, tmp_path_factory.mktemp("fuzz")))


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=mutated_studies(huge=False))
def test_fuzz_studies_through_run_check_long(tmp_path_factory, raw):
    _accepts_or_one_line(lambda: _preflight(raw, tmp_path_factory.mktemp("fuzz")))


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=mutated_studies(), cut=st.integers(0, 400), stray=st.sampled_from(["", "[", "=", "\"", "\x00", "]]", "\\"]))
def test_fuzz_study_files_long(tmp_path_factory, raw, cut, stray):
    test_fuzz_study_files_give_flowlab_errors_only.hypothesis.inner_test(tmp_path_factory, raw, cut, stray)
