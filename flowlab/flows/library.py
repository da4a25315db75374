"""The built-in continuous models of (S)GD (docs/theory.md, "Continuous models of SGD").

Every vector field is written against an ops object with plain arithmetic only (see
:mod:`flowlab.flows.base`), weight decay included: G = ∇L_λ = g + λθ, H = H_λ.  Each flow also
states the law its symmetry quantities obey (:meth:`Flow.law`; docs/theory.md, "Laws along each
flow").
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import ConfigError
from .base import CLOSED, FORCED, OSCILLATOR, Flow, Hyper, Law, Ops, grad_l, hvp_l, loss_grad_l


def _g(ops: Ops, theta: Any, hp: Hyper) -> Any:
    return loss_grad_l(ops, theta, hp)[1]


class GradientFlow(Flow):
    """Gradient flow θ' = −∇L_λ (O(η) from GD)."""

    name = "gradient_flow"
    order = 1
    needs = frozenset({"loss_and_grad"})

    def vector_field(self, t, state, ops, hp):
        return (-_g(ops, state[0], hp),)

    def law(self, hp):
        return Law(CLOSED, rate=2 * hp.weight_decay)


CORRECTIONS = ("hvp", "finite_difference")


class ModifiedLoss(Flow):
    """IGR modified flow θ' = −∇L_λ − (η/2)H_λ∇L_λ (O(η²) from GD).  ``correction``: how the term
    (η/2)H_λ G is computed — ``"hvp"`` (a Hessian-vector product, the default) or
    ``"finite_difference"`` (two gradients: (η/2)H G ≈ (η/2)(G(θ + hG) − G)/h, h = ``fd_step``, by
    default η/2, which makes the field −G(θ + (η/2)G), still O(η²)).  ``hvp = "exact" |
    "finite_difference"`` is the option's former name, still accepted."""

    name = "modified_loss"
    order = 2

    def __init__(self, correction: str | None = None, fd_step: float | None = None, hvp: str | None = None):
        if hvp is not None:  # the former name of the option
            if correction is not None:
                raise ConfigError("hvp", hvp, "give correction only (hvp is its former name)")
            if hvp not in ("exact", "finite_difference"):
                raise ConfigError("hvp", hvp, "allowed: exact, finite_difference (now: correction = hvp | finite_difference)")
            warnings.warn("modified_loss: the option hvp is now named correction (hvp | finite_difference)",
                          DeprecationWarning, stacklevel=2)
            correction = "hvp" if hvp == "exact" else hvp
        correction = "hvp" if correction is None else correction
        if correction not in CORRECTIONS:
            raise ConfigError("correction", correction, f"allowed: {', '.join(CORRECTIONS)}")
        if fd_step is not None and not (isinstance(fd_step, int | float) and fd_step > 0):
            raise ConfigError("fd_step", fd_step, "expected a number > 0 (default η/2)")
        self.correction, self.fd_step = correction, fd_step

    @property
    def needs(self):  # type: ignore[override]
        return frozenset({"loss_and_grad", "hvp"}) if self.correction == "hvp" else frozenset({"loss_and_grad"})

    def options(self):
        return {"correction": self.correction, "fd_step": self.fd_step}

    def law(self, hp):
        """The ``paper_hat`` law with the full-batch gradient — for the exact IGR field; the
        finite-difference field differs from it at O(η·fd_step), so it states none."""
        if self.correction != "hvp":
            return None
        lam, eta = hp.weight_decay, hp.lr
        return Law(FORCED, rate=2 * lam * (1 + eta * lam / 2), gain=eta)

    def vector_field(self, t, state, ops, hp):
        theta = state[0]
        G = _g(ops, theta, hp)
        if self.correction == "hvp":
            return (-(G + (0.5 * hp.lr) * hvp_l(ops, theta, G, hp)),)
        h = self.fd_step if self.fd_step is not None else 0.5 * hp.lr
        G2 = grad_l(ops, theta + h * G, hp)
        if h == 0.5 * hp.lr:  # G + (η/2)(G2 − G)/h = G2
            return (-G2,)
        return (-(G + (0.5 * hp.lr / h) * (G2 - G)),)


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

    def law(self, hp):
        lam, eta = hp.weight_decay, hp.lr
        return Law(FORCED, rate=2 * lam * (1 + eta * lam / 2 + eta * eta * lam * lam / 3),
                   gain=eta + eta * eta * lam, hvp_gain=eta * eta)


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

    def law(self, hp):
        m, c = self.mass_damping(hp)  # x'' + 2γx' + ω²x = 2|θ'_A|² with 2γ = c/m, ω² = 2λ/m
        return Law(OSCILLATOR, gamma=c / (2 * m), omega2=2 * hp.weight_decay / m)


class ModifiedTemporal(_SecondOrderForm):
    """Temporal modified flow (η/2)θ'' + θ' = −∇L_λ, θ'(0) = −∇L_λ(θ0) (O(η²) from GD; stiff)."""

    name = "modified_temporal"
    order = 2

    def mass_damping(self, hp):
        return 0.5 * hp.lr, 1.0

    def initial_state(self, theta0, ops, hp):
        return (theta0, -_g(ops, theta0, hp))


class MomentumFirstOrder(Flow):
    """First-order momentum flow (1−β)θ' = −∇L_λ (O(η) from heavy ball), compared at t − ηβ/(1−β)."""

    name = "momentum_first_order"
    order = 1
    discrete = "heavy_ball"

    def vector_field(self, t, state, ops, hp):
        return ((-1.0 / (1.0 - hp.momentum)) * _g(ops, state[0], hp),)

    def time_shift(self, hp):
        return hp.lr * hp.momentum / (1.0 - hp.momentum)

    def law(self, hp):
        return Law(CLOSED, rate=2 * hp.weight_decay / (1 - hp.momentum))


class MomentumSecondOrder(_SecondOrderForm):
    """Kovachki–Stuart (η(1+β)/2)θ'' + (1−β)θ' = −∇L_λ, θ'(0) = −∇L_λ(θ0)/(1+β) (O(η²) from heavy
    ball, no time shift)."""

    name = "momentum_second_order"
    order = 2
    discrete = "heavy_ball"

    def mass_damping(self, hp):
        return 0.5 * hp.lr * (1.0 + hp.momentum), 1.0 - hp.momentum


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

    def law(self, hp):
        lam, eta, beta = hp.weight_decay, hp.lr, hp.momentum
        c = eta * (1 + beta) / (4 * (1 - beta) ** 2)
        return Law(FORCED, rate=2 * lam * (1 + 2 * c * lam) / (1 - beta), gain=eta * (1 + beta) / (1 - beta) ** 3)


#: the built-in flows by name, in the order ``flowlab orders`` measures them
BUILTIN = {cls.name: cls for cls in (GradientFlow, ModifiedLoss, ModifiedTemporal, ModifiedSecondOrder,
                                      MomentumFirstOrder, MomentumSecondOrder, MomentumModified)}
BUILTIN_FLOWS = tuple(BUILTIN)
