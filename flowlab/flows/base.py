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
``time_shift(hp)`` is s > 0 (the first-order momentum flows: s = ηβ/(1−β), THEORY.md's start-up
note) is *recorded* at discrete time t with its own time t − s, i.e. the recorded trajectory is
θ_rec(t) = θ_flow(max(t − s, 0)): the flow starts from θ0 when the discrete run has taken β/(1−β)
steps' worth of time.  Second-order flows are started with θ'(0) = −∇L_λ(θ0)/(1+β) and need no shift.

**Integrators** — ``INTEGRATORS[name](rtol=, atol=, dt=, **options)`` returns an
:class:`Integrator`; ``integrator.start(flow, ops, hp, t0, state)`` returns a :class:`Session`
holding ONE state; ``session.advance(t1)`` integrates from the session's time to ``t1`` and returns
the state at ``t1`` (raising :class:`FlowStopped` with the reason when the flow blows up: non-finite
state, step-size underflow, too many steps).  ``session.nfe`` counts vector-field evaluations,
``session.steps`` accepted steps.  A session never keeps past states (memory: one state plus the
solver's stages).  Integrators for another backend set ``backend`` and provide ``make_ops(problem)``
and ``to_torch(theta, like)`` so the follower can record their θ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

OPS_METHODS = ("loss", "grad", "loss_and_grad", "hvp", "d3")


@dataclass(frozen=True)
class Hyper:
    """The discrete method's hyperparameters a flow depends on (Python floats).

    ``lr`` η, ``weight_decay`` λ (coupled L2, torch.optim.SGD's), ``momentum`` β (heavy ball,
    dampening 0)."""

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0

    def to_dict(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "momentum": self.momentum}


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
    #: 1: state (θ,); 2: state (θ, θ')
    state_size: ClassVar[int] = 1
    #: the discrete method the flow models: "gd" (plain (S)GD) or "heavy_ball" (momentum β)
    discrete: ClassVar[str] = "gd"

    def initial_state(self, theta0: Any, ops: Ops, hp: Hyper) -> tuple:
        return (theta0,)

    def vector_field(self, t: Any, state: tuple, ops: Ops, hp: Hyper) -> tuple:
        raise NotImplementedError

    def theta(self, state: tuple) -> Any:
        return state[0]

    def time_shift(self, hp: Hyper) -> float:
        """s ≥ 0: the flow is recorded at discrete time t with flow time t − s (module docstring)."""
        return 0.0

    def options(self) -> dict:
        """The options this flow was built with (for the Dataset's attrs)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


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
        """Integrate ``flow`` on ``problem`` from its θ0, interval by interval up to each of ``times``
        (as a run's follower does, without the run): θ at each time stacked as a torch tensor
        (len(times), m), and the session (``nfe``, ``steps``, ...)."""
        import torch

        ops = self.make_ops(problem)
        with torch.no_grad():
            state = tuple(flow.initial_state(problem.theta0.clone(), ops, hp))
        session = self.start(flow, ops, hp, 0.0, state)
        out = []
        for t in times:
            session.advance(float(t))
            out.append(self.to_torch(flow.theta(session.state), problem.theta0).detach().clone())
        return torch.stack(out), session

    def tightened(self, factor: float = 10.0) -> Integrator:
        """A copy with tolerances (adaptive) or step (fixed) tighter by ``factor`` (for reference
        solutions checked by tightening)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}
