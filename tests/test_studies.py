"""Every study script in studies/ (flowlab.studykit) runs in smoke mode, in its own process, and writes
a summary that names its command, and every file the summary links."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowlab import studykit

ROOT = Path(__file__).resolve().parents[1]
STUDIES = studykit.discover(ROOT / "studies")


def test_studies_are_discovered(tmp_path):
    assert {"central_flow", "jax_agreement"} <= set(STUDIES)
    (tmp_path / "a.py").write_text('studykit.main("a", body)')
    (tmp_path / "b.py").write_text("print(1)")
    (tmp_path / "_c.py").write_text('studykit.main("c", body)')
    assert studykit.discover(tmp_path) == ["a"]


@pytest.mark.parametrize("name", STUDIES)
def test_study_smoke(name, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / f"{name}.py"), "--smoke",
                           "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert f"`python studies/{name}.py --smoke`" in summary
    assert "**Found.**" in summary
    for link in re.findall(r"\]\(([^)#]+)\)", summary):
        if "://" not in link and not link.startswith("../"):
            assert (tmp_path / "results" / link).is_file(), f"{name}: summary links a missing {link}"
    for p in (tmp_path / "results").rglob("*"):
        assert p.stat().st_size <= studykit.MAX_FILE_BYTES, p


def test_studykit_refuses_a_big_dataset(tmp_path):
    import numpy as np
    import xarray as xr

    ctx = studykit.StudyContext(name="x", smoke=True, results=tmp_path, runs=tmp_path, command="c",
                                studies=ROOT / "studies")
    small = ctx.save_dataset(xr.Dataset({"a": ("n", np.arange(10.0))}, attrs={"d": {"k": 1}}), "s.nc")
    assert xr.open_dataset(small, engine="h5netcdf").a.size == 10
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="over the 3 MB"):
        ctx.save_dataset(xr.Dataset({"a": ("n", rng.standard_normal(600_000))}), "big.nc")


def test_make_studies_runs_the_longest_first(tmp_path):
    table = tmp_path / "STUDIES.md"
    table.write_text("| study | wall seconds | exit | summary |\n|---|---|---|---|\n| a | 5 | 0 | x |\n| b | 50 | 0 | x |\n")
    assert studykit.longest_first(["a", "b", "c"], table) == ["c", "b", "a"]
    assert studykit.longest_first(["b", "a"], tmp_path / "missing.md") == ["b", "a"]
