"""The README's Python examples run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(tag: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- readme-example: {tag} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README has no example tagged {tag!r}"
    return m.group(1)


def test_object_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_example("objects"), "README.md", "exec"), scope)
    ds = scope["ds"]
    assert list(ds.dynamics.values) == ["sgd", "gf", "igr"] and set(ds.status.values) == {"ok"}
    # the recorder given as an object recorded every dynamics; IGR follows GD closer than gradient flow does
    norms = ds.theta_norm.values
    assert np.isfinite(norms).all() and norms.shape == (3, 21)
    assert ds.distance.sel(dynamics="igr").values[-1] < ds.distance.sel(dynamics="gf").values[-1]
    assert (tmp_path / "runs" / "objects" / "trajectory.zarr").is_dir()
    assert "<" in capsys.readouterr().out
