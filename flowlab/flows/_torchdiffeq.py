"""The one place where flowlab touches torchdiffeq's private internals (``torchdiffeq._impl``).

flowlab's adaptive torchdiffeq sessions integrate interval by interval with ONE solver object that
keeps its step size, FSAL stage and dense output across recording intervals, and they keep the
Runge–Kutta stages as contiguous rows (``addmv``) instead of torchdiffeq's strided last-axis sums
(~10x faster per stage sum on a large state; the same steps, states to round-off).  Both need
torchdiffeq's private machinery (``_check_inputs``, ``Perturb``, ``SOLVERS``, the solver's
``_before_integrate`` / ``_advance`` / ``_adaptive_step`` / ``_interp_fit``, ``rk_common``'s
``_runge_kutta_step`` and ``_interp_fit``), which a torchdiffeq release may change without notice.
So that use is confined here and guarded:

- the fast path is taken only on a torchdiffeq version in :data:`TESTED_RANGE` (the versions the
  conformance test ``tests/test_torchdiffeq_guard.py`` was run against) whose private names are all
  present with the expected shape (``_runge_kutta_step``'s and ``_interp_fit``'s signatures, the
  Butcher tableau's fields, a solver class that inherits ``_adaptive_step`` and ``_interp_fit``
  unchanged from ``RKAdaptiveStepsizeODESolver``);
- otherwise (:func:`fast_path_problem` says why) a session uses torchdiffeq's PUBLIC API:
  ``torchdiffeq.odeint`` from the session's time and state to ``t1``, one call per recording
  interval, with the same rtol/atol/method/options.  Each such call starts afresh (initial-step
  heuristic; no step size carried over), so step placement, hence the states, may differ slightly
  from the fast path (within the tolerances).  This is said ONCE per process and reason, with a
  :class:`FallbackWarning`.

Interface (all that :mod:`flowlab.flows.integrators` uses):

``methods() -> {method: kind}``
    torchdiffeq's method names, kind ``"adaptive"`` (rtol/atol) or ``"fixed"`` (a step size).
``adaptive_solver(func, y0, t0, rtol=, atol=, method=, options=, on_accept=) -> solver``
    an adaptive solver holding one flat state at ``t0``; ``solver.advance(t1)`` returns the state at
    ``t1`` (dense output; steps are not cut at ``t1``); ``solver.fast`` says which path it is.
    torchdiffeq's own ``AssertionError`` (max_num_steps, step-size underflow, non-finite state) is
    passed through; ``on_accept()`` is called once per accepted step.
``odeint(func, y0, t, **kw)``
    torchdiffeq's public ``odeint`` (fixed-grid methods, and the fallback).
``version()``, ``fast_path_problem(method) -> str | None``, :data:`TESTED_RANGE`, :class:`FallbackWarning`.
"""

from __future__ import annotations

import inspect
import re
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

#: torchdiffeq versions the fast path was checked against: [low, high)  (0.2.4 and 0.2.5)
TESTED_RANGE: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 2, 4), (0, 2, 6))

#: torchdiffeq 0.2.5's methods and their kinds (used only when its private SOLVERS table is unreadable)
KNOWN_METHODS: dict[str, str] = {
    "dopri8": "adaptive", "dopri5": "adaptive", "bosh3": "adaptive", "fehlberg2": "adaptive",
    "adaptive_heun": "adaptive", "euler": "fixed", "midpoint": "fixed", "heun2": "fixed", "heun3": "fixed",
    "rk4": "fixed", "explicit_adams": "fixed", "implicit_adams": "fixed", "fixed_adams": "fixed",
    "scipy_solver": "adaptive",
}

_RK_STEP_PARAMS = ("func", "y0", "f0", "t0", "dt", "t1", "tableau")
_INTERP_FIT_PARAMS = ("y0", "y1", "y_mid", "f0", "f1", "dt")
_TABLEAU_FIELDS = ("alpha", "beta", "c_sol", "c_error")
_CHECK_INPUTS_PARAMS = ("func", "y0", "t", "rtol", "atol", "method", "options", "event_fn", "SOLVERS")


