"""The built-in continuous models of (S)GD (THEORY.md, "Continuous models of (S)GD").

Every vector field is written against an ops object with plain arithmetic only (see
:mod:`flowlab.flows.base`), weight decay included: G = ∇L_λ = g + λθ, H = H_λ.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Flow, Hyper, Ops, grad_l, hvp_l, loss_grad_l
from .registry import FLOWS


def _g(ops: Ops, theta: Any, hp: Hyper) -> Any:
    return loss_grad_l(ops, theta, hp)[1]


@FLOWS.register("gradient_flow")
class GradientFlow(Flow):
    """Gradient flow θ' = −∇L_λ (O(η) from GD)."""

    name = "gradient_flow"
    order = 1
    needs = frozenset({"loss_and_grad"})

    def vector_field(self, t, state, ops, hp):
        return (-_g(ops, state[0], hp),)


@FLOWS.register("modified_loss")
class ModifiedLoss(Flow):
    """IGR modified flow θ' = −∇L_λ − (η/2)H_λ∇L_λ (O(η²) from GD); ``hvp = "exact"`` (an HVP) or
    ``"finite_difference"`` (two gradients: (η/2)H G ≈ (η/2)(G(θ + hG) − G)/h, h = ``fd_step``, by
    default η/2, which makes the field −G(θ + (η/2)G), still O(η²))."""

    name = "modified_loss"
    order = 2

    def __init__(self, hvp: str = "exact", fd_step: float | None = None):
        if hvp not in ("exact", "finite_difference"):
            raise ConfigError("flows.hvp", hvp, "allowed: exact, finite_difference")
        if fd_step is not None and not (isinstance(fd_step, int | float) and fd_step > 0):
            raise ConfigError("flows.fd_step", fd_step, "expected a number > 0 (default η/2)")
        self.hvp, self.fd_step = hvp, fd_step

    @property
    def needs(self):  # type: ignore[override]
        return frozenset({"loss_and_grad", "hvp"}) if self.hvp == "exact" else frozenset({"loss_and_grad"})

    def options(self):
        return {"hvp": self.hvp, "fd_step": self.fd_step}

    def vector_field(self, t, state, ops, hp):
        theta = state[0]
        G = _g(ops, theta, hp)
        if self.hvp == "exact":
            return (-(G + (0.5 * hp.lr) * hvp_l(ops, theta, G, hp)),)
        h = self.fd_step if self.fd_step is not None else 0.5 * hp.lr
        G2 = grad_l(ops, theta + h * G, hp)
        if h == 0.5 * hp.lr:  # G + (η/2)(G2 − G)/h = G2
            return (-G2,)
        return (-(G + (0.5 * hp.lr / h) * (G2 - G)),)


@FLOWS.register("modified_second_order")
class ModifiedSecondOrder(Flow):
    """O(η²) modified equation θ' = −G − (η/2)HG − η²[(1/3)H²G + (1/12)∇³L[G,G]] (O(η³) from GD);
    2 HVPs and one third-derivative contraction per evaluation."""

    name = "modified_second_order"
    order = 3
    needs = frozenset({"loss_and_grad", "hvp", "d3"})

    def vector_field(self, t, state, ops, hp):
        theta = state[0]
        eta = hp.lr
        G = _g(ops, theta, hp)
        HG = hvp_l(ops, theta, G, hp)
        HHG = hvp_l(ops, theta, HG, hp)
        T = ops.d3(theta, G)  # ∇³L_λ[G, G] = ∇³L[G, G]
        return (-(G + (0.5 * eta) * HG + (eta * eta / 3.0) * HHG + (eta * eta / 12.0) * T),)


class _SecondOrderForm(Flow):
    """m θ'' + c θ' = −∇L_λ as a first-order system in (θ, u = θ'), started with u(0) = −∇L_λ(θ0)/(1+β)."""

    state_size = 2

    def mass_damping(self, hp: Hyper) -> tuple[float, float]:
        raise NotImplementedError

    def initial_state(self, theta0, ops, hp):
        return (theta0, (-1.0 / (1.0 + hp.momentum)) * _g(ops, theta0, hp))

    def vector_field(self, t, state, ops, hp):
        theta, u = state
        m, c = self.mass_damping(hp)
        return (u, (-1.0 / m) * (_g(ops, theta, hp) + c * u))


@FLOWS.register("modified_temporal")
class ModifiedTemporal(_SecondOrderForm):
    """Temporal modified flow (η/2)θ'' + θ' = −∇L_λ, θ'(0) = −∇L_λ(θ0) (O(η²) from GD; stiff)."""

    name = "modified_temporal"
    order = 2

    def mass_damping(self, hp):
        return 0.5 * hp.lr, 1.0

    def initial_state(self, theta0, ops, hp):
        return (theta0, -_g(ops, theta0, hp))


@FLOWS.register("momentum_first_order")
class MomentumFirstOrder(Flow):
    """First-order momentum flow (1−β)θ' = −∇L_λ (O(η) from heavy ball), compared at t − ηβ/(1−β)."""

    name = "momentum_first_order"
    order = 1
    discrete = "heavy_ball"

    def vector_field(self, t, state, ops, hp):
        return ((-1.0 / (1.0 - hp.momentum)) * _g(ops, state[0], hp),)

    def time_shift(self, hp):
        return hp.lr * hp.momentum / (1.0 - hp.momentum)


@FLOWS.register("momentum_second_order")
class MomentumSecondOrder(_SecondOrderForm):
    """Kovachki–Stuart (η(1+β)/2)θ'' + (1−β)θ' = −∇L_λ, θ'(0) = −∇L_λ(θ0)/(1+β) (O(η²) from heavy
    ball, no time shift)."""

    name = "momentum_second_order"
    order = 2
    discrete = "heavy_ball"

    def mass_damping(self, hp):
        return 0.5 * hp.lr * (1.0 + hp.momentum), 1.0 - hp.momentum


@FLOWS.register("momentum_modified")
class MomentumModified(Flow):
    """Momentum modified flow θ' = −(1/(1−β))∇[L_λ + η(1+β)/(4(1−β)²)|∇L_λ|²] (O(η²) from heavy
    ball after the start-up transient), compared at t − ηβ/(1−β)."""

    name = "momentum_modified"
    order = 2
    discrete = "heavy_ball"
    needs = frozenset({"loss_and_grad", "hvp"})

    def vector_field(self, t, state, ops, hp):
        theta, beta = state[0], hp.momentum
        G = _g(ops, theta, hp)
        c = hp.lr * (1.0 + beta) / (2.0 * (1.0 - beta) ** 2)  # ∇(c/2 |G|²) = c H G
        return ((-1.0 / (1.0 - beta)) * (G + c * hvp_l(ops, theta, G, hp)),)

    def time_shift(self, hp):
        return hp.lr * hp.momentum / (1.0 - hp.momentum)


BUILTIN_FLOWS = ("gradient_flow", "modified_loss", "modified_temporal", "modified_second_order",
                 "momentum_first_order", "momentum_second_order", "momentum_modified")
