"""Study files: validation, overrides, and bad input as one clear line (exit 2 from the CLI)."""

import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, small_study, small_toml

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


BASE = small_toml("bad", 5)
RK4 = '[[flows]]\nname = "gradient_flow"\nintegrator = "flowlab:rk4"\n'
SCHEDULE = "[optimizer.schedule]\n"

# (TOML appended to BASE, --set overrides, field, value as printed, what the line must say)
BAD_INPUT = {
    "record.every=0": ("", ["record.every=0"], "record.every", "0", "expected a positive integer"),
    "record.every=1.5": ("", ["record.every=1.5"], "record.every", "1.5", "expected a positive integer"),
    "record.snapshot_every": ("", ['record.snapshot_every="often"'], "record.snapshot_every", "'often'",
                              'a positive integer (steps between snapshots) or "ends"'),
    "record.snapshot_every=0": ("", ["record.snapshot_every=0"], "record.snapshot_every", "0", '"ends"'),
    "record.projections": ("", ["record.projections=-1"], "record.projections", "-1", "expected an integer >= 0"),
    "record.chunk": ("", ["record.chunk=0"], "record.chunk", "0", "expected a positive integer"),
    "record.full_loss": ("", ['record.full_loss="yes"'], "record.full_loss", "'yes'", "expected true or false"),
    "record.unknown": ("", ["record.evry=2"], "record.evry", "2", "unknown key; allowed: every, snapshot_every"),
    "schedule.name": (SCHEDULE + 'name = "cosin"\n', [], "optimizer.schedule.name", "'cosin'",
                      "unknown schedule; known: constant, cosine, exponential, step, warmup"),
    "schedule.option": (SCHEDULE + 'name = "cosine"\nperiodd = 3\n', [], "optimizer.schedule.periodd", "3",
                        "unknown option; allowed: period, lr_min (did you mean 'period'?)"),
    "schedule.not_a_table": ("", ["optimizer.schedule=3"], "optimizer.schedule", "3", "expected a table"),
    "schedule.lr_zero": (SCHEDULE + 'name = "cosine"\nperiod = 3\n', [], "optimizer.schedule", "'cosine'",
                         "gives learning rate 0.0 at step 3; must be > 0"),
    "schedule.lr_negative": (SCHEDULE + 'name = "exponential"\ngamma = -0.5\n', [], "optimizer.schedule",
                             "'exponential'", "gives learning rate -0.05 at step 1; must be > 0"),
    "schedule.step_gamma_zero": (SCHEDULE + 'name = "step"\nstep_size = 2\ngamma = 0.0\n', [], "optimizer.schedule",
                                 "'step'", "gives learning rate 0.0 at step 2; must be > 0"),
    "schedule.warmup_steps=0": (SCHEDULE + 'name = "warmup"\nwarmup_steps = 0\n', [], "optimizer.schedule",
                                "{'warmup_steps': 0}", "rejected by warmup: division by zero"),
    "schedule.period=0": (SCHEDULE + 'name = "cosine"\nperiod = 0\n', [], "optimizer.schedule", "{'period': 0}",
                          "rejected by cosine"),
    "schedule.step_size=0": (SCHEDULE + 'name = "step"\nstep_size = 0\n', [], "optimizer.schedule",
                             "{'step_size': 0}", "rejected by step"),
    "weight_decay": ("", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", "-0.1", "expected a number >= 0"),
    "dampening>1": ("", ["optimizer.dampening=1.5"], "optimizer.dampening", "1.5", "expected a number in [0, 1]"),
    "dampening<0": ("", ["optimizer.dampening=-0.2"], "optimizer.dampening", "-0.2", "expected a number in [0, 1]"),
    "study.seed<0": ("", ["study.seed=-1"], "study.seed", "-1", "expected an integer >= 0"),
    "study.seed float": ("", ["study.seed=1.5"], "study.seed", "1.5", "expected an integer >= 0"),
    "study.seed text": ("", ["study.seed=abc"], "study.seed", "'abc'", "expected an integer >= 0"),
    "study.out empty": ("", ['study.out=""'], "study.out", "''", "expected a non-empty string"),
    "study.out number": ("", ["study.out=5"], "study.out", "5", "expected a non-empty string"),
    "data.chunk_size=0": ("", ["data.chunk_size=0"], "data.chunk_size", "0", "expected a positive integer"),
    "data.chunk_size text": ("", ['data.chunk_size="big"'], "data.chunk_size", "'big'", "expected a positive integer"),
    "flows.duplicate_label": (RK4 + 'label = "a"\n' + RK4 + 'label = "a"\n', [], "flows.1.label", "'a'",
                              "labels must be unique and not 'sgd'"),
    "flows.duplicate_default_label": (RK4 + RK4, [], "flows.1.label", "'gradient_flow@flowlab:rk4'",
                                      "labels must be unique"),
    "flows.label_sgd": (RK4 + 'label = "sgd"\n', [], "flows.0.label", "'sgd'", "labels must be unique and not 'sgd'"),
    "flows.not_a_list": ("flows = 3\n", [], "flows", "3", "expected a list of tables ([[flows]])"),
    "flows.missing_name": ('[[flows]]\nintegrator = "flowlab:rk4"\n', [], "flows.0.name", "None", "is required"),
    "flows.unknown_flow": ('[[flows]]\nname = "gradient_flo"\n', [], "flows.0.name", "'gradient_flo'",
                           "unknown flow; known: central_flow, gradient_flow, modified_loss"),
    "flows.unknown_integrator": ('[[flows]]\nname = "gradient_flow"\nintegrator = "flowlab:rk5"\n', [],
                                 "flows.0.integrator", "'flowlab:rk5'", "unknown integrator; known: "),
    "flows.unknown_flow_option": ('[[flows]]\nname = "modified_loss"\ncorection = "hvp"\n', [], "flows.0.corection",
                                  "'hvp'", "unknown option; allowed: correction, fd_step"),
    "flows.bad_flow_option": ('[[flows]]\nname = "modified_loss"\ncorrection = "exact"\n', [], "flows.0.correction",
                              "'exact'", "allowed: hvp, finite_difference"),
    "flows.unknown_integrator_option": (RK4 + "integrator_options = { max_stepz = 10 }\n", [],
                                        "flows.0.integrator_options.max_stepz", "10", "unknown option; allowed: "),
    "flows.unknown_torchdiffeq_option": (
        '[[flows]]\nname = "gradient_flow"\nintegrator_options = { max_stepz = 10 }\n', [],
        "flows.0.integrator_options.max_stepz", "10", "unknown option of torchdiffeq:dopri5; allowed: "),
    "flows.torchdiffeq_option_flowlab_sets": (
        '[[flows]]\nname = "gradient_flow"\nintegrator_options = { max_num_steps = 10 }\n', [],
        "flows.0.integrator_options.max_num_steps", "10", "use max_steps"),
    "flows.bad_integrator_option": ('[[flows]]\nname = "gradient_flow"\nintegrator_options = { max_steps = 0 }\n', [],
                                    "flows.0.integrator_options.max_steps", "0", "expected a positive integer"),
    "flows.integrator_options_not_a_table": ('[[flows]]\nname = "gradient_flow"\nintegrator_options = 3\n', [],
                                             "flows.0.integrator_options", "3", "expected a table of integrator options"),
    "flows.rtol<0": ('[[flows]]\nname = "gradient_flow"\nrtol = -1e-7\n', [], "flows.0.rtol", "-1e-07",
                     "expected a number > 0"),
    "flows.rtol=0": ('[[flows]]\nname = "gradient_flow"\nrtol = 0\n', [], "flows.0.rtol", "0", "expected a number > 0"),
    "flows.rtol_on_fixed_step": (RK4 + "rtol = 1e-6\n", [], "flows.0.rtol", "1e-06",
                                 "flowlab:rk4 is a fixed-step method: give dt, not rtol/atol"),
    "flows.dt=0": (RK4 + "dt = 0\n", [], "flows.0.dt", "0", "expected a number > 0"),
    "flows.dt text": (RK4 + 'dt = "big"\n', [], "flows.0.dt", "'big'", "expected a number > 0"),
    "flows.dt via --set": (RK4, ["flows.0.dt=-0.1"], "flows.0.dt", "-0.1", "expected a number > 0"),
    "flows.fixed_step_without_dt": ('[[flows]]\nname = "gradient_flow"\nintegrator = "torchdiffeq:rk4"\n', [],
                                    "flows.0.dt", "None", "torchdiffeq:rk4 is a fixed-step method: give dt"),
    "flows.momentum_with_nesterov": ('[[flows]]\nname = "momentum_first_order"\nintegrator = "flowlab:rk4"\n',
                                     ["optimizer.momentum=0.9", "optimizer.nesterov=true"], "flows.0.name",
                                     "'momentum_first_order'", "momentum flows model heavy ball with dampening 0 and no "
                                     "Nesterov"),
    "flows.momentum_with_dampening": ('[[flows]]\nname = "momentum_second_order"\nintegrator = "flowlab:rk4"\n',
                                      ["optimizer.momentum=0.9", "optimizer.dampening=0.1"], "flows.0.name",
                                      "'momentum_second_order'", "heavy ball with dampening 0"),
    "flows.error_in_second_entry": (RK4 + 'label = "a"\n[[flows]]\nname = "gradient_flow"\nrtol = -1.0\n', [],
                                    "flows.1.rtol", "-1.0", "expected a number > 0"),
}


@pytest.mark.parametrize("extra, sets, field, value, words", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_cli_bad_input_in_every_section(tmp_path, capsys, extra, sets, field, value, words):
    """`flowlab run` with bad input: exit 2 and one line `flowlab: error: FIELD = VALUE: what is allowed`,
    the field named by its --set path; nothing written."""
    path = tmp_path / "s.toml"
    path.write_text(extra + BASE if extra.startswith("flows =") else BASE + extra)  # a top-level key goes first
    out = tmp_path / "out"
    rc = main(["run", str(path), "--out", str(out), "--quiet", *[a for s in sets for a in ("--set", s)]])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, err, captured.out[-300:])
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"flowlab: error: {field} = {value}: "), err
    assert words in err, err
    assert not (out / "trajectory.zarr").exists()


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
