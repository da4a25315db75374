"""Parts: discovery through the entry-point group, declared needs, and a part from outside flowlab
(tests/demo_part.py) adding a flow, a recorder, a section and a command."""

from importlib.metadata import EntryPoint

import demo_part
import numpy as np
import pytest
from conftest import small_study

import flowlab
from flowlab.cli import main as cli_main
from flowlab.parts import ENTRY_POINT_GROUP, Contribution, Part, Parts


def _demo_parts() -> Parts:
    return flowlab.discover([EntryPoint(name="demo", value="demo_part:PART", group=ENTRY_POINT_GROUP)])


def test_builtin_parts_and_their_order():
    parts = flowlab.discover([])
    assert [p.name for p in parts] == ["core", "symmetry", "theory", "flows", "jax", "stochastic", "central", "sweep"]
    order = [p.name for p in parts.order]
    # the theory needs the symmetry recorder, the flows want the theory's laws, the JAX part needs the followers,
    # the stochastic part wants the symmetry recorder (SGD's finite-step / noise split)
    assert order.index("symmetry") < order.index("theory") < order.index("flows") < order.index("jax")
    assert order.index("symmetry") < order.index("stochastic")
    assert order.index("flows") < order.index("central")  # the central recorder needs the followers
    assert "central_flow" in parts.registry("flows") and "central_flow" not in flowlab.flows.FLOWS
    assert {"sme", "sme2", "sme_momentum", "svag", "sgd_modified_loss"} <= set(parts.registry("flows"))
    assert "flowlab:euler_maruyama" in parts.registry("integrators")
    assert {"models", "datasets", "losses", "schedules", "flows", "integrators"} <= set(parts.registries)
    assert "diffrax:Dopri5" in parts.registry("integrators")  # an entry of the JAX part in the flows part's registry
    assert set(parts.sections) == {"checkpoint", "flows", "symmetry", "theory", "ensemble", "sweep"}
    assert {"run", "list", "export", "report", "orders", "symmetries", "check", "sweep"} <= set(parts.commands)


def test_a_part_from_outside_adds_a_flow_and_a_recorder(tmp_path):
    parts = _demo_parts()
    assert "demo_decay" in parts.registry("flows") and "demo_decay" not in flowlab.flows.FLOWS  # no global state
    raw = small_study(optimizer={"steps": 6, "batch_size": "full"}, record={"every": 2},
                      flows=[{"name": "demo_decay", "rate": 0.5, "integrator": "torchdiffeq:dopri5", "rtol": 1e-10,
                              "label": "decay"}],
                      demo={"norms": True}, symmetry={"enabled": False})
    study = flowlab.parse_study(raw, parts=parts)
    demo_part.SEEN.clear()
    ds = flowlab.run(study, tmp_path / "o").load()
    assert demo_part.SEEN == [["decay"]]
    assert list(ds.dynamics.values) == ["sgd", "decay"] and list(ds.status.values) == ["ok", "ok"]
    theta0 = ds.theta.isel(dynamics=0, snapshot=0).values
    t = ds.time.values
    norms = ds.theta_norm.sel(dynamics="decay").values
    np.testing.assert_allclose(norms, np.exp(-0.5 * t) * np.linalg.norm(theta0), rtol=1e-8)
    sgd_theta_last = ds.theta.sel(dynamics="sgd").isel(snapshot=-1).values
    assert ds.theta_norm.sel(dynamics="sgd").values[-1] == pytest.approx(np.linalg.norm(sgd_theta_last), rel=1e-12)
    # the demo section is part of the study; without the demo part it is an unknown section
    assert flowlab.parse_study(raw, parts=parts).to_dict()["demo"] == {"norms": True}
    with pytest.raises(flowlab.ConfigError, match="demo.*unknown section"):
        flowlab.parse_study(raw)


def test_a_part_from_outside_adds_a_command_and_list_shows_it(capsys):
    parts = _demo_parts()
    assert cli_main(["hello"], parts=parts) == 0
    assert "hello from the demo part (9 parts)" in capsys.readouterr().out
    assert cli_main(["list"], parts=parts) == 0
    out = capsys.readouterr().out
    assert "demo_decay" in out and "parts: core, symmetry, theory, flows, jax, stochastic, central, sweep, demo" in out
    assert cli_main(["hello"]) == 2  # not a command of the installed parts


def test_needs_order_set_up_and_skip():
    calls = []

    def setup_as(name, provides=None):
        def setup(setup, **needs):
            calls.append((name, {k: v for k, v in needs.items()}))
            return Contribution(provides=provides or {})
        return setup

    a = Part("a", needs=("x",), wants=("y",), setup=setup_as("a"))
    b = Part("b", provides=("x",), wants=("y",), setup=setup_as("b", {"x": "X"}))
    c = Part("c", provides=("y",), setup=setup_as("c", {"y": None}))  # provides y, but this run has none
    parts = Parts([a, b, c])
    assert [p.name for p in parts.order] == ["c", "b", "a"]
    parts.contribute(None)
    assert calls == [("c", {}), ("b", {"y": None}), ("a", {"x": "X", "y": None})]
    calls.clear()
    Parts([a, Part("b2", provides=("x",), setup=setup_as("b2", {"x": None}))]).contribute(None)
    assert calls == [("b2", {})]  # a's need is not met in this run: a is skipped


@pytest.mark.parametrize("parts, message", [
    ([Part("a", needs=("x",))], "part 'a' needs 'x', which no part provides"),
    ([Part("a", provides=("x",), needs=("y",)), Part("b", provides=("y",), needs=("x",))], "cycle of needs: a -> b -> a"),
    ([Part("a", provides=("x",)), Part("b", provides=("x",))], "both provide 'x'"),
    ([Part("a"), Part("a")], "two parts are named 'a'"),
    ([Part("a", entries={"nope": {"f": object}})], "registry 'nope', which no part owns"),
])
def test_inconsistent_parts_are_one_line_errors(parts, message):
    with pytest.raises(flowlab.FlowlabError, match=message):
        Parts(parts)


def test_a_broken_entry_point_is_one_line():
    with pytest.raises(flowlab.FlowlabError, match="not a flowlab.Part"):
        flowlab.discover([EntryPoint(name="bad", value="demo_part:Decay", group=ENTRY_POINT_GROUP)])
    with pytest.raises(flowlab.FlowlabError, match="cannot import"):
        flowlab.discover([EntryPoint(name="gone", value="no_such_module_xyz:PART", group=ENTRY_POINT_GROUP)])


def test_a_part_that_adds_an_existing_name_is_refused():
    clash = Part("clash", entries={"flows": {"gradient_flow": demo_part.Decay}})
    with pytest.raises(flowlab.FlowlabError, match="adds flow 'gradient_flow', which is already registered"):
        flowlab.discover([]).with_parts(clash)
