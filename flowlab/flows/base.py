"""The contracts of the flows package: ops, flows, integrators (backend-agnostic; keep stable).

**Ops** — derivatives of the *unregularised* full-batch loss L on one flat θ.  The torch backend
implements them on a :class:`flowlab.Problem` (:class:`flowlab.flows.torch_ops.TorchOps`); the JAX
backend implements the same five methods on JAX arrays::

    ops.loss(theta) -> scalar              ops.grad(theta) -> like theta
    ops.loss_and_grad(theta) -> (scalar, like theta)
    ops.hvp(theta, v) -> H(θ) v            ops.d3(theta, v) -> ∇_θ (vᵀ H(θ) v)   (v held fixed)

**Flows** — a continuous model of (S)GD.  Its vector field is written against an ops object with
plain arithmetic only (``+``, ``-``, ``*`` by a Python scalar or array), so the very same class runs
on torch tensors (torchdiffeq, flowlab's fixed-step integrators) and on JAX arrays (diffrax).  The
flow adds weight decay λ itself: L_λ = L + (λ/2)|θ|², ∇L_λ = g + λθ, H_λ v = Hv + λv, and
∇³L_λ = ∇³L.  ``hp`` (:class:`Hyper`) holds Python floats: branching on them is allowed (they are
static under ``jax.jit``).  A state is a tuple of arrays: ``(θ,)`` or ``(θ, θ')``.

**Time shift** — a flow is compared with the discrete run at matched times t = Σ η_k.  A flow whose
``time_shift(hp)`` is s > 0 (the first-order momentum flows: s = ηβ/(1−β), docs/theory.md#start-up-and-time-shift) is *recorded* at discrete time t with its own time t − s, i.e. the recorded trajectory is
θ_rec(t) = θ_flow(max(t − s, 0)): the flow starts from θ0 when the discrete run has taken β/(1−β)
steps' worth of time.  Second-order flows are started with θ'(0) = −∇L_λ(θ0)/(1+β) and need no shift.

**Integrators** — ``INTEGRATORS[name](rtol=, atol=, dt=, **options)`` returns an
:class:`Integrator`; ``integrator.start(flow, ops, hp, t0, state)`` returns a :class:`Session`
holding ONE state; ``session.advance(t1)`` integrates from the session's time to ``t1`` and returns
the state at ``t1`` (raising :class:`FlowStopped` with the reason when the flow blows up: non-finite
state, step-size underflow, too many steps).  ``session.nfe`` counts vector-field evaluations,
``session.steps`` accepted steps.  A session never keeps past states (memory: one state plus the
solver's stages).  Integrators for another backend set ``backend`` and provide ``make_ops(problem)``
and ``to_torch(theta, like)`` so the follower can record their θ.  ``integrator.tightened(factor)``
(one implementation, here) copies it with rtol/atol or dt ÷ factor, as its ``kind`` declares; a
fixed step given by default as η is read through ``integrator.fixed_dt(hp)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

OPS_METHODS = ("loss", "grad", "loss_and_grad", "hvp", "d3")


@dataclass(frozen=True)
class Hyper:
    """The discrete method's hyperparameters a flow depends on (Python floats).

    ``lr`` η, ``weight_decay`` λ (coupled L2, torch.optim.SGD's), ``momentum`` β (heavy ball,
    dampening 0); ``batch_size`` B (None: full batch) and ``sampling`` (how the discrete run draws
    its batches: ``reshuffle``, ``with_replacement``, ``without_replacement``), which the stochastic
    models' noise covariance depends on."""

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    batch_size: int | None = None
    sampling: str = "reshuffle"

    def to_dict(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "momentum": self.momentum,
                "batch_size": self.batch_size, "sampling": self.sampling}


@runtime_checkable
class Ops(Protocol):
    """Full-batch derivatives of the unregularised loss L (see the module docstring)."""

    def loss(self, theta: Any) -> Any: ...

    def grad(self, theta: Any) -> Any: ...

    def loss_and_grad(self, theta: Any) -> tuple[Any, Any]: ...

    def hvp(self, theta: Any, v: Any) -> Any: ...

    def d3(self, theta: Any, v: Any) -> Any: ...


