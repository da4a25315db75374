"""Study files: validation, overrides, and bad input as one clear line (exit 2 from the CLI)."""

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, small_study

import flowlab
from flowlab.cli import main
from flowlab.config import apply_overrides


def _toml(d: dict) -> str:
    lines = []
    for section, table in d.items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            lines.append(f"{k} = {_val(v)}")
    return "\n".join(lines) + "\n"


def _val(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    return repr(v)


def _cli_error(tmp_path, capsys, raw=None, args=()):
    path = tmp_path / "s.toml"
    if raw is not None:
        path.write_text(_toml(raw))
    rc = main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("flowlab: error:"), err
    assert "Traceback" not in err
    return err


def test_quickstart_parses_and_overrides_apply():
    study = flowlab.load_study(ROOT / "studies" / "quickstart.toml", ["optimizer.lr=0.2", "record.every=5",
                                                                     'study.name="x"'])
    assert study.optimizer.lr == 0.2 and study.record.every == 5 and study.name == "x"
    assert study.model.name == "mlp" and study.data.name == "digits"
    again = flowlab.parse_study(study.to_dict())
    assert again.to_dict() == study.to_dict()


def test_override_parsing():
    out = apply_overrides({"optimizer": {"lr": 0.1}}, ["optimizer.lr=0.3", "model.widths=[4, 4]", "data.name=digits"])
    assert out == {"optimizer": {"lr": 0.3}, "model": {"widths": [4, 4]}, "data": {"name": "digits"}}
    with pytest.raises(flowlab.ConfigError, match="section.key=value"):
        apply_overrides({}, ["lr"])


@pytest.mark.parametrize("change, field, words", [
    ({"optimizer": {"lr": -0.1}}, "optimizer.lr", "> 0"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum", "[0, 1)"),
    ({"optimizer": {"momentum": -0.5}}, "optimizer.momentum", "[0, 1)"),
    ({"optimizer": {"steps": 0}}, "optimizer.steps", "positive integer"),
    ({"optimizer": {"lerning_rate": 0.1}}, "optimizer.lerning_rate", "unknown key"),
    ({"record": {"evry": 2}}, "record.evry", "did you mean 'every'"),
    ({"optimizer": {"nesterov": True}}, "optimizer.nesterov", "momentum > 0"),
    ({"study": {"dtype": "float16"}}, "study.dtype", "float32, float64"),
    ({"study": {"device": "tpu"}}, "study.device", "auto, cpu, cuda"),
    ({"optimizer": {"batch_size": "half"}}, "optimizer.batch_size", "positive integer"),
])
def test_bad_values_are_named(change, field, words):
    raw = small_study(**change)
    with pytest.raises(flowlab.ConfigError) as info:
        flowlab.build(flowlab.parse_study(raw))
    msg = str(info.value)
    assert msg.startswith(field) and words in msg and "\n" not in msg


def test_unknown_section():
    raw = small_study()
    raw["optimiser"] = {"lr": 0.1}
    with pytest.raises(flowlab.ConfigError, match="optimiser.*unknown section.*did you mean 'optimizer'"):
        flowlab.parse_study(raw)


@pytest.mark.parametrize("change, words", [
    ({"model": {"name": "mlpp"}}, "model.name = 'mlpp': unknown model; known:"),
    ({"data": {"name": "cifar"}}, "data.name = 'cifar': unknown dataset"),
    ({"loss": {"name": "hinge"}}, "loss.name = 'hinge': unknown loss"),
    ({"model": {"name": "mlp", "widths": [16], "activaton": "relu"}}, "model.activaton"),
    ({"model": {"name": "mlp", "widths": [16], "activation": "swish"}}, "model.activation = 'swish'"),
    ({"optimizer": {"batch_size": 5000}}, "optimizer.batch_size = 5000: larger than the dataset (200 examples)"),
    ({"model": {"name": "mlp", "widths": [16], "out_features": 5}}, "has 10 classes but the model has 5 outputs"),
    ({"model": {"name": "nosuchpkg.mod:net"}}, "cannot import module 'nosuchpkg.mod'"),
    ({"data": {"name": "npz", "path": "/nonexistent/file.npz"}}, "data.path = '/nonexistent/file.npz': no such file"),
    ({"loss": {"name": "cross_entropy"}, "data": {"name": "teacher_student", "dim": 64}}, "needs class labels"),
    ({"model": {"name": "mlp", "widths": [16], "in_features": 10}}, "do not fit the model"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, change, words):
    err = _cli_error(tmp_path, capsys, small_study(**change))
    assert words in err


def test_cli_missing_file_and_bad_toml(tmp_path, capsys):
    err = _cli_error(tmp_path, capsys, None)
    assert "no such file" in err
    (tmp_path / "s.toml").write_text("[study\nname=")
    rc = main(["run", str(tmp_path / "s.toml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not valid TOML" in err and len(err.splitlines()) == 1


def test_cli_bad_override(tmp_path, capsys):
    err = _cli_error(tmp_path, capsys, small_study(), args=["--set", "optimizer.momentum=2"])
    assert "optimizer.momentum = 2" in err


def test_cli_entry_point_subprocess(tmp_path):
    """The installed entry point: a real process, bad input, exit 2, one line, no traceback."""
    (tmp_path / "s.toml").write_text(textwrap.dedent("""
        [model]
        name = "mlp"
        [data]
        name = "digits"
        [optimizer]
        lr = 0.1
        steps = 10
        momentum = 1.5
    """))
    proc = subprocess.run([sys.executable, "-m", "flowlab", "run", str(tmp_path / "s.toml")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "flowlab: error: optimizer.momentum = 1.5: expected a number in [0, 1)"
