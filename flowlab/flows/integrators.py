"""Integrators: every torchdiffeq method (``torchdiffeq:<method>``) and flowlab's fixed-step
``flowlab:rk4`` / ``flowlab:euler`` / ``flowlab:midpoint``.

All integrate interval by interval (``session.advance(t1)``), holding one state.  Adaptive
torchdiffeq methods keep their step size across intervals and return the state at ``t1`` from their
dense output (steps are not cut at recording times); flowlab's fixed-step methods step on the grid
t0 + k·dt and interpolate between grid points (or, with ``land = true``, cut each interval into
⌈Δt/dt⌉ equal steps so they land exactly on every recording time).

Failures become :class:`FlowStopped` with the reason: a non-finite state, a step-size underflow, or
more than ``max_steps`` steps (default 10 000) in one recording interval.

ReLU-type networks: the vector field is only piecewise smooth (a kink wherever a unit switches on
some example), so adaptive methods shrink their steps at every kink and can stall where the flow
slides along a kink; use a fixed-step method (``flowlab:rk4`` with ``dt``) for them.  Smooth
networks (tanh, GELU, softplus) integrate to rtol 1e-10 without trouble.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

from ..errors import ConfigError
from .base import Flow, FlowStopped, Hyper, Integrator, Ops
from .registry import INTEGRATORS

DEFAULT_RTOL = {torch.float64: 1e-7, torch.float32: 1e-5}
DEFAULT_MAX_STEPS = 10_000


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


def _torchdiffeq():
    try:
        import importlib

        _odeint_mod = importlib.import_module("torchdiffeq._impl.odeint")
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ConfigError("flows.integrator", "torchdiffeq:*", f"torchdiffeq is not installed ({exc})") from None
    return _odeint_mod


def _rows_rk_step(func, y0, f0, t0, dt, t1, tableau):
    """torchdiffeq's ``_runge_kutta_step`` with the stages stored as contiguous ROWS (stages, m).

    torchdiffeq keeps them as the last axis of an (m, stages) tensor and forms every stage as
    ``torch.sum(k[..., :i+1] * (β_i dt), dim=-1)``: a reduction along a strided axis of length ≤ 7,
    ~0.2 ms for m = 26k on this CPU, nine times a step.  The same sums as ``addmv`` over contiguous
    rows take ~0.02 ms.  Same tableau, same stage times and perturbations, the same arithmetic up to
    the order of the additions (round-off)."""
    from torchdiffeq._impl.misc import Perturb  # once per step; torchdiffeq is imported lazily

    t_dtype = y0.abs().dtype
    t0, dt, t1 = t0.to(t_dtype), dt.to(t_dtype), t1.to(t_dtype)
    k = torch.empty(len(tableau.alpha) + 1, y0.numel(), dtype=y0.dtype, device=y0.device)
    k[0] = f0
    yi = y0
    for i, (alpha_i, beta_i) in enumerate(zip(tableau.alpha, tableau.beta)):
        if alpha_i == 1.0:
            ti, perturb = t1, Perturb.PREV  # just before the end time, in case of discontinuities
        else:
            ti, perturb = t0 + alpha_i * dt, Perturb.NONE
        yi = torch.addmv(y0, k[:i + 1].T, beta_i * dt)
        k[i + 1] = func(ti, yi, perturb=perturb)
    if not (tableau.c_sol[-1] == 0 and (tableau.c_sol[:-1] == tableau.beta[-1]).all()):
        yi = torch.addmv(y0, k.T, dt * tableau.c_sol)
    return yi, k[-1], torch.mv(k.T, dt * tableau.c_error), k


_ROWS_SOLVERS: dict[type, type] = {}


def _rows_solver(cls: type) -> type:
    """``cls`` (a torchdiffeq adaptive RK solver) whose steps use :func:`_rows_rk_step`: its
    ``_adaptive_step`` is torchdiffeq's own code, run with ``_runge_kutta_step`` bound to ours (no
    global patching: other torchdiffeq users in the process are untouched); ``_interp_fit`` reads
    the stage rows."""
    from torchdiffeq._impl import rk_common

    base_cls = rk_common.RKAdaptiveStepsizeODESolver
    if not (issubclass(cls, base_cls) and cls._adaptive_step is base_cls._adaptive_step
            and cls._interp_fit is base_cls._interp_fit):
        return cls  # a solver with its own stepping or interpolation keeps torchdiffeq's code
    if cls not in _ROWS_SOLVERS:
        base = base_cls._adaptive_step
        step = types.FunctionType(base.__code__, {**rk_common.__dict__, "_runge_kutta_step": _rows_rk_step},
                                  base.__name__, base.__defaults__, base.__closure__)

        def _interp_fit(self, y0, y1, k, dt):
            dt = dt.type_as(y0)
            return rk_common._interp_fit(y0, y1, torch.addmv(y0, k.T, dt * self.mid), k[0], k[-1], dt)

        _ROWS_SOLVERS[cls] = type(f"Rows{cls.__name__}", (cls,), {"_adaptive_step": step, "_interp_fit": _interp_fit})
    return _ROWS_SOLVERS[cls]


class TorchdiffeqIntegrator(Integrator):
    """A torchdiffeq method: adaptive ones take rtol/atol (defaults 1e-7/1e-9 in float64, 1e-5/1e-7
    in float32), fixed-grid ones need ``dt``.  Options: ``max_steps`` (per recording interval) and
    any option of the torchdiffeq solver (``first_step``, ``max_step``, ``safety``...)."""

    method: str = "dopri5"

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 max_steps: int = DEFAULT_MAX_STEPS, **solver_options: Any):
        mod = _torchdiffeq()
        self.solver_cls = mod.SOLVERS[self.method]
        from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
        from torchdiffeq._impl.solvers import FixedGridODESolver

        self.adaptive = issubclass(self.solver_cls, RKAdaptiveStepsizeODESolver)
        self.fixed = issubclass(self.solver_cls, FixedGridODESolver)
        self.kind = "fixed" if self.fixed else "adaptive"
        if self.fixed and dt is None:
            raise ConfigError("flows.dt", None, f"torchdiffeq:{self.method} is a fixed-step method: give dt")
        if not isinstance(max_steps, int) or max_steps <= 0:
            raise ConfigError("flows.integrator_options.max_steps", max_steps, "expected a positive integer")
        self.rtol, self.atol, self.dt = rtol, atol, dt
        self.max_steps = max_steps
        self.solver_options = dict(solver_options)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"torchdiffeq:{self.method}"

    def tols(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol = self.rtol if self.rtol is not None else DEFAULT_RTOL.get(dtype, 1e-7)
        atol = self.atol if self.atol is not None else rtol * 1e-2
        return rtol, atol

    def start(self, flow, ops, hp, t0, state):
        return _TorchdiffeqSession(self, flow, ops, hp, float(t0), state)

    def tightened(self, factor: float = 10.0) -> TorchdiffeqIntegrator:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        if self.fixed:
            new.dt = self.dt / factor
        else:
            dtype = torch.float64
            rtol, atol = self.tols(dtype)
            new.rtol, new.atol = rtol / factor, atol / factor
        return new

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

    def _func(self):
        field = self

        def func(t, y):
            return field.field(t, y)

        return func

    def _start_adaptive(self, y0: torch.Tensor, t0: float) -> None:
        mod = _torchdiffeq()
        from torchdiffeq._impl.misc import _check_inputs

        options = dict(self.integ.solver_options, max_num_steps=self.integ.max_steps)
        t = torch.tensor([t0, t0 + 1.0], dtype=torch.float64, device=y0.device)
        _, func, y0, t, rtol, atol, method, options, _, _ = _check_inputs(
            self._func(), y0, t, self.rtol, self.atol, self.integ.method, options, None, mod.SOLVERS)
        counter = self

        def on_accept(t0_, y0_, dt_):
            counter.steps += 1

        func.callback_accept_step = on_accept
        cls = mod.SOLVERS[method]
        if y0.dim() == 1:
            cls = _rows_solver(cls)  # flat state: the stages as contiguous rows (same steps, faster sums)
        self.solver = cls(func=func, y0=y0, rtol=rtol, atol=atol, **options)
        try:
            with torch.no_grad():
                self.solver._before_integrate(t)
        except AssertionError as exc:
            raise FlowStopped(self._reason(exc)) from None

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
                    y = self.solver._advance(torch.tensor(t1, dtype=torch.float64, device=self.y.device))
                else:
                    y = self._advance_fixed(t1)
        except AssertionError as exc:
            raise FlowStopped(self._reason(exc)) from None
        self.t = t1
        _check_finite(y, t1, self.integ.name)
        self.y = y
        return self.state

    def _advance_fixed(self, t1: float) -> torch.Tensor:
        mod = _torchdiffeq()
        n = max(1, math.ceil((t1 - self.t) / self.integ.dt - 1e-9))
        options = dict(self.integ.solver_options, step_size=(t1 - self.t) / n)
        t = torch.tensor([self.t, t1], dtype=self.y.dtype, device=self.y.device)
        y = mod.odeint(self._func(), self.y, t, rtol=self.rtol, atol=self.atol, method=self.integ.method,
                       options=options)[-1]
        self.steps += n
        return y


def _register_torchdiffeq() -> None:
    try:
        mod = _torchdiffeq()
    except ConfigError:  # pragma: no cover
        return
    for method, solver in mod.SOLVERS.items():
        doc = f"torchdiffeq's {method} ({solver.__name__}); " + (
            "rtol/atol" if "Fixed" not in " ".join(c.__name__ for c in solver.__mro__) else "fixed step: dt")
        cls = type(f"Torchdiffeq_{method}", (TorchdiffeqIntegrator,), {"method": method, "__doc__": doc})
        INTEGRATORS.add(f"torchdiffeq:{method}", cls, doc)


_register_torchdiffeq()


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
    learning rate η).  ``land = false`` (default): steps of exactly dt on the grid t0 + k·dt, the
    state at a recording time between two grid points from cubic Hermite interpolation (O(dt⁴), with
    the derivative at the step's end, which is the next step's first stage: one evaluation more per
    interval at most); ``land = true``: each recording interval cut into ⌈Δt/dt⌉ equal steps, so
    every recording time is a step end.  ``check_every``: test the state for non-finite values every
    so many steps (0: at the end of each interval only; each test syncs a GPU)."""

    kind = "fixed"
    scheme = "rk4"

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 land: bool = False, check_every: int = 1):
        if rtol is not None or atol is not None:
            raise ConfigError("flows.rtol", rtol if rtol is not None else atol,
                              f"flowlab:{self.scheme} is a fixed-step method: give dt, not rtol/atol")
        if not isinstance(land, bool):
            raise ConfigError("flows.integrator_options.land", land, "expected true or false")
        if not isinstance(check_every, int) or check_every < 0:
            raise ConfigError("flows.integrator_options.check_every", check_every, "expected an integer >= 0")
        self.dt = dt
        self.land = land
        self.check_every = check_every
        self.a, self.b = TABLEAUX[self.scheme]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"flowlab:{self.scheme}"

    def start(self, flow, ops, hp, t0, state):
        return _FixedSession(self, flow, ops, hp, float(t0), state)

    def tightened(self, factor: float = 10.0) -> FixedStepIntegrator:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.dt = None if self.dt is None else self.dt / factor
        new._factor = getattr(self, "_factor", 1.0) * factor
        return new

    def describe(self) -> dict:
        return {"name": self.name, "dt": self.dt, "land": self.land}


class _FixedSession:
    def __init__(self, integ: FixedStepIntegrator, flow: Flow, ops: Ops, hp: Hyper, t0: float, state: tuple):
        self.integ, self.flow, self.ops, self.hp = integ, flow, ops, hp
        self.dt = integ.dt if integ.dt is not None else hp.lr / getattr(integ, "_factor", 1.0)
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
            if self.integ.land:
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


for _scheme in TABLEAUX:
    _cls = type(f"FixedStep_{_scheme}", (FixedStepIntegrator,), {
        "scheme": _scheme,
        "__doc__": f"flowlab's fixed-step {_scheme} (dt, default η; no autograd graph kept; dense output or land = true)",
    })
    INTEGRATORS.add(f"flowlab:{_scheme}", _cls)
