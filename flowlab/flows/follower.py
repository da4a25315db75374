"""Flows in lock step with the discrete run: one :class:`FlowFollower` per continuous model.

The lock-step engine (:mod:`flowlab.engine`) calls ``advance_to(t)`` then ``point(...)`` at every
recording time t = Σ η_k; the follower integrates its flow over the full-batch L_λ from the previous
recording time to t (one state in memory), and reports θ(t − s) (s: the flow's time shift,
:mod:`flowlab.flows.base`), the full-batch loss there and its evaluation counts.  With a
learning-rate schedule the flow uses η(t) = η_k on [t_k, t_{k+1}) and its integrator is restarted
(from the current state) wherever η changes.  A flow that blows up is stopped with the reason and
the time as its ``status``; the run goes on (also when the discrete run diverges: the flow follows
the clock to its end).  An ensemble's paths (θ of shape (K, m)) stop one by one: a path whose state
is non-finite at a recording time is NaN from there (``path_stops``), the others go on.

A follower is built from a flow and an integrator — objects (:class:`Continuous`, the Python API)
or names from a study's ``[[flows]]`` (:meth:`FlowFollower.from_spec`) — and, where the run
records symmetry laws, with the flow composed with its own law (the theory part's ``laws``
service) before anything is integrated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..recording import Point, Recorder, Rows, RunContext, Variable
from .base import Flow, FlowStopped, Hyper, Integrator
from .config import FlowSpec, default_label
from .registry import check_flow, make_flow, make_integrator


@dataclass(frozen=True)
class Continuous:
    """A continuous model given as objects: ``Continuous(GradientFlow(), integrator("flowlab:rk4",
    dt=0.05), label="gf")`` (``flowlab.run(study, flows=[...])``; a ``(flow, integrator)`` pair is
    read the same way)."""

    flow: Flow
    integrator: Integrator
    label: str = ""

    @classmethod
    def of(cls, obj: Any, index: int = 0) -> Continuous:
        if isinstance(obj, Continuous):
            return obj
        if isinstance(obj, tuple) and len(obj) in (2, 3):
            return cls(*obj)
        raise ConfigError(f"flows.{index}", obj, "expected flowlab.flows.Continuous(flow, integrator, label) "
                          "or a (flow, integrator) pair")


def hyper_of(opt: Any, lr: float) -> Hyper:
    """The :class:`Hyper` of a study's ``[optimizer]`` at learning rate ``lr``."""
    bs = None if opt.batch_size in (None, "full") else int(opt.batch_size)
    return Hyper(float(lr), float(opt.weight_decay), float(opt.momentum), bs, str(opt.sampling))