class FallbackWarning(UserWarning):
    """flowlab's torchdiffeq fast path is off: integration goes through ``torchdiffeq.odeint``."""


def version() -> str:
    """The installed torchdiffeq's version string (``"unknown"`` if it does not say)."""
    import torchdiffeq

    found = getattr(torchdiffeq, "__version__", None)
    if not found:
        try:
            from importlib.metadata import version as dist_version

            found = dist_version("torchdiffeq")
        except Exception:  # noqa: BLE001 - any failure: unknown
            found = "unknown"
    return str(found)


def _parse(text: str) -> tuple[int, ...] | None:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(x) for x in m.groups(default="0"))


def _range_text() -> str:
    lo, hi = TESTED_RANGE
    return f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"


def _privates() -> types.SimpleNamespace:
    """torchdiffeq's private names the fast path uses (ImportError / AttributeError if one is missing)."""
    import importlib

    # by module path: ``torchdiffeq._impl.odeint`` the attribute is the function, not the module
    misc = importlib.import_module("torchdiffeq._impl.misc")
    rk_common = importlib.import_module("torchdiffeq._impl.rk_common")
    odeint_mod = importlib.import_module("torchdiffeq._impl.odeint")
    return types.SimpleNamespace(
        SOLVERS=odeint_mod.SOLVERS, check_inputs=misc._check_inputs, Perturb=misc.Perturb,
        PREV=misc.Perturb.PREV, NONE=misc.Perturb.NONE, rk_common=rk_common,
        RKSolver=rk_common.RKAdaptiveStepsizeODESolver, runge_kutta_step=rk_common._runge_kutta_step,
        interp_fit=rk_common._interp_fit)


def methods() -> dict[str, str]:
    """torchdiffeq's methods → ``"adaptive"`` (rtol/atol) or ``"fixed"`` (step size).  Read from its
    solver table when that is readable, else :data:`KNOWN_METHODS`; ``{}`` if torchdiffeq is not
    installed."""
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        return {}
    try:
        from torchdiffeq._impl.solvers import FixedGridODESolver

        solvers = _privates().SOLVERS
        return {name: "fixed" if issubclass(cls, FixedGridODESolver) else "adaptive" for name, cls in solvers.items()}
    except Exception:  # noqa: BLE001 - a changed private layout: the known table
        return dict(KNOWN_METHODS)


def _params(fn: Any) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


#: solver arguments torchdiffeq fills itself (not options)
_NOT_OPTIONS = frozenset({"self", "func", "y0", "rtol", "atol"})


def solver_options(method: str) -> frozenset[str] | None:
    """The option names torchdiffeq's solver for ``method`` takes (its ``__init__``'s named
    arguments), or None when that cannot be read.  torchdiffeq itself only warns about others."""
    try:
        cls = _privates().SOLVERS[method]
        params = inspect.signature(cls).parameters.values()
    except Exception:  # noqa: BLE001 - a changed private layout: no check
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                     and p.name not in _NOT_OPTIONS)


