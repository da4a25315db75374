"""Integrators: every torchdiffeq method (``torchdiffeq:<method>``) and flowlab's fixed-step
``flowlab:rk4`` / ``flowlab:euler`` / ``flowlab:midpoint``.

All integrate interval by interval (``session.advance(t1)``), holding one state.  Adaptive
torchdiffeq methods keep their step size across intervals and return the state at ``t1`` from their
dense output (steps are not cut at recording times); flowlab's fixed-step methods step on the grid
t0 + k·dt and interpolate between grid points (``land = "interpolate"``, the default) or, with
``land = "exact"``, cut each interval into ⌈Δt/dt⌉ equal steps so they land exactly on every
recording time (the same ``land`` modes as the ``diffrax:*`` integrators).

torchdiffeq's private internals (the adaptive sessions' fast path) are used only through
:mod:`flowlab.flows._torchdiffeq`, which checks the installed version and falls back to
torchdiffeq's public ``odeint`` (saying so once) where it does not recognise them.

Tolerances default to :func:`default_tolerances` (shared with the diffrax integrators).  Errors in
the options are :class:`ConfigError` with field paths relative to the flow's ``[[flows]]`` table
(``"dt"``, ``"rtol"``, ``"integrator_options.land"``...).

Failures become :class:`FlowStopped` with the reason: a non-finite state, a step-size underflow, or
more than ``max_steps`` steps (default 10 000) in one recording interval.

ReLU-type networks: the vector field is only piecewise smooth (a kink wherever a unit switches on
some example), so adaptive methods shrink their steps at every kink and can stall where the flow
slides along a kink; use a fixed-step method (``flowlab:rk4`` with ``dt``) for them.  Smooth
networks (tanh, GELU, softplus) integrate to rtol 1e-10 without trouble.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError, did_you_mean
from . import _torchdiffeq as _td
from .base import Flow, FlowStopped, Hyper, Integrator, Ops

#: default rtol by the state's dtype name (others: 1e-7); atol defaults to rtol/100
_DEFAULT_RTOL = {"float64": 1e-7, "float32": 1e-5}
DEFAULT_MAX_STEPS = 10_000
#: where a fixed step lands at a recording time (the diffrax integrators take the same modes)
LANDINGS = ("auto", "interpolate", "exact")


def dtype_name(dtype: Any) -> str:
    """``"float64"`` for torch.float64, a NumPy/JAX float64 dtype or scalar type, or ``"float64"``."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).rsplit(".", 1)[-1]
    if isinstance(dtype, str):
        return dtype
    try:
        import numpy as np

        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def default_tolerances(dtype: Any, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    """(rtol, atol) for a state of ``dtype`` (torch or JAX dtype, or its name): the given ones, else
    rtol 1e-7 in float64 (and other dtypes), 1e-5 in float32, and atol = rtol/100 (of the rtol in use).
    The one definition for every integrator (torchdiffeq's and diffrax's)."""
    rtol = rtol if rtol is not None else _DEFAULT_RTOL.get(dtype_name(dtype), 1e-7)
    atol = atol if atol is not None else rtol * 1e-2
    return rtol, atol


def landing(land: Any, default: str = "interpolate", aliases: bool = False) -> str:
    """``land`` resolved to ``"interpolate"`` or ``"exact"`` (``"auto"``: ``default``); with
    ``aliases``, the old booleans of flowlab's fixed-step integrators: true → "exact", false →
    "interpolate".  A :class:`ConfigError` on ``integrator_options.land`` otherwise."""
    if aliases and isinstance(land, bool):
        return "exact" if land else "interpolate"
    if not isinstance(land, str) or land not in LANDINGS:
        allowed = ", ".join(LANDINGS) + (" (or true = exact, false = interpolate)" if aliases else "")
        raise ConfigError("integrator_options.land", land, f"allowed: {allowed}")
    return default if land == "auto" else land


def _dtype_of(state: tuple) -> torch.dtype:
    return state[0].dtype


class _Field:
    """The flow's vector field on a flat torch state (θ, or θ and θ' — and any parts a wrapper
    appends, e.g. the theory's per-group law state — concatenated), counted."""

    def __init__(self, flow: Flow, ops: Ops, hp: Hyper, sizes: list[int]):
        self.flow, self.ops, self.hp = flow, ops, hp
        self.sizes, self.parts = list(sizes), len(sizes)
        self.nfe = 0
        self.nonfinite = 0

    def split(self, y: torch.Tensor) -> tuple:
        if self.parts == 1:
            return (y,)
        return tuple(y.split(self.sizes))

    def join(self, parts: tuple) -> torch.Tensor:
        if self.parts == 1:
            return parts[0]
        return torch.cat(parts)

    def __call__(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.join(self.flow.vector_field(t, self.split(y), self.ops, self.hp))
        return out


def _flat(state: tuple) -> torch.Tensor:
    if len(state) == 1:
        return state[0].detach().clone()
    return torch.cat([s.detach().reshape(-1) for s in state])


def _check_finite(y: torch.Tensor, t: float, name: str) -> None:
    if not bool(torch.isfinite(y).all()):
        raise FlowStopped(f"blew up: non-finite state at t={t:.6g} ({name})")


# --------------------------------------------------------------------------- torchdiffeq


class TorchdiffeqIntegrator(Integrator):
    """A torchdiffeq method: adaptive ones take rtol/atol (defaults 1e-7/1e-9 in float64, 1e-5/1e-7
    in float32: :func:`default_tolerances`), fixed-grid ones need ``dt``.  Options: ``max_steps`` (per recording interval) and any option of
    the torchdiffeq solver (``first_step``, ``max_step``, ``safety``...).  Adaptive sessions go
    through :mod:`flowlab.flows._torchdiffeq` (row-stage fast path on a tested torchdiffeq, else its
    public ``odeint`` per interval, said once)."""

    method: str = "dopri5"

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 max_steps: int = DEFAULT_MAX_STEPS, **solver_options: Any):
        kind = _td.methods().get(self.method)
        if kind is None:  # pragma: no cover - registered from the same table
            raise ConfigError("integrator", self.name, f"torchdiffeq {_td.version()} has no method {self.method!r}")
        self.kind = kind
        self.adaptive = kind == "adaptive"
        self.fixed = kind == "fixed"
        if self.fixed and dt is None:
            raise ConfigError("dt", None, f"torchdiffeq:{self.method} is a fixed-step method: give dt")
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise ConfigError("integrator_options.max_steps", max_steps, "expected a positive integer")
        allowed = _td.solver_options(self.method)
        managed = {"max_num_steps": "max_steps", "step_size": "dt"}  # set by flowlab from its own keys
        for key, value in solver_options.items():
            if allowed is not None and (key not in allowed or key in managed):
                names = sorted({"max_steps", *(allowed - set(managed))})
                hint = f"use {managed[key]}" if key in managed else did_you_mean(key, names)
                raise ConfigError(f"integrator_options.{key}", value,
                                  f"unknown option of torchdiffeq:{self.method}; allowed: {', '.join(names)}", hint)
        self.rtol, self.atol, self.dt = rtol, atol, dt
        self.max_steps = max_steps
        self.solver_options = dict(solver_options)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"torchdiffeq:{self.method}"

    def start(self, flow, ops, hp, t0, state):
        return _TorchdiffeqSession(self, flow, ops, hp, float(t0), state)

    def describe(self) -> dict:
        return {"name": self.name, "rtol": self.rtol, "atol": self.atol, "dt": self.dt, "max_steps": self.max_steps,
                **self.solver_options}


class _TorchdiffeqSession:
    def __init__(self, integ: TorchdiffeqIntegrator, flow: Flow, ops: Ops, hp: Hyper, t0: float, state: tuple):
        self.integ, self.flow, self.t = integ, flow, t0
        y0 = _flat(state)
        self.m = state[0].numel()
        self.field = _Field(flow, ops, hp, [s.numel() for s in state])
        self.y = y0
        self.steps = 0
        self.solver = None
        self.rtol, self.atol = integ.tols(y0.dtype)
        if integ.adaptive:
            self._start_adaptive(y0, t0)

    @property
    def nfe(self) -> int:
        return self.field.nfe

    @property
    def state(self) -> tuple:
        return self.field.split(self.y)

    def state_dict(self) -> dict:
        """Time, state, counts and the solver's own state (torchdiffeq's Runge–Kutta state: step
        size, FSAL stage, interpolation coefficients) — :mod:`flowlab.checkpoint`."""
        from ..checkpoint import pack

        out = {"t": self.t, "y": pack(self.y), "steps": self.steps, "nfe": self.field.nfe,
               "nonfinite": self.field.nonfinite}
        if self.solver is not None:
            out["solver"] = _td.solver_state(self.solver)
        return out

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import unpack

        self.t, self.y, self.steps = float(state["t"]), unpack(state["y"]), int(state["steps"])
        self.field.nfe, self.field.nonfinite = int(state["nfe"]), int(state["nonfinite"])
        if "solver" in state:
            _td.load_solver_state(self.solver, state["solver"])

    def _func(self):
        field = self

        def func(t, y):
            return field.field(t, y)

        return func

    def _count_step(self) -> None:
        self.steps += 1

    def _start_adaptive(self, y0: torch.Tensor, t0: float) -> None:
        options = dict(self.integ.solver_options, max_num_steps=self.integ.max_steps)
        try:
            with torch.no_grad():
                self.solver = _td.adaptive_solver(self._func(), y0, t0, rtol=self.rtol, atol=self.atol,
                                                  method=self.integ.method, options=options,
                                                  on_accept=self._count_step)
        except AssertionError as exc:
            raise FlowStopped(self._reason(exc)) from None

    @property
    def fast(self) -> bool | None:
        """Adaptive: whether the row-stage fast path is in use (None for fixed-grid methods)."""
        return None if self.solver is None else self.solver.fast

    def _reason(self, exc: BaseException) -> str:
        msg = str(exc)
        where = f"at t={self.t:.6g}"
        if "max_num_steps" in msg:
            return f"stopped: more than max_steps={self.integ.max_steps} steps in one interval {where}"
        if "underflow" in msg:
            return f"blew up: step size underflow {where}"
        if "non-finite" in msg:
            return f"blew up: non-finite state {where}"
        return f"failed {where}: {msg.splitlines()[0][:200]}"

    def advance(self, t1: float) -> tuple:
        t1 = float(t1)
        if t1 <= self.t:
            return self.state
        try:
            with torch.no_grad():
                if self.solver is not None:
                    y = self.solver.advance(t1)
                else:
                    y = self._advance_fixed(t1)
        except AssertionError as exc:
            raise FlowStopped(self._reason(exc)) from None
        self.t = t1
        _check_finite(y, t1, self.integ.name)
        self.y = y
        return self.state

    def _advance_fixed(self, t1: float) -> torch.Tensor:
        n = max(1, math.ceil((t1 - self.t) / self.integ.dt - 1e-9))
        options = dict(self.integ.solver_options, step_size=(t1 - self.t) / n)
        t = torch.tensor([self.t, t1], dtype=self.y.dtype, device=self.y.device)
        y = _td.odeint(self._func(), self.y, t, rtol=self.rtol, atol=self.atol, method=self.integ.method,
                       options=options)[-1]
        self.steps += n
        return y


def _torchdiffeq_integrators() -> dict[str, type]:
    out = {}
    for method, kind in _td.methods().items():
        doc = f"torchdiffeq's {method}; " + ("rtol/atol" if kind == "adaptive" else "fixed step: dt")
        out[f"torchdiffeq:{method}"] = type(f"Torchdiffeq_{method}", (TorchdiffeqIntegrator,),
                                            {"method": method, "__doc__": doc})
    return out


# -------------------------------------------------------------------------- fixed step

# Butcher tableaux of explicit methods: (a rows, b weights)
TABLEAUX = {
    "euler": ((), (1.0,)),
    "midpoint": (((0.5,),), (0.0, 1.0)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


def _axpy(y: tuple, terms: list) -> tuple:
    """y + Σ c_j k_j, part by part (the first term fused with the copy: no separate clone)."""
    out = []
    for p, part in enumerate(y):
        c0, k0 = terms[0]
        acc = torch.add(part, k0[p], alpha=c0)
        for c, k in terms[1:]:
            acc.add_(k[p], alpha=c)
        out.append(acc)
    return tuple(out)


class FixedStepIntegrator(Integrator):
    """flowlab's explicit fixed-step Runge–Kutta, in the problem's own device tensors under
    ``torch.no_grad`` (no autograd graph kept).  ``dt``: the step (default: the discrete run's
    learning rate η).  ``land = "interpolate"`` (the default, = ``"auto"``): steps of exactly dt on
    the grid t0 + k·dt, the state at a recording time between two grid points from cubic Hermite
    interpolation (O(dt⁴), with the derivative at the step's end, which is the next step's first
    stage: one evaluation more per interval at most); ``land = "exact"``: each recording interval
    cut into ⌈Δt/dt⌉ equal steps, so every recording time is a step end.  The old booleans are
    accepted: true = "exact", false = "interpolate".  ``check_every``: test the state for non-finite
    values every so many steps (0: at the end of each interval only; each test syncs a GPU)."""

    kind = "fixed"
    scheme = "rk4"

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 land: str | bool = "auto", check_every: int = 1):
        if rtol is not None or atol is not None:
            raise ConfigError("rtol" if rtol is not None else "atol", rtol if rtol is not None else atol,
                              f"flowlab:{self.scheme} is a fixed-step method: give dt, not rtol/atol")
        land = landing(land, "interpolate", aliases=True)
        if not isinstance(check_every, int) or check_every < 0:
            raise ConfigError("integrator_options.check_every", check_every, "expected an integer >= 0")
        self.dt = dt
        self.land = land
        self.check_every = check_every
        self.a, self.b = TABLEAUX[self.scheme]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"flowlab:{self.scheme}"

    def start(self, flow, ops, hp, t0, state):
        return _FixedSession(self, flow, ops, hp, float(t0), state)

    def describe(self) -> dict:
        return {"name": self.name, "dt": self.dt, "land": self.land}


class _FixedSession:
    def __init__(self, integ: FixedStepIntegrator, flow: Flow, ops: Ops, hp: Hyper, t0: float, state: tuple):
        self.integ, self.flow, self.ops, self.hp = integ, flow, ops, hp
        self.dt = integ.fixed_dt(hp)
        self.t = t0  # the time of ``state``
        self.state = tuple(s.detach().clone() for s in state)
        # dense mode: the last step [ta, tb] with states and derivatives at both ends
        self.ta = self.tb = t0
        self.ya = self.yb = self.state
        self.fa: tuple | None = None
        self.fb: tuple | None = None
        self.t_start, self.k = t0, 0
        self.nfe = 0
        self.steps = 0

    STATE = ("t", "state", "ta", "tb", "ya", "yb", "fa", "fb", "t_start", "k", "nfe", "steps", "dt")

    def state_dict(self) -> dict:
        """The grid (t_start, k, dt), the dense-output ends and the counts (:mod:`flowlab.checkpoint`)."""
        from ..checkpoint import attrs_state

        return attrs_state(self, self.STATE)

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_attrs

        load_attrs(self, state)

    def _f(self, t: float, y: tuple) -> tuple:
        self.nfe += 1
        return self.flow.vector_field(t, y, self.ops, self.hp)

    @torch.no_grad()
    def _step(self, t: float, y: tuple, h: float, k1: tuple | None = None) -> tuple:
        a, b = self.integ.a, self.integ.b
        ks: list[tuple] = []
        for i in range(len(b)):
            if i == 0:
                ks.append(k1 if k1 is not None else self._f(t, y))
                continue
            yi = _axpy(y, [(h * aij, ks[j]) for j, aij in enumerate(a[i - 1]) if aij])
            ks.append(self._f(t + sum(a[i - 1]) * h, yi))
        new = _axpy(y, [(h * bi, k) for bi, k in zip(b, ks) if bi])
        self.steps += 1
        every = self.integ.check_every
        if every and self.steps % every == 0:
            for part in new:
                _check_finite(part, t + h, self.integ.name)
        return new

    def advance(self, t1: float) -> tuple:
        t1 = float(t1)
        if t1 <= self.t:
            return self.state
        with torch.no_grad():
            if self.integ.land == "exact":
                n = max(1, math.ceil((t1 - self.t) / self.dt - 1e-9))
                h = (t1 - self.t) / n
                y, t0 = self.state, self.t
                for i in range(n):
                    y = self._step(t0 + i * h, y, h)
                self.state = y
            else:
                self.state = self._dense(t1)
        for part in self.state:
            _check_finite(part, t1, self.integ.name)
        self.t = t1
        return self.state

    def _dense(self, t1: float) -> tuple:
        while self.tb < t1 - 1e-12 * max(1.0, abs(t1)):
            k1 = self.fb if self.fb is not None else self._f(self.tb, self.yb)
            y = self._step(self.tb, self.yb, self.t_start + (self.k + 1) * self.dt - self.tb, k1)
            self.ta, self.ya, self.fa = self.tb, self.yb, k1
            self.k += 1
            self.tb = self.t_start + self.k * self.dt
            self.yb, self.fb = y, None
        if abs(t1 - self.tb) <= 1e-12 * max(1.0, abs(t1)):
            return self.yb
        if self.fb is None:  # the next step's first stage, needed by the interpolant
            self.fb = self._f(self.tb, self.yb)
        h = self.tb - self.ta
        s = (t1 - self.ta) / h
        h00, h10 = (1 + 2 * s) * (1 - s) ** 2, s * (1 - s) ** 2
        h01, h11 = s * s * (3 - 2 * s), s * s * (s - 1)
        return tuple(h00 * ya + (h10 * h) * fa + h01 * yb + (h11 * h) * fb
                     for ya, fa, yb, fb in zip(self.ya, self.fa, self.yb, self.fb))


def _fixed_step_integrators() -> dict[str, type]:
    return {f"flowlab:{scheme}": type(f"FixedStep_{scheme}", (FixedStepIntegrator,), {
        "scheme": scheme,
        "__doc__": f"flowlab's fixed-step {scheme} (dt, default η; no autograd graph kept; land = interpolate | exact)",
    }) for scheme in TABLEAUX}


_BUILTIN: dict[str, type] = {**_torchdiffeq_integrators(), **_fixed_step_integrators()}


def builtin_integrators() -> dict[str, type]:
    """name → Integrator class: every torchdiffeq method (``torchdiffeq:<method>``) and flowlab's
    fixed-step ``flowlab:<scheme>`` (the flows part's entries of the ``integrators`` registry)."""
    return dict(_BUILTIN)