class FlowFollower:
    """One flow integrated alongside the discrete run (the engine's ``Dynamics`` protocol).

    ``lrs``: the discrete run's learning rates η_k (the flow's η(t) follows them); ``times``: its
    times t_k (default Σ η); ``shifted``: record at t with flow time t − s (False: no time shift,
    for a flow alone); ``full_loss``: evaluate the full-batch loss at every point."""

    def __init__(self, flow: Flow, integrator: Integrator, problem: Any, lrs: Sequence[float], *,
                 weight_decay: float = 0.0, momentum: float = 0.0, label: str = "", times: Sequence[float] | None = None,
                 shifted: bool = True, full_loss: bool = True, batch_size: int | None = None,
                 sampling: str = "reshuffle"):
        self.flow, self.integrator, self.problem = flow, integrator, problem
        self.label = label or default_label(getattr(flow, "name", type(flow).__name__), integrator)
        self.ops = integrator.make_ops(problem)
        self.lrs = np.asarray(lrs, dtype=np.float64).reshape(-1)
        self.times = (np.concatenate([[0.0], np.cumsum(self.lrs)]) if times is None
                      else np.asarray(times, dtype=np.float64))
        self.weight_decay, self.momentum = float(weight_decay), float(momentum)
        self.batch_size = None if batch_size in (None, "full") else int(batch_size)
        self.sampling = sampling
        self.hp0 = self.hyper(float(self.lrs[0]))
        self.shift = float(flow.time_shift(self.hp0)) if shifted else 0.0
        # discrete times where η changes (the integrator restarts there)
        change = np.flatnonzero(self.lrs[1:] != self.lrs[:-1]) + 1
        self.change_times = self.times[change] - self.shift
        self.with_loss = full_loss
        self.status = "running"
        self.wall_seconds = 0.0
        self.seed: int | None = None  # a stochastic flow's path seed
        self.samples = 1  # paths integrated at once (an ensemble's K)
        #: an ensemble's paths that turned non-finite (path → (why, step, time)); NaN from there on
        self.path_stops: dict[int, tuple[str, int, float]] = {}
        self.session: Any = None
        self.flow_time = 0.0
        self._nfe_before = 0
        self._steps_before = 0
        self._state0: tuple | None = None
        self._session_t0 = 0.0

    @classmethod
    def from_spec(cls, spec: FlowSpec, built: Any, index: int = 0, laws: Any = None) -> FlowFollower:
        """The follower of a study's ``[[flows]]`` entry ``index`` (names resolved against the study's
        parts; errors name ``flows.INDEX.key``)."""
        section = f"flows.{index}"
        study = built.study
        flow = make_flow(spec.name, spec.flow_options, section, registry=study.registry("flows"))
        integ = make_integrator(spec.integrator, spec.rtol, spec.atol, spec.dt, spec.integrator_options, section,
                                registry=study.registry("integrators"))
        return cls.for_run(flow, integ, built, spec.label, section, laws)

    @classmethod
    def for_run(cls, flow: Flow, integrator: Integrator, built: Any, label: str = "", section: str = "flows",
                laws: Any = None) -> FlowFollower:
        """A follower of ``built``'s discrete run (its learning rates, weight decay and momentum),
        its flow composed with its law when ``laws`` (the theory part's service) is given."""
        check_flow(flow, f"{section}.name", flow)
        opt = built.study.optimizer
        if getattr(flow, "discrete", "gd") == "heavy_ball" and (opt.nesterov or opt.dampening):
            raise ConfigError(f"{section}.name", getattr(flow, "name", flow), "momentum flows model heavy ball with "
                              "dampening 0 and no Nesterov; this study's optimizer differs")
        hp0 = hyper_of(opt, float(built.lrs[0]))
        label = label or default_label(getattr(flow, "name", type(flow).__name__), integrator)
        seed = None
        if getattr(flow, "stochastic", False):
            from ..seeds import derive_seed
            from ..stochastic.noise import NoiseSource

            flow.check(hp0, built.problem, section)
            if not hasattr(integrator, "noise"):
                raise ConfigError(f"{section}.integrator", getattr(integrator, "name", integrator),
                                  f"{getattr(flow, 'name', flow)} is stochastic: integrate it with flowlab:euler_maruyama "
                                  "(torch) or diffrax:Euler (JAX)")
            try:  # what only the pair can tell (SVAG's fixed step, diffrax's torch-only options)
                if hasattr(flow, "check_integrator"):
                    flow.check_integrator(integrator, hp0, section)
                if hasattr(integrator, "check_flow"):
                    integrator.check_flow(flow)
            except ConfigError as exc:
                raise exc if exc.field.startswith(section) else exc.within(section) from None
            if getattr(integrator, "backend", "torch") != "torch":
                laws = None  # the Itô law is stepped with the torch path only (docs/theory.md#symmetry-under-noise)
            seed = integrator.seed if getattr(integrator, "seed", None) is not None else \
                derive_seed(built.study.study.seed, label)
            integrator.noise = NoiseSource(seed, built.problem.device, built.problem.dtype)
        check_run = getattr(flow, "check_run", None)
        if check_run is not None:  # what only the flow, its integrator and the run together can tell
            try:
                check_run(integrator, hp0, built.problem, section)
            except ConfigError as exc:
                raise exc if exc.field.startswith(section) else exc.within(section) from None
        if laws is not None:
            flow = laws.compose(flow, hp0, label)
        try:  # the integrator's ops (a JAX twin of the model for diffrax) are made here
            out = cls(flow, integrator, built.problem, built.lrs, weight_decay=opt.weight_decay,
                      momentum=opt.momentum, label=label, batch_size=hp0.batch_size, sampling=opt.sampling)
            out.seed = seed
            if seed is not None:
                out.replicate(built.study, section)
            return out
        except ConfigError as exc:
            raise exc if exc.field.startswith(section) else exc.within(section) from None

    def replicate(self, study: Any, section: str = "flows") -> None:
        """In an ensemble (``[ensemble] size = K``), integrate K paths of this stochastic flow at once:
        θ of shape (K, m), the ops vectorised over the paths
        (:class:`~flowlab.stochastic.ensemble.EnsembleOps`)."""
        from ..stochastic.ensemble_config import ensemble_size

        K = ensemble_size(study)
        if K <= 1:
            return
        if getattr(self.integrator, "backend", "torch") != "torch":
            raise ConfigError(f"{section}.integrator", self.integrator.name, "an ensemble of stochastic paths "
                              "runs on torch: use flowlab:euler_maruyama (JAX samples: flowlab.jaxbackend.sample_paths)")
        from ..stochastic.ensemble import EnsembleOps

        self.samples = K
        self.ops = EnsembleOps(self.problem, study.sections["ensemble"].vectorise)

    # ------------------------------------------------------------------ counts
    def hyper(self, lr: float) -> Hyper:
        return Hyper(lr=float(lr), weight_decay=self.weight_decay, momentum=self.momentum,
                     batch_size=self.batch_size, sampling=self.sampling)

    @property
    def nfe(self) -> int:
        return self._nfe_before + (self.session.nfe if self.session is not None else 0)

    @property
    def steps(self) -> int:
        """Accepted integrator steps over every session."""
        return self._steps_before + (int(getattr(self.session, "steps", 0)) if self.session is not None else 0)

    @property
    def n_grad_evals(self) -> int:
        counts = getattr(self.ops, "counts", None)
        return int(counts.get("grad", 0)) if isinstance(counts, dict) else self.nfe

    @property
    def state(self) -> tuple:
        if self.session is not None:
            return self.session.state
        return self._initial()

    def _hp(self, flow_t: float) -> Hyper:
        k = int(np.searchsorted(self.times, flow_t + self.shift + 1e-12 * max(1.0, abs(flow_t)), side="right")) - 1
        k = min(max(k, 0), len(self.lrs) - 1)
        return self.hp0 if self.lrs[k] == self.hp0.lr else self.hyper(self.lrs[k])

    def _initial(self) -> tuple:
        if self._state0 is None:
            with torch.no_grad():
                theta0 = self.problem.theta0.clone()
                if self.samples > 1:
                    theta0 = theta0.expand(self.samples, -1).clone()
                self._state0 = tuple(self.flow.initial_state(theta0, self.ops, self._hp(0.0)))
        return self._state0

    def _restart(self, t0: float, state: tuple) -> None:
        if self.session is not None:
            self._nfe_before += self.session.nfe
            self._steps_before += int(getattr(self.session, "steps", 0))
        self.session = self.integrator.start(self.flow, self.ops, self._hp(t0), t0, state)
        self._session_t0 = float(t0)

    # ------------------------------------------------------------- checkpoint
    STATE = ("status", "wall_seconds", "flow_time", "_nfe_before", "_steps_before", "path_stops")

    def state_dict(self) -> dict:
        """Status, time and counts; the session (with the time it was started at, and its state
        there rebuilt on resume by the same integrator), the ops' evaluation counts, the
        integrator's statistics and Brownian generator (:mod:`flowlab.checkpoint`)."""
        from ..checkpoint import attrs_state, pack

        out = attrs_state(self, self.STATE)
        if self.session is not None:
            if not hasattr(self.session, "state_dict"):
                raise RuntimeError(f"checkpoint: the session of {self.integrator.name} cannot be checkpointed")
            out["session"] = {"t0": self._session_t0, "state": self.session.state_dict()}
        counts = getattr(self.ops, "counts", None)
        if isinstance(counts, dict):
            out["ops_counts"] = dict(counts)
        if hasattr(self.ops, "state_dict") and hasattr(self.ops, "load_state_dict"):
            out["ops"] = self.ops.state_dict()
        stats = getattr(self.integrator, "stats", None)
        if isinstance(stats, dict):
            out["integrator_stats"] = pack(dict(stats))
        noise = getattr(self.integrator, "noise", None)
        if noise is not None and getattr(noise, "generator", None) is not None:
            out["noise_generator"] = pack(noise.generator)
        flow = _stateful(self.flow)
        if flow is not None:
            out["flow"] = flow.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_attrs, unpack

        state = dict(state)
        session = state.pop("session", None)
        counts = state.pop("ops_counts", None)
        stats = state.pop("integrator_stats", None)
        gen = state.pop("noise_generator", None)
        flow_state = state.pop("flow", None)
        ops_state = state.pop("ops", None)
        load_attrs(self, state)
        if ops_state is not None:  # the ops' computation paths, before anything evaluates
            self.ops.load_state_dict(ops_state)
        if session is not None:
            saved = session["state"]
            t0 = float(session["t0"])
            # the session is rebuilt at the time it was started at, from its saved state (a placeholder
            # the saved state replaces), then given its saved solver state
            placeholder = self._placeholder(saved)
            self.session = self.integrator.start(self.flow, self.ops, self._hp(t0), t0, placeholder)
            self._session_t0 = t0
            self.session.load_state_dict(saved)
        if isinstance(counts, dict) and isinstance(getattr(self.ops, "counts", None), dict):
            self.ops.counts.clear()
            self.ops.counts.update({k: int(v) for k, v in counts.items()})
        if stats is not None and isinstance(getattr(self.integrator, "stats", None), dict):
            self.integrator.stats.clear()
            self.integrator.stats.update(unpack(stats))
        if gen is not None:
            unpack(gen, self.integrator.noise.generator)
        if flow_state is not None:  # a flow with state of its own (the central flow's eigen-tracker)
            self._initial()  # the flow has seen its ops and hyperparameters
            _stateful(self.flow).load_state_dict(flow_state)
        if isinstance(counts, dict) and isinstance(getattr(self.ops, "counts", None), dict):
            self.ops.counts.clear()  # after the flow's own restoring, which may evaluate
            self.ops.counts.update({k: int(v) for k, v in counts.items()})

    def _placeholder(self, saved: dict) -> tuple:
        """A state to start a session with before its saved state is loaded: the initial state."""
        return self._initial()

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
            if self.samples > 1:
                self._stop_paths(float(t))
        except FlowStopped as exc:
            self.status = f"{exc} (nfe={self.nfe})"
        finally:  # compile time (JAX integrators) is recorded apart, not as wall time
            self.wall_seconds += time.perf_counter() - start - (self._compile_seconds() - compiled)

    def _stop_paths(self, t: float) -> None:
        """An ensemble's paths whose state is non-finite at (discrete) time t stop: NaN from here on,
        the others go on (the engine lists them in the status)."""
        state = self.session.state
        alive = None
        for part in state:
            if isinstance(part, torch.Tensor) and part.dim() >= 2 and part.shape[0] == self.samples:
                ok = torch.isfinite(part).reshape(self.samples, -1).all(dim=1)
                alive = ok if alive is None else alive & ok
        if alive is None or bool(alive.all()):
            return
        dead = (~alive).nonzero().flatten().tolist()
        fresh = [s for s in dead if s not in self.path_stops]
        if not fresh:
            return
        k = int(np.searchsorted(self.times, t))  # the recording step of time t (the run's clock)
        for s in fresh:
            self.path_stops[s] = ("non-finite state", k, t)
        idx = torch.tensor(fresh, device=state[0].device)
        with torch.no_grad():
            for part in state:
                if isinstance(part, torch.Tensor) and part.dim() >= 2 and part.shape[0] == self.samples:
                    part[idx] = math.nan

    def _compile_seconds(self) -> float:
        stats = getattr(self.integrator, "stats", None)
        return float(stats.get("compile_seconds", 0.0)) if isinstance(stats, dict) else 0.0

    def point(self, index: int, step: int, t: float) -> Point:
        start = time.perf_counter()
        state = self.state
        like = self.problem.theta0
        theta = self.integrator.to_torch(self.flow.theta(state), like)
        loss = None
        if self.with_loss:
            with torch.no_grad():
                loss = self.problem.full_loss(theta) if theta.dim() == 1 else self.ops.loss(theta)
        get_velocity = getattr(self.flow, "velocity", None)
        v = get_velocity(state) if get_velocity is not None else (state[1] if self.flow.state_size > 1 else None)
        velocity = self.integrator.to_torch(v, like) if v is not None else None
        observe = getattr(self.flow, "observe", None)
        extras = observe(state) if observe is not None else {}
        self.wall_seconds += time.perf_counter() - start
        return Point(self.label, index, step, t, theta, loss, None, None, velocity=velocity, nfe=float(self.nfe),
                     flow_time=self.flow_time, full_loss=loss, extras=extras)

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "flow": getattr(self.flow, "name", type(self.flow).__name__),
                "order": self.flow.order, "time_shift": self.shift, "integrator": self.integrator.describe(),
                "options": self.flow.options()}


