"""The flows part: the ``[[flows]]`` section, the ``flows`` and ``integrators`` registries, the
``flowlab orders`` command, and one follower per continuous model in every run (the study's
``[[flows]]`` and the flows given to :func:`flowlab.run` as objects).

Provides ``followers`` (the list of :class:`~flowlab.flows.FlowFollower`) to parts that record
about them (the JAX part's integrator statistics); wants ``laws`` (the theory part's flow laws),
with which each flow is composed before it is integrated.
"""

from __future__ import annotations

from typing import Any

from ..parts import Contribution, Part, Section, Setup
from .config import parse_flows
from .follower import FlowStatsRecorder, build_followers
from .orders import COMMAND as ORDERS
from .registry import FLOWS, INTEGRATORS


def setup(setup: Setup, laws: Any = None) -> Contribution | None:
    followers = build_followers(setup, laws)
    if not followers:
        return None
    return Contribution(recorders=[FlowStatsRecorder()], dynamics=followers, provides={"followers": followers})


PART = Part(
    name="flows",
    sections=(Section("flows", parse_flows, default=(), listed=True),),
    registries={"flows": FLOWS, "integrators": INTEGRATORS},
    commands=(ORDERS,),
    provides=("followers",),
    wants=("laws",),
    setup=setup,
    doc="continuous models of SGD and their integrators, run in lock step with the discrete run",
)
