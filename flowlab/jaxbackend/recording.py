"""Integrator statistics in the trajectory Dataset (added to a run whose flows use a diffrax integrator).

- ``accepted_steps`` (dynamics, time): accepted solver steps so far (every flow whose sessions count them);
- ``rejected_steps`` (dynamics, time): rejected steps so far (diffrax integrators);
- ``compile_seconds`` (dynamics, time): JAX trace + compile time so far (diffrax integrators; this
  time is NOT part of the dynamics' ``wall_seconds``).

NaN where a dynamics has no such count (``sgd``, torch integrators for the diffrax-only ones).
"""

from __future__ import annotations

from typing import Any

from ..recording import Point, Recorder, Rows, RunContext, Variable


def _stats(follower: Any) -> dict | None:
    stats = getattr(follower.integrator, "stats", None)
    return stats if isinstance(stats, dict) else None


class IntegratorStatsRecorder(Recorder):
    """The statistics of the ``followers`` (the flows part's, in ``dynamics`` order after ``sgd``)."""

    def __init__(self, followers: list):
        self.followers = followers

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [
            Variable("accepted_steps", ("dynamics", "time"), attrs={"long_name": "accepted integrator steps so far"}),
            Variable("rejected_steps", ("dynamics", "time"), attrs={"long_name": "rejected integrator steps so far (diffrax)"}),
            Variable("compile_seconds", ("dynamics", "time"), attrs={
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
        rows.put("accepted_steps", point.index, float(f.steps))