class Flow:
    """Base class of a continuous model.  Subclasses set the class attributes and implement
    :meth:`vector_field` (and :meth:`initial_state` for second-order forms).

    Keyword arguments of ``__init__`` are the flow's options (``[[flows]]`` keys); the base class
    takes none.  A user flow is any class with this interface, named ``"package.module:Class"``.
    """

    name: ClassVar[str] = "flow"
    #: expected global order of |θ_discrete(t) − θ_flow(t)| in η (over a fixed horizon)
    order: ClassVar[int] = 1
    #: which ops the vector field calls (a subset of OPS_METHODS)
    needs: ClassVar[frozenset[str]] = frozenset({"loss_and_grad"})
    #: the number of arrays in the state: 1 for (θ,), 2 for (θ, θ'); a flow composed with its law
    #: (:class:`flowlab.theory.LawFlow`) counts the law's arrays too
    state_size: ClassVar[int] = 1
    #: the discrete method the flow models: "gd" (plain (S)GD) or "heavy_ball" (momentum β)
    discrete: ClassVar[str] = "gd"

    def initial_state(self, theta0: Any, ops: Ops, hp: Hyper) -> tuple:
        return (theta0,)

    def vector_field(self, t: Any, state: tuple, ops: Ops, hp: Hyper) -> tuple:
        raise NotImplementedError

    def theta(self, state: tuple) -> Any:
        return state[0]

    def velocity(self, state: tuple) -> Any:
        """θ' where the state carries it (second-order forms), else None."""
        return state[1] if self.state_size > 1 else None

    def time_shift(self, hp: Hyper) -> float:
        """s ≥ 0: the flow is recorded at discrete time t with flow time t − s (module docstring)."""
        return 0.0

    def options(self) -> dict:
        """The options this flow was built with (for the Dataset's attrs)."""
        return {}

    def law(self, hp: Hyper) -> Law | None:
        """The law this flow's symmetry quantities obey along its own trajectory (None: none known).

        It is part of the flow's definition: when a run records symmetries and theory, the follower
        integrates the law alongside the flow (``flow_law`` in the Dataset; docs/theory.md,
        "Laws along each flow")."""
        return None

    def observe(self, state: tuple) -> dict[str, Any]:
        """Values the flow reports at a recording time beyond θ (into ``Point.extras``)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


CLOSED, FORCED, OSCILLATOR = "closed", "forced", "oscillator"


@dataclass(frozen=True)
class Law:
    """How a flow's symmetry quantity Q evolves along the flow (docs/theory.md, "Laws along each flow").

    ``closed``: Q' = −rate·Q; ``forced``: Q' = −rate·Q + gain·G_A + hvp_gain·⟨g_A, H∇L_λ⟩ with
    G_A = |g_A|² (rescale: A1 − A2) of the full-batch gradient g; ``oscillator``:
    x'' + 2γx' + ω²x = 2|θ'_A|².  Translation groups decay at rate/2 (oscillators: ω²/2) and are not
    forced."""

    kind: str  # closed | forced | oscillator
    rate: float = 0.0
    gain: float = 0.0
    hvp_gain: float = 0.0
    gamma: float = 0.0
    omega2: float = 0.0


# ----------------------------------------------------------- shared algebra (backend-agnostic)


def grad_l(ops: Ops, theta: Any, hp: Hyper) -> Any:
    """∇L_λ(θ) = g + λθ."""
    g = ops.grad(theta)
    return g + hp.weight_decay * theta if hp.weight_decay else g


def loss_grad_l(ops: Ops, theta: Any, hp: Hyper) -> tuple[Any, Any]:
    """(L_λ(θ), ∇L_λ(θ)) — the loss part is L + (λ/2)|θ|² only where the backend can sum."""
    loss, g = ops.loss_and_grad(theta)
    return loss, (g + hp.weight_decay * theta if hp.weight_decay else g)


def hvp_l(ops: Ops, theta: Any, v: Any, hp: Hyper) -> Any:
    """H_λ v = Hv + λv."""
    hv = ops.hvp(theta, v)
    return hv + hp.weight_decay * v if hp.weight_decay else hv


# ---------------------------------------------------------------------------- integrators


class FlowStopped(Exception):
    """A flow cannot go on (non-finite state, step-size underflow, too many steps): ``str`` is the
    reason, recorded as the method's ``status``."""


