"""Integrator statistics in the trajectory Dataset (added to a run whose flows use a diffrax integrator).

- ``accepted_steps`` (method, time): accepted solver steps so far (every flow whose sessions count them);
- ``rejected_steps`` (method, time): rejected steps so far (diffrax integrators);
- ``compile_seconds`` (method, time): JAX trace + compile time so far (diffrax integrators; this time
  is NOT part of the method's ``wall_seconds``).

NaN where a method has no such count (``sgd``, torch integrators for the diffrax-only ones).
"""

from __future__ import annotations

import math
from typing import Any

from ..recording import Point, Recorder, Rows, RunContext, Variable


def _stats(follower: Any) -> dict | None:
    stats = getattr(getattr(follower, "integrator", None), "stats", None)
    return stats if isinstance(stats, dict) else None


class IntegratorStatsRecorder(Recorder):
    def __init__(self, followers: list):
        self.followers = followers

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [
            Variable("accepted_steps", ("method", "time"), attrs={"long_name": "accepted integrator steps so far"}),
            Variable("rejected_steps", ("method", "time"), attrs={"long_name": "rejected integrator steps so far (diffrax)"}),
            Variable("compile_seconds", ("method", "time"), attrs={
                "long_name": "JAX trace + compile seconds so far (diffrax integrators)",
                "note": "not included in wall_seconds"}),
        ]

    def record(self, rows: Rows, point: Point) -> None:
        if point.index == 0 or point.index > len(self.followers):
            return
        f = self.followers[point.index - 1]
        stats = _stats(f)
        if stats is not None:
            rows.put("accepted_steps", point.index, float(stats["accepted"]))
            rows.put("rejected_steps", point.index, float(stats["rejected"]))
            rows.put("compile_seconds", point.index, float(stats["compile_seconds"]))
            return
        session = getattr(f, "session", None)
        steps = getattr(f, "_steps_before", 0) + getattr(session, "steps", math.nan) if session is not None else math.nan
        rows.put("accepted_steps", point.index, float(steps))


def integrator_recorders(ctx: RunContext) -> list[Recorder]:
    followers = list(ctx.extras.get("followers", []))
    if any(getattr(getattr(f, "integrator", None), "backend", "torch") == "jax" for f in followers):
        return [IntegratorStatsRecorder(followers)]
    return []