def fast_path_problem(method: str) -> str | None:
    """Why the row-stage fast path cannot be used for ``method`` on the installed torchdiffeq, or
    None when it can."""
    found = version()
    parsed = _parse(found)
    lo, hi = TESTED_RANGE
    if parsed is None or not lo <= parsed < hi:
        return f"torchdiffeq {found} is outside the range flowlab's fast path was tested with ({_range_text()})"
    try:
        p = _privates()
        cls = p.SOLVERS[method]
        base = p.RKSolver
        if not (isinstance(cls, type) and issubclass(cls, base)):
            return f"torchdiffeq {found}: {method} is not one of its Runge-Kutta adaptive solvers"
        if cls._adaptive_step is not base._adaptive_step or cls._interp_fit is not base._interp_fit:
            return f"torchdiffeq {found}: {method}'s solver overrides _adaptive_step or _interp_fit"
        step = base._adaptive_step
        if step.__globals__ is not p.rk_common.__dict__ or "_runge_kutta_step" not in step.__code__.co_names:
            return f"torchdiffeq {found}: _adaptive_step no longer calls rk_common._runge_kutta_step"
        if _params(p.runge_kutta_step) != _RK_STEP_PARAMS:
            return f"torchdiffeq {found}: _runge_kutta_step{_params(p.runge_kutta_step)} has changed its signature"
        if _params(p.interp_fit) != _INTERP_FIT_PARAMS:
            return f"torchdiffeq {found}: rk_common._interp_fit{_params(p.interp_fit)} has changed its signature"
        if tuple(getattr(cls.tableau, "_fields", ())) != _TABLEAU_FIELDS or not hasattr(cls, "mid"):
            return f"torchdiffeq {found}: {method}'s Butcher tableau has changed its layout"
        for name in ("_before_integrate", "_advance"):
            if not callable(getattr(cls, name, None)):
                return f"torchdiffeq {found}: {method}'s solver has no {name}"
        if "callback_accept_step" not in cls.valid_callbacks():
            return f"torchdiffeq {found}: {method}'s solver has no callback_accept_step"
        if _params(p.check_inputs) != _CHECK_INPUTS_PARAMS:
            return f"torchdiffeq {found}: _check_inputs{_params(p.check_inputs)} has changed its signature"
    except KeyError:
        return f"torchdiffeq {found}: no solver {method!r} in its private SOLVERS table"
    except Exception as exc:  # noqa: BLE001 - ImportError, AttributeError, ...: a changed private layout
        return f"torchdiffeq {found}: its private internals have changed ({type(exc).__name__}: {exc})"
    return None


_NOTICED: set[str] = set()


def _notice(reason: str) -> None:
    """Say once per process (and reason) that the public fallback is in use."""
    if reason in _NOTICED:
        return
    _NOTICED.add(reason)
    warnings.warn(f"flowlab: {reason}; the fast path is off: adaptive torchdiffeq flows use torchdiffeq.odeint, one call per "
                  "recording interval (same rtol/atol/method/options; step placement, hence results, may differ "
                  "slightly, within the tolerances)", FallbackWarning, stacklevel=3)