def _stateful(flow: Any) -> Any:
    """The flow (or the flow inside a law composition) that keeps state of its own, or None."""
    for f in (flow, getattr(flow, "inner", None)):
        if f is not None and hasattr(f, "state_dict") and hasattr(f, "load_state_dict"):
            return f
    return None


def build_followers(setup: Any, laws: Any = None) -> list[FlowFollower]:
    """The followers of a run: its study's ``[[flows]]``, then the flows given as objects."""
    built = setup.built
    out = [FlowFollower.from_spec(spec, built, i, laws) for i, spec in enumerate(built.study.flows)]
    n = len(out)
    for j, obj in enumerate(setup.flows):
        c = Continuous.of(obj, n + j)
        out.append(FlowFollower.for_run(c.flow, c.integrator, built, c.label, f"flows.{n + j}", laws))
    return out


class _KeepTheta(Recorder):
    def __init__(self):
        self.thetas: list[torch.Tensor] = []

    def record(self, rows: Rows, point: Point) -> None:
        self.thetas.append(point.theta.detach().clone())


def follow(flow: Flow, integrator: Integrator, problem: Any, hp: Hyper, times: Sequence[float]) -> tuple[Any, Any]:
    """``Integrator.trajectory``: ``flow`` alone from θ0 to each of ``times`` (no time shift)."""
    from ..engine import drive

    follower = FlowFollower(flow, integrator, problem, [hp.lr], weight_decay=hp.weight_decay, momentum=hp.momentum,
                            shifted=False, full_loss=False, batch_size=hp.batch_size, sampling=hp.sampling)
    keep = _KeepTheta()
    drive([follower], times, [keep], problem.device)
    if follower.status != "ok":
        raise FlowStopped(follower.status)
    return torch.stack(keep.thetas), follower.session


class FlowStatsRecorder(Recorder):
    """``nfe`` (dynamics, time): vector-field evaluations so far (for ``sgd``: gradient evaluations);
    ``flow_time`` (dynamics, time): the flow's own time t − s at discrete time t (s: time shift)."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [
            Variable("nfe", ("dynamics", "time"), attrs={"long_name": "function evaluations so far (sgd: gradient evaluations)"}),
            Variable("flow_time", ("dynamics", "time"), attrs={
                "long_name": "the dynamics' own time at discrete time t: t − s, s = the flow's time shift",
                "convention": "first-order momentum flows are recorded at t − ηβ/(1−β) (docs/theory.md, time shift)"}),
        ]

    def record(self, rows: Rows, point: Point) -> None:
        if point.nfe is None:  # the discrete run: one gradient per update, recorded before update k
            rows.put("nfe", point.index, float(point.step + 1))
            rows.put("flow_time", point.index, point.time)
            return
        rows.put("nfe", point.index, point.nfe)
        rows.put("flow_time", point.index, float(point.flow_time if point.flow_time is not None else np.nan))