class Session(Protocol):
    """One flow being integrated by one integrator (see the module docstring)."""

    t: float
    state: tuple
    nfe: int
    steps: int

    def advance(self, t1: float) -> tuple: ...


class Integrator:
    """Base class of an integrator: ``INTEGRATORS[name](rtol=, atol=, dt=, **options)``.

    ``start(flow, ops, hp, t0, state) -> Session``.  ``backend`` names the array library its
    sessions use ("torch" or "jax"); other backends override :meth:`make_ops` and :meth:`to_torch`.
    """

    name: ClassVar[str] = "integrator"
    backend: ClassVar[str] = "torch"
    #: "adaptive" (rtol/atol) or "fixed" (dt)
    kind: ClassVar[str] = "adaptive"

    def start(self, flow: Flow, ops: Ops, hp: Hyper, t0: float, state: tuple) -> Session:
        raise NotImplementedError

    def make_ops(self, problem: Any) -> Ops:
        from .torch_ops import TorchOps

        return TorchOps(problem)

    def to_torch(self, theta: Any, like: Any) -> Any:
        """θ from a session's state as a torch tensor like ``like`` (identity for torch)."""
        return theta

    def trajectory(self, flow: Flow, problem: Any, hp: Hyper, times: Any) -> tuple[Any, Session]:
        """Integrate ``flow`` on ``problem`` from its θ0 up to each of ``times`` in turn, as a run's
        follower does (the same lock-step engine, without a discrete run and without a time shift):
        θ at each time stacked as a torch tensor (len(times), m), and the last session (``nfe``,
        ``steps``, ...).  Raises :class:`FlowStopped` when the flow cannot go on."""
        from .follower import follow

        return follow(flow, self, problem, hp, times)

    #: the tolerances and step as given (None: the defaults, :meth:`tols` and :meth:`fixed_dt`)
    rtol: float | None = None
    atol: float | None = None
    dt: float | None = None
    #: a fixed step given by default as η is η / dt_divisor (1; a tightened copy's: the factor)
    dt_divisor: float = 1.0
    #: names of per-integrator counter dicts (e.g. diffrax's ``stats``) that a tightened copy starts at zero
    counters: ClassVar[tuple[str, ...]] = ()

    def tols(self, dtype: Any) -> tuple[float, float]:
        """(rtol, atol) for a state of ``dtype`` (torch or JAX dtype, or its name): the given ones,
        else :func:`flowlab.flows.integrators.default_tolerances`."""
        from .integrators import default_tolerances

        return default_tolerances(dtype, self.rtol, self.atol)

    def fixed_dt(self, hp: Hyper) -> float:
        """The fixed step for a run with hyperparameters ``hp``: ``dt`` if given, else the learning
        rate η (÷ :attr:`dt_divisor`, the tightening factor of a tightened copy)."""
        return self.dt if self.dt is not None else hp.lr / self.dt_divisor

    def tightened(self, factor: float = 10.0) -> Integrator:
        """A copy tighter by ``factor`` (for reference solutions checked by tightening): ``kind``
        "adaptive": rtol and atol (as given, else the float64 defaults of :meth:`tols`) ÷ factor;
        "fixed": dt ÷ factor (and the default step η ÷ factor, :meth:`fixed_dt`).  The copy shares
        everything else and its :attr:`counters` start at zero."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        for name in self.counters:
            setattr(new, name, {k: type(v)(0) for k, v in getattr(self, name).items()})
        if self.kind == "fixed":
            new.dt = None if self.dt is None else self.dt / factor
            new.dt_divisor = self.dt_divisor * factor
        else:
            rtol, atol = self.tols("float64")
            new.rtol, new.atol = rtol / factor, atol / factor
        return new

    def describe(self) -> dict:
        return {"name": self.name}
