"""A part from outside flowlab, as a separate package would ship it (entry point
``demo = "demo_part:PART"`` in the group ``flowlab.parts``): a flow, a recorder, a section and a
command.  tests/test_parts.py registers it through discovery."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

import flowlab
from flowlab.flows import Flow


class Decay(Flow):
    """θ' = −rate·θ: a continuous model with a closed form, θ(t) = e^{−rate·t} θ0."""

    name = "demo_decay"
    order = 1

    def __init__(self, rate: float = 1.0):
        self.rate = float(rate)

    def vector_field(self, t, state, ops, hp):
        return (-self.rate * state[0],)

    def options(self):
        return {"rate": self.rate}


@dataclass(frozen=True)
class DemoSection:
    norms: bool = True

    def to_dict(self) -> dict:
        return {"norms": self.norms}


def parse_demo(raw) -> DemoSection:
    if not isinstance(raw, Mapping) or set(raw) - {"norms"}:
        raise flowlab.ConfigError("demo", raw, "expected a table with the key norms")
    return DemoSection(**raw)


class NormRecorder(flowlab.Recorder):
    """``theta_norm`` (dynamics, time): |θ(t)| of every dynamics."""

    def variables(self, ctx):
        return [flowlab.Variable("theta_norm", ("dynamics", "time"))]

    def record(self, rows, point):
        rows.put("theta_norm", point.index, torch.linalg.vector_norm(point.theta))


def setup(setup: flowlab.Setup, followers=None) -> flowlab.Contribution | None:
    """The recorder when ``[demo] norms`` (default); ``followers`` (the flows part's) is wanted, not
    needed: a run without flows gets None."""
    if not setup.study.section("demo").norms:
        return None
    SEEN.append([f.label for f in followers or []])
    return flowlab.Contribution(recorders=[NormRecorder()])


SEEN: list = []  # the followers each set-up saw (tests read it)


def _hello(args) -> int:
    print(f"hello from the demo part ({len(args.parts.parts)} parts)")
    return 0


PART = flowlab.Part(
    name="demo",
    sections=(flowlab.Section("demo", parse_demo),),
    entries={"flows": {"demo_decay": Decay}},
    commands=(flowlab.Command("hello", "say hello", lambda p: None, _hello),),
    wants=("followers",),
    setup=setup,
)
