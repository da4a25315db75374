"""The JAX part: the ``diffrax:*`` integrators (entries of the flows part's ``integrators``
registry; JAX is imported only when one is used) and, in a run with a diffrax flow, its integrator
statistics (``accepted_steps``, ``rejected_steps``, ``compile_seconds``), recorded from the flows
part's ``followers``."""

from __future__ import annotations

from ..parts import Contribution, Part, Setup
from .integrators import diffrax_integrators
from .recording import IntegratorStatsRecorder


def setup(setup: Setup, followers: list) -> Contribution | None:
    if any(getattr(f.integrator, "backend", "torch") == "jax" for f in followers):
        return Contribution(recorders=[IntegratorStatsRecorder(followers)])
    return None


PART = Part(
    name="jax",
    entries={"integrators": diffrax_integrators()},
    needs=("followers",),
    setup=setup,
    doc="JAX twins of torch models, integrated by diffrax",
)
