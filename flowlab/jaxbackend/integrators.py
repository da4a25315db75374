"""diffrax integrators (``diffrax:Tsit5``, ``diffrax:Dopri5``, ...): :func:`diffrax_integrators`, the
JAX part's entries of the ``integrators`` registry.

This module does NOT import JAX: the integrator objects only hold and validate their options; the
first :meth:`DiffraxIntegrator.start` (or :meth:`make_ops`) imports JAX, diffrax and
:mod:`flowlab.jaxbackend._diffrax`, which builds and compiles the stepping kernel.

Semantics (the same as the torch integrators of :mod:`flowlab.flows.integrators`):

- adaptive (``rtol``/``atol``, PID controller; the default when no ``dt`` is given): the step size
  is kept across recording intervals; the state at a recording time comes from the solver's dense
  output (``land = "interpolate"``, like torchdiffeq) or steps are cut to land on it
  (``land = "exact"``, the default for solvers whose dense output is of lower order than the
  method: Kvaerno5);
- fixed step (``dt`` alone, or ``diffrax:Euler``): each recording interval is cut into ⌈Δt/dt⌉
  equal steps, landing exactly on every recording time (``dt`` defaults to the learning rate η).

``land`` takes the modes of flowlab's fixed-step integrators (:data:`flowlab.flows.integrators.LANDINGS`);
tolerances default as theirs (:func:`flowlab.flows.integrators.default_tolerances`); option errors
name fields relative to the flow's ``[[flows]]`` table (``"rtol"``, ``"integrator_options.land"``...).

Solvers: ``Tsit5``, ``Dopri5``, ``Dopri8``, ``Heun``, ``Euler``, ``Kvaerno5`` (implicit: for the stiff
second-order forms; its Newton solves form the Jacobian of the field, m×m, so keep it to small
models or pass ``linear_solver = "gmres"``), ``RK4_38`` (torchdiffeq's ``rk4``, the 3/8 rule) and
``RK4`` (classic, flowlab's ``flowlab:rk4``), ``Bosh3``, ``Ralston``, ``Midpoint``.

Stochastic flows (``sme``, ``sme2``, ``sme_momentum`` with ``diffusion = "per_example"``):
``diffrax:Euler`` integrates their Itô SDE by Euler–Maruyama on the grid above (dt default: the
flow's step η), with diffrax's Brownian motion keyed from the path's seed (options ``seed`` — else
the follower's derived seed — and ``fuse``); see :mod:`flowlab.jaxbackend.sde`.  Other solvers, and
``diffusion = "batches"``, are refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import ConfigError
from ..flows.base import Integrator
from ..flows.integrators import DEFAULT_MAX_STEPS, LANDINGS, landing  # noqa: F401 - LANDINGS: re-exported

#: name → (adaptive capable, implicit, default landing, description)
SOLVERS: dict[str, tuple[bool, bool, str, str]] = {
    "Tsit5": (True, False, "interpolate", "Tsitouras 5(4), FSAL, 4th-order dense output"),
    "Dopri5": (True, False, "interpolate", "Dormand–Prince 5(4), FSAL, 4th-order dense output"),
    "Dopri8": (True, False, "interpolate", "Dormand–Prince 8(5,3), FSAL, 7th-order dense output"),
    "Heun": (True, False, "interpolate", "Heun 2(1), cubic Hermite dense output"),
    "Bosh3": (True, False, "interpolate", "Bogacki–Shampine 3(2), FSAL"),
    "Ralston": (True, False, "interpolate", "Ralston 2(1)"),
    "Midpoint": (True, False, "interpolate", "explicit midpoint 2(1)"),
    "Euler": (False, False, "exact", "explicit Euler (fixed step only)"),
    "Kvaerno5": (True, True, "exact", "Kværnø 5(4) ESDIRK, implicit (stiff second-order forms)"),
    "RK4_38": (False, False, "exact", "Kutta's 3/8-rule RK4 = torchdiffeq's rk4 (fixed step)"),
    "RK4": (False, False, "exact", "classic RK4 = flowlab:rk4 (fixed step)"),
}
LINEAR_SOLVERS = ("lu", "gmres")


def _positive(field: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(field, value, "expected a number > 0")


class DiffraxIntegrator(Integrator):
    """A diffrax solver driven interval by interval (see the module docstring).

    Options (``[[flows]]`` ``integrator_options``): ``max_steps`` per recording interval (100 000);
    ``land`` (auto | interpolate | exact); PID controller ``pcoeff``, ``icoeff``, ``dcoeff``,
    ``safety``, ``factormin``, ``factormax``, ``dtmin``, ``dtmax``; ``first_step`` (initial step; by
    default diffrax's heuristic); JAX ``device`` (auto | cpu | gpu), ``chunk_size``, ``precision``
    (highest | high | default), ``conv`` (auto | lax | im2col: how convolutions are computed; auto
    takes im2col matrix products on CPU, where XLA runs lax convolutions inside the kernel's loop
    10-35x slower); for implicit solvers ``linear_solver`` (lu | gmres) and
    ``root_find_max_steps``.
    """

    backend: ClassVar[str] = "jax"
    solver: ClassVar[str] = "Dopri5"
    counters: ClassVar[tuple[str, ...]] = ("stats",)  # a tightened copy starts them at zero

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 max_steps: int = DEFAULT_MAX_STEPS, land: str = "auto", first_step: float | None = None,
                 pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, safety: float = 0.9,
                 factormin: float = 0.2, factormax: float = 10.0, dtmin: float | None = None,
                 dtmax: float | None = None, device: str = "auto", chunk_size: int | None = None,
                 precision: str = "highest", conv: str = "auto", linear_solver: str = "lu",
                 root_find_max_steps: int = 10):
        adaptive_capable, implicit, default_land, _ = SOLVERS[self.solver]
        for field, value in (("rtol", rtol), ("atol", atol), ("dt", dt),
                             ("integrator_options.first_step", first_step),
                             ("integrator_options.dtmin", dtmin), ("integrator_options.dtmax", dtmax)):
            _positive(field, value)
        if not adaptive_capable and (rtol is not None or atol is not None):
            raise ConfigError("rtol" if rtol is not None else "atol", rtol if rtol is not None else atol,
                              f"{self.name} is a fixed-step method: give dt (default: the learning rate η), not rtol/atol")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps <= 0:
            raise ConfigError("integrator_options.max_steps", max_steps, "expected a positive integer")
        land = landing(land, default_land)
        if conv not in ("auto", "lax", "im2col"):
            raise ConfigError("integrator_options.conv", conv, "allowed: auto, lax, im2col")
        if precision not in ("highest", "high", "default"):
            raise ConfigError("integrator_options.precision", precision, "allowed: highest, high, default")
        if linear_solver not in LINEAR_SOLVERS:
            raise ConfigError("integrator_options.linear_solver", linear_solver,
                              f"allowed: {', '.join(LINEAR_SOLVERS)}")
        self.rtol, self.atol, self.dt = rtol, atol, dt
        self.kind = "adaptive" if adaptive_capable and (dt is None or rtol is not None or atol is not None) else "fixed"
        self.implicit = implicit
        self.max_steps = max_steps
        self.land = land
        self.first_step = first_step if first_step is not None else (dt if self.kind == "adaptive" else None)
        self.controller_options = {"pcoeff": pcoeff, "icoeff": icoeff, "dcoeff": dcoeff, "safety": safety,
                                   "factormin": factormin, "factormax": factormax, "dtmin": dtmin, "dtmax": dtmax}
        self.jax_options = {"device": device, "chunk_size": chunk_size, "precision": precision, "conv": conv}
        self.linear_solver = linear_solver
        self.root_find_max_steps = int(root_find_max_steps)
        # cumulative over this integrator's sessions (a follower restarts sessions when η changes)
        self.stats = {"nfe": 0, "accepted": 0, "rejected": 0, "compile_seconds": 0.0, "traces": 0}

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"diffrax:{self.solver}"

    # --------------------------------------------------------------- contract
    # tols(dtype), fixed_dt(hp) and tightened(factor): flowlab.flows.base.Integrator's

    def make_ops(self, problem: Any) -> Any:
        from .problem import jax_problem
        from .twin import NoTwinError

        try:
            jp = jax_problem(problem, **self.jax_options)
        except NoTwinError as exc:
            raise ConfigError("integrator", self.name, str(exc)) from None
        return jp.ops

    def to_torch(self, theta: Any, like: Any) -> Any:
        import torch

        if isinstance(theta, torch.Tensor):
            return theta
        from ._runtime import to_torch

        return to_torch(theta, like.device, like.dtype)

    def check_flow(self, flow: Any) -> None:
        """Refuse a flow this integrator cannot integrate (a stochastic one: anything but
        ``diffrax:Euler`` on per-example noise), in one ConfigError line (fields relative to the flow's table)."""
        if getattr(flow, "stochastic", False):
            from .sde import check_stochastic

            check_stochastic(flow, self.name)

    def start(self, flow: Any, ops: Any, hp: Any, t0: float, state: tuple) -> Any:
        if getattr(flow, "stochastic", False):
            self.check_flow(flow)
            from .sde import SDESession

            return SDESession(self, flow, ops, hp, float(t0), state)
        from ._diffrax import DiffraxSession

        return DiffraxSession(self, flow, ops, hp, float(t0), state)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "rtol": self.rtol, "atol": self.atol, "dt": self.dt,
                "land": self.land, "max_steps": self.max_steps, "first_step": self.first_step,
                **{k: v for k, v in self.controller_options.items() if v is not None},
                **{k: v for k, v in self.jax_options.items() if v is not None},
                **({"linear_solver": self.linear_solver, "root_find_max_steps": self.root_find_max_steps}
                   if self.implicit else {})}


class DiffraxEuler(DiffraxIntegrator):
    """diffrax Euler: explicit Euler (fixed step only); fixed step: dt (default η).  On a stochastic
    flow: Itô Euler–Maruyama (:mod:`flowlab.jaxbackend.sde`) with the options ``seed`` (the path's
    Brownian seed; default: the follower's, derived from the study's seed and the flow's label) and
    ``fuse`` (``sme``: drift and noise in one backward pass, default true)."""

    solver: ClassVar[str] = "Euler"

    def __init__(self, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                 max_steps: int = DEFAULT_MAX_STEPS, land: str = "auto", first_step: float | None = None,
                 pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, safety: float = 0.9,
                 factormin: float = 0.2, factormax: float = 10.0, dtmin: float | None = None,
                 dtmax: float | None = None, device: str = "auto", chunk_size: int | None = None,
                 precision: str = "highest", conv: str = "auto", linear_solver: str = "lu",
                 root_find_max_steps: int = 10, seed: int | None = None, fuse: bool = True):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigError("integrator_options.seed", seed, "expected an integer >= 0")
        if not isinstance(fuse, bool):
            raise ConfigError("integrator_options.fuse", fuse, "expected true or false")
        super().__init__(rtol=rtol, atol=atol, dt=dt, max_steps=max_steps, land=land, first_step=first_step,
                         pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff, safety=safety, factormin=factormin,
                         factormax=factormax, dtmin=dtmin, dtmax=dtmax, device=device, chunk_size=chunk_size,
                         precision=precision, conv=conv, linear_solver=linear_solver,
                         root_find_max_steps=root_find_max_steps)
        self.seed, self.fuse = seed, fuse
        self.noise: Any = None  # a stochastic path's NoiseSource (set by the follower; its seed keys the path)

    def describe(self) -> dict:
        out = super().describe()
        if self.seed is not None:
            out["seed"] = self.seed
        if not self.fuse:
            out["fuse"] = False
        return out


def _make_classes() -> dict[str, type]:
    out = {}
    for solver, (adaptive, _implicit, _land, text) in SOLVERS.items():
        how = "rtol/atol (PID) or fixed dt" if adaptive else "fixed step: dt (default η)"
        doc = f"diffrax {solver}: {text}; {how}"
        base = DiffraxEuler if solver == "Euler" else DiffraxIntegrator
        if solver == "Euler":
            doc += "; on a stochastic flow Itô Euler–Maruyama (options seed, fuse)"
        out[f"diffrax:{solver}"] = type(f"Diffrax_{solver}", (base,), {"solver": solver, "__doc__": doc})
    return out


_CLASSES: dict[str, type] = _make_classes()


def diffrax_integrators() -> dict[str, type]:
    """name → Integrator class for every ``diffrax:<Solver>`` (no JAX import)."""
    return dict(_CLASSES)
