"""Flows in lock step with the discrete run: one :class:`FlowFollower` per ``[[flows]]`` entry.

The runner calls ``advance_to(t)`` then ``point(...)`` at every recording time t = Σ η_k; the
follower integrates its flow over the full-batch L_λ from the previous recording time to t (one
state in memory), and reports θ(t − s) (s: the flow's time shift, :mod:`flowlab.flows.base`), the
full-batch loss there and its evaluation counts.  With a learning-rate schedule the flow uses
η(t) = η_k on [t_k, t_{k+1}) and its integrator is restarted (from the current state) wherever η
changes.  A flow that blows up is stopped with the reason as its ``status``; the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..build import Built
from ..config import FlowSpec
from ..errors import ConfigError
from ..recording import Point, Recorder, Rows, RunContext, Variable
from .base import FlowStopped, Hyper
from .registry import make_flow, make_integrator


def hyper_of(built: Built, lr: float | None = None) -> Hyper:
    opt = built.study.optimizer
    return Hyper(lr=float(built.lrs[0] if lr is None else lr), weight_decay=float(opt.weight_decay),
                 momentum=float(opt.momentum))


class FlowFollower:
    """One flow integrated alongside the discrete run (the runner's ``Follower`` protocol)."""

    def __init__(self, spec: FlowSpec, built: Built, index: int = 0):
        section = f"flows[{index}]"
        options = dict(spec.options)
        integ_opts = options.pop("integrator_options", {})
        if not isinstance(integ_opts, Mapping):
            raise ConfigError(f"{section}.integrator_options", integ_opts, "expected a table of integrator options")
        self.spec = spec
        self.label = spec.label or f"{spec.name}@{spec.integrator}"
        self.flow = make_flow(spec.name, options, section=f"{section}.name")
        self.integrator = make_integrator(spec.integrator, spec.rtol, spec.atol, spec.dt, integ_opts,
                                          section=f"{section}.integrator")
        self.problem = built.problem
        opt = built.study.optimizer
        if getattr(self.flow, "discrete", "gd") == "heavy_ball" and (opt.nesterov or opt.dampening):
            raise ConfigError(f"{section}.name", spec.name, "momentum flows model heavy ball with dampening 0 "
                              "and no Nesterov; this study's optimizer differs")
        self.ops = self.integrator.make_ops(self.problem)
        self.lrs = np.asarray(built.lrs, dtype=np.float64)
        self.times = np.asarray(built.times, dtype=np.float64)
        self.built = built
        self.hp0 = hyper_of(built)
        self.shift = float(self.flow.time_shift(self.hp0))
        # discrete times where η changes (the integrator restarts there)
        change = np.flatnonzero(self.lrs[1:] != self.lrs[:-1]) + 1
        self.change_times = self.times[change] - self.shift
        self.status = "running"
        self.wall_seconds = 0.0
        self.session = None
        self.flow_time = 0.0
        self._nfe_before = 0
        self._steps_before = 0
        self._state0: tuple | None = None

    # ------------------------------------------------------------------ counts
    @property
    def nfe(self) -> int:
        return self._nfe_before + (self.session.nfe if self.session is not None else 0)

    @property
    def n_grad_evals(self) -> int:
        return int(self.ops.counts.get("grad", 0)) if hasattr(self.ops, "counts") else self.nfe

    @property
    def state(self) -> tuple:
        if self.session is not None:
            return self.session.state
        return self._initial()

    def _hp(self, flow_t: float) -> Hyper:
        k = int(np.searchsorted(self.times, flow_t + self.shift + 1e-12 * max(1.0, abs(flow_t)), side="right")) - 1
        k = min(max(k, 0), len(self.lrs) - 1)
        return self.hp0 if self.lrs[k] == self.hp0.lr else hyper_of(self.built, self.lrs[k])

    def _initial(self) -> tuple:
        if self._state0 is None:
            with torch.no_grad():
                self._state0 = tuple(self.flow.initial_state(self.problem.theta0.clone(), self.ops, self._hp(0.0)))
        return self._state0

    def _restart(self, t0: float, state: tuple) -> None:
        if self.session is not None:
            self._nfe_before += self.session.nfe
            self._steps_before += self.session.steps
        self.session = self.integrator.start(self.flow, self.ops, self._hp(t0), t0, state)

    # --------------------------------------------------------------- protocol
    def advance_to(self, t: float) -> None:
        if self.status != "running":
            return
        start = time.perf_counter()
        compiled = self._compile_seconds()
        try:
            if self.session is None:
                self._restart(0.0, self._initial())
            target = float(t) - self.shift
            while self.flow_time < target:
                later = self.change_times[self.change_times > self.flow_time + 1e-12 * max(1.0, target)]
                stop = min(target, float(later[0])) if later.size else target
                self.session.advance(stop)
                self.flow_time = stop
                if stop < target:
                    self._restart(stop, self.session.state)
        except FlowStopped as exc:
            self.status = f"{exc} (nfe={self.nfe})"
        finally:  # compile time (JAX integrators) is recorded apart, not as wall time
            self.wall_seconds += time.perf_counter() - start - (self._compile_seconds() - compiled)

    def _compile_seconds(self) -> float:
        stats = getattr(self.integrator, "stats", None)
        return float(stats.get("compile_seconds", 0.0)) if isinstance(stats, dict) else 0.0

    def point(self, index: int, step: int, t: float) -> Point:
        start = time.perf_counter()
        state = self.state
        theta = self.integrator.to_torch(self.flow.theta(state), self.problem.theta0)
        with torch.no_grad():
            loss = self.problem.full_loss(theta)
        velocity = (self.integrator.to_torch(state[1], self.problem.theta0)
                    if getattr(self.flow, "state_size", len(state)) > 1 else None)  # wrappers may append state
        self.wall_seconds += time.perf_counter() - start
        return Point(self.label, index, step, t, theta, loss, None, None, velocity=velocity,
                     extras={"nfe": self.nfe, "flow_time": self.flow_time, "full_loss": loss})

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "flow": self.spec.name, "order": self.flow.order, "time_shift": self.shift,
                "integrator": self.integrator.describe(), "options": self.flow.options()}


def build_followers(built: Built) -> list[FlowFollower]:
    return [FlowFollower(spec, built, i) for i, spec in enumerate(built.study.flows)]


class FlowStatsRecorder(Recorder):
    """``nfe`` (method, time): vector-field evaluations so far (for ``sgd``: gradient evaluations);
    ``flow_time`` (method, time): the flow's own time t − s at discrete time t (s: time shift)."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [
            Variable("nfe", ("method", "time"), attrs={"long_name": "function evaluations so far (sgd: gradient evaluations)"}),
            Variable("flow_time", ("method", "time"), attrs={
                "long_name": "the method's own time at discrete time t: t − s, s = the flow's time shift",
                "convention": "first-order momentum flows are recorded at t − ηβ/(1−β) (THEORY.md start-up note)"}),
        ]

    def record(self, rows: Rows, point: Point) -> None:
        if point.index == 0 and "nfe" not in point.extras:
            rows.put("nfe", 0, float(point.step + 1))
            rows.put("flow_time", 0, point.time)
            return
        rows.put("nfe", point.index, float(point.extras.get("nfe", np.nan)))
        rows.put("flow_time", point.index, float(point.extras.get("flow_time", np.nan)))


def flow_recorders(ctx: RunContext) -> list[Recorder]:
    return [FlowStatsRecorder()] if ctx.study.flows else []