def odeint(func: Callable, y0: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """torchdiffeq's public ``odeint``."""
    import torchdiffeq

    return torchdiffeq.odeint(func, y0, t, **kwargs)


# ------------------------------------------------------------------ the fast path


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
    """``cls`` (a torchdiffeq adaptive RK solver that :func:`fast_path_problem` accepted) whose steps
    use :func:`_rows_rk_step`: its ``_adaptive_step`` is torchdiffeq's own code, run with
    ``_runge_kutta_step`` bound to ours (no global patching: other torchdiffeq users in the process
    are untouched); ``_interp_fit`` reads the stage rows."""
    if cls not in _ROWS_SOLVERS:
        p = _privates()
        base = p.RKSolver._adaptive_step
        step = types.FunctionType(base.__code__, {**p.rk_common.__dict__, "_runge_kutta_step": _rows_rk_step},
                                  base.__name__, base.__defaults__, base.__closure__)
        interp_fit = p.interp_fit

        def _interp_fit(self, y0, y1, k, dt):
            dt = dt.type_as(y0)
            return interp_fit(y0, y1, torch.addmv(y0, k.T, dt * self.mid), k[0], k[-1], dt)

        _ROWS_SOLVERS[cls] = type(f"Rows{cls.__name__}", (cls,), {"_adaptive_step": step, "_interp_fit": _interp_fit})
    return _ROWS_SOLVERS[cls]


class _FastSolver:
    """One torchdiffeq RK solver object across all intervals (row stages; private API)."""

    fast = True

    def __init__(self, func, y0, t0, rtol, atol, method, options, on_accept):
        p = _privates()
        t = torch.tensor([t0, t0 + 1.0], dtype=torch.float64, device=y0.device)
        _, wrapped, y0, t, rtol, atol, method, options, _, _ = p.check_inputs(
            func, y0, t, rtol, atol, method, options, None, p.SOLVERS)
        if on_accept is not None:
            wrapped.callback_accept_step = lambda t0_, y0_, dt_: on_accept()
        self.device = y0.device
        self.solver = _rows_solver(p.SOLVERS[method])(func=wrapped, y0=y0, rtol=rtol, atol=atol, **options)
        self.solver._before_integrate(t)

    def advance(self, t1: float) -> torch.Tensor:
        return self.solver._advance(torch.tensor(float(t1), dtype=torch.float64, device=self.device))


# ------------------------------------------------------------- the public fallback


class _Counted:
    """``func`` with torchdiffeq's (public) accept-step callback."""

    def __init__(self, func: Callable, on_accept: Callable[[], Any] | None):
        self.func, self.on_accept = func, on_accept

    def __call__(self, t, y):
        return self.func(t, y)

    def callback_accept_step(self, t0, y0, dt):
        if self.on_accept is not None:
            self.on_accept()


class _PublicSolver:
    """``torchdiffeq.odeint`` from the current time and state to ``t1``, one call per interval."""

    fast = False

    def __init__(self, func, y0, t0, rtol, atol, method, options, on_accept):
        self.func = _Counted(func, on_accept)
        self.t, self.y = float(t0), y0
        self.rtol, self.atol, self.method, self.options = rtol, atol, method, dict(options)

    def advance(self, t1: float) -> torch.Tensor:
        t1 = float(t1)
        if t1 <= self.t:
            return self.y
        t = torch.tensor([self.t, t1], dtype=torch.float64, device=self.y.device)
        y = odeint(self.func, self.y, t, rtol=self.rtol, atol=self.atol, method=self.method,
                   options=dict(self.options))[-1]
        self.t, self.y = t1, y
        return y


def solver_state(solver: Any) -> dict:
    """What a checkpoint keeps of an adaptive solver: the fast path's torchdiffeq Runge–Kutta state
    (y1, f1, t0, t1, dt, interpolation coefficients) and grid indices; the public path's (t, y)."""
    from ..checkpoint import pack

    if isinstance(solver, _FastSolver):
        inner = solver.solver
        rk = inner.rk_state
        out = {"kind": "fast", "rk_state": pack(tuple(rk[:5])), "interp_coeff": pack(list(rk.interp_coeff))}
        for name in ("next_step_index", "next_jump_index"):
            if hasattr(inner, name):
                out[name] = int(getattr(inner, name))
        return out
    return {"kind": "public", "t": solver.t, "y": pack(solver.y)}


def load_solver_state(solver: Any, state: dict) -> None:
    """Restore :func:`solver_state` into a solver built the same way."""
    from ..checkpoint import unpack

    if state["kind"] == "fast":
        if not isinstance(solver, _FastSolver):
            raise RuntimeError("checkpoint: saved by torchdiffeq's fast path, resumed on the public fallback")
        inner = solver.solver
        parts = unpack(state["rk_state"])
        coeff = unpack(state["interp_coeff"])
        dev = solver.device
        inner.rk_state = type(inner.rk_state)(*(p.to(dev) for p in parts), [c.to(dev) for c in coeff])
        for name in ("next_step_index", "next_jump_index"):
            if name in state:
                setattr(inner, name, int(state[name]))
        return
    solver.t, solver.y = float(state["t"]), unpack(state["y"]).to(solver.y.device)


def adaptive_solver(func: Callable, y0: torch.Tensor, t0: float, *, rtol: float, atol: float, method: str,
                    options: dict | None = None, on_accept: Callable[[], Any] | None = None) -> Any:
    """An adaptive solver of dy/dt = func(t, y) from the flat state ``y0`` at ``t0`` (see the module
    docstring): the row-stage fast path when :func:`fast_path_problem` finds nothing against it,
    else torchdiffeq's public ``odeint`` per interval (with a one-time :class:`FallbackWarning`).
    Call under ``torch.no_grad()``."""
    if y0.dim() != 1:
        raise ValueError(f"adaptive_solver expects a flat state, got shape {tuple(y0.shape)}")
    options = dict(options or {})
    reason = fast_path_problem(method)
    if reason is None:
        return _FastSolver(func, y0, t0, rtol, atol, method, options, on_accept)
    _notice(reason)
    return _PublicSolver(func, y0, t0, rtol, atol, method, options, on_accept)
