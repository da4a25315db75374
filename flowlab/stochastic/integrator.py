"""``flowlab:euler_maruyama`` — Itô Euler–Maruyama on a fixed grid, for stochastic flows (and plain
Euler for deterministic ones).

Each recording interval [t_a, t_b] is cut into ⌈(t_b − t_a)/dt⌉ equal steps (dt default: the
flow's ``step_size(hp)``, η for the SDEs, η/l for SVAG), so every recording time is a step end: an
SDE path has no interpolant.  Each step is the flow's ``step(t, state, ops, hp, h, noise)``; the
Brownian increments and batches come from the path's :class:`~flowlab.stochastic.noise.NoiseSource`
(``integrator.noise``, set by the follower from the study's seed).  Weak order 1 in h; weak order 2
by Talay–Tubaro extrapolation 2·E φ(X^{h/2}) − E φ(X^h) in the weak-error analysis
(``flowlab orders --weak``).  ``substeps = r`` draws each step's Brownian increment as the sum of r
increments of h/r: a path with step h and ``substeps = 2`` and a path with step h/2 and the same
``seed`` then follow the SAME Brownian path (coupled), so the extrapolation's variance is that of one
path, not five times it.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from ..flows.base import Flow, FlowStopped, Hyper, Integrator, Ops
from .noise import NoiseSource


class EulerMaruyama(Integrator):
    """Itô Euler–Maruyama with a fixed step ``dt`` (default: the flow's own step, η for an SDE)."""

    name = "flowlab:euler_maruyama"
    kind = "fixed"

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 seed: int | None = None, check_every: int = 1, substeps: int = 1):
        if rtol is not None or atol is not None:
            raise ConfigError("rtol" if rtol is not None else "atol", rtol if rtol is not None else atol,
                              "flowlab:euler_maruyama is a fixed-step method: give dt, not rtol/atol")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigError("integrator_options.seed", seed, "expected an integer >= 0")
        if not isinstance(check_every, int) or check_every < 0:
            raise ConfigError("integrator_options.check_every", check_every, "expected an integer >= 0")
        if not isinstance(substeps, int) or isinstance(substeps, bool) or substeps < 1:
            raise ConfigError("integrator_options.substeps", substeps, "expected an integer >= 1")
        self.dt, self.seed, self.check_every, self.substeps = dt, seed, check_every, substeps
        self.noise: NoiseSource | None = None

    def fixed_dt(self, hp: Hyper, flow: Any = None) -> float:
        if self.dt is not None:
            return self.dt
        size = getattr(flow, "step_size", None)
        base = size(hp) if size is not None else hp.lr
        return base / self.dt_divisor

    def start(self, flow: Flow, ops: Ops, hp: Hyper, t0: float, state: tuple) -> _EMSession:
        if self.noise is None:
            self.noise = NoiseSource(self.seed if self.seed is not None else 0)
        self.noise.substeps = self.substeps
        return _EMSession(self, flow, ops, hp, float(t0), state)

    def describe(self) -> dict:
        return {"name": self.name, "dt": self.dt, "seed": self.seed, "substeps": self.substeps}


class _EMSession:
    def __init__(self, integ: EulerMaruyama, flow: Flow, ops: Ops, hp: Hyper, t0: float, state: tuple):
        self.integ, self.flow, self.ops, self.hp = integ, flow, ops, hp
        self.dt = integ.fixed_dt(hp, flow)
        self.t = t0
        self.state = tuple(s.detach().clone() for s in state)
        self.nfe = 0
        self.steps = 0
        self.noise = integ.noise
        dev = state[0].device if isinstance(state[0], torch.Tensor) else "cpu"
        self.noise.device, self.noise.dtype = torch.device(dev), state[0].dtype
        self._step = getattr(flow, "step", None)
        # an ensemble's K paths (θ of shape (K, m)) stop one by one (their follower NaNs them): the
        # session stops only when no path is finite
        self.replicated = bool(getattr(ops, "replicated", False))

    def state_dict(self) -> dict:
        """Time, state, step and counts; the Brownian generator is the integrator's (saved by the
        follower once for all its sessions) — :mod:`flowlab.checkpoint`."""
        from ..checkpoint import attrs_state

        return attrs_state(self, ("t", "state", "nfe", "steps", "dt"))

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_attrs

        load_attrs(self, state)

    def _one(self, t: float, y: tuple, h: float) -> tuple:
        self.nfe += 1
        if self._step is not None:
            return tuple(self._step(t, y, self.ops, self.hp, h, self.noise))
        f = self.flow.vector_field(t, y, self.ops, self.hp)  # a deterministic flow: explicit Euler
        return tuple(x + h * d for x, d in zip(y, f))

    def advance(self, t1: float) -> tuple:
        t1 = float(t1)
        if t1 <= self.t:
            return self.state
        n = max(1, math.ceil((t1 - self.t) / self.dt - 1e-9))
        h = (t1 - self.t) / n
        y, t0 = self.state, self.t
        every = self.integ.check_every
        with torch.no_grad():
            for i in range(n):
                y = self._one(t0 + i * h, y, h)
                self.steps += 1
                if every and self.steps % every == 0:
                    _check(y, t0 + (i + 1) * h, self.replicated)
        _check(y, t1, self.replicated)
        self.state, self.t = y, t1
        return y


def _check(y: tuple, t: float, replicated: bool = False) -> None:
    """Raise :class:`FlowStopped` when the state is non-finite (``replicated``: when no path is finite)."""
    if replicated:
        alive = None
        for part in y:
            if isinstance(part, torch.Tensor) and part.dim() >= 2:
                ok = torch.isfinite(part).reshape(part.shape[0], -1).all(dim=1)
                alive = ok if alive is None else alive & ok
        if alive is not None and not bool(alive.any()):
            raise FlowStopped(f"non-finite state in every path at t={t:.6g} (flowlab:euler_maruyama)")
        return
    for part in y:
        if isinstance(part, torch.Tensor) and not bool(torch.isfinite(part).all()):
            raise FlowStopped(f"non-finite state at t={t:.6g} (flowlab:euler_maruyama)")
