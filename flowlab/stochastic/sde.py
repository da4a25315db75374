"""Stochastic continuous models of SGD: stochastic modified equations (Itô, time t = Σ η).

Li, Tai & E, "Stochastic modified equations and dynamics of stochastic gradient algorithms I:
mathematical foundations", JMLR 20(40), 2019 (docs/theory.md#stochastic-modified-equations):

- ``sme``  (order 1 weak):  dθ = −∇L_λ dt + (η Σ_B)^{1/2} dW;
- ``sme2`` (order 2 weak):  dθ = −(∇L_λ + (η/2) H_λ ∇L_λ) dt + (η Σ_B)^{1/2} dW, the drift of
  ``modified_loss`` = −∇(L_λ + (η/4)|∇L_λ|²);
- ``sme_momentum``: heavy ball's SDE in the second-order form of ``momentum_second_order``,
  (η(1+β)/2) θ'' + (1−β) θ' = −∇L_λ + (η Σ_B)^{1/2} Ẇ, started from rest-consistent
  θ'(0) = −∇L_λ(θ0)/(1+β) (no time shift).

Σ_B is the covariance of a batch gradient under the sampling scheme the flow models (``sampling``:
``with_replacement`` or ``without_replacement``; by default the study's, with reshuffling read as
without replacement, step by step, and a warning that its within-epoch correlation is not modelled).
The diffusion is matrix-free (:mod:`flowlab.stochastic.noise`): ``diffusion = "per_example"``
(noise dimension N, one backward pass per step) or ``"batches"`` (the covariance of ``batches`` = K
batch gradients drawn each step, noise dimension K; for models whose examples are coupled).

A stochastic flow is a :class:`~flowlab.flows.Flow` whose ``vector_field`` is its drift, with
``diffusion(t, state, ops, hp, v)`` = σ(state) v (linear in v ∈ R^noise_dim) and ``step(t, state,
ops, hp, h, noise)``: one Itô Euler–Maruyama step (fused where one backward pass gives drift and
noise together).  Integrated by ``flowlab:euler_maruyama`` (torch) or ``diffrax:Euler`` (JAX).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..flows.base import FORCED, Flow, Hyper, Law, grad_l, hvp_l
from ..flows.library import MomentumSecondOrder
from .noise import DIFFUSIONS, MODELLED, NoiseSource, noise_constant

SDE_SAMPLING = ("with_replacement", "without_replacement")


class SamplingWarning(UserWarning):
    """A stochastic model is compared with a discrete run whose sampling scheme it does not model."""


class StochasticFlow(Flow):
    """Base of flowlab's stochastic models (module docstring).  Options: ``diffusion``
    (``per_example`` | ``batches``), ``batches`` (K for ``batches``, default 8), ``sampling`` (the
    scheme whose Σ_B the noise has; default the study's)."""

    stochastic: ClassVar[bool] = True
    default_integrator: ClassVar[str] = "flowlab:euler_maruyama"
    #: weak order in η against the discrete run it models
    weak_order: ClassVar[int] = 1

    def __init__(self, diffusion: str = "per_example", batches: int = 8, sampling: str | None = None):
        if diffusion not in DIFFUSIONS:
            raise ConfigError("diffusion", diffusion, f"allowed: {', '.join(DIFFUSIONS)}")
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 2:
            raise ConfigError("batches", batches, "expected an integer >= 2 (batch gradients per step)")
        if sampling is not None and sampling not in SDE_SAMPLING:
            raise ConfigError("sampling", sampling, f"allowed: {', '.join(SDE_SAMPLING)} (the scheme whose "
                              "noise covariance the SDE has; default: the study's optimizer.sampling)")
        self.diffusion_kind, self.batches, self.sampling = diffusion, batches, sampling

    def options(self) -> dict:
        return {"diffusion": self.diffusion_kind, "batches": self.batches, "sampling": self.sampling}

    # ------------------------------------------------------------ noise model
    def scheme(self, hp: Hyper) -> str:
        """The sampling scheme this flow's Σ_B models."""
        if self.sampling is not None:
            return self.sampling
        return hp.sampling if hp.sampling in MODELLED else "without_replacement"

    def check(self, hp: Hyper, problem: Any, field: str) -> None:
        """Refuse what cannot be simulated; warn about what is not modelled (called once per run)."""
        if self.diffusion_kind == "per_example":
            from .noise import check_per_example

            check_per_example(problem, f"{field}.diffusion")
        if hp.sampling not in MODELLED and self.sampling is None:
            warnings.warn(f"{self.name}: the discrete run reshuffles every epoch, which correlates its batches; "
                          "the SDE models independent uniform B-subsets (without replacement) — set "
                          "optimizer.sampling to with_replacement or without_replacement to compare like with like",
                          SamplingWarning, stacklevel=2)
        elif self.sampling is not None and self.sampling != hp.sampling:
            warnings.warn(f"{self.name}: its noise models sampling {self.sampling!r}, the discrete run uses "
                          f"{hp.sampling!r}", SamplingWarning, stacklevel=2)

    def noise_dim(self, ops: Any, hp: Hyper) -> int:
        return self.batches if self.diffusion_kind == "batches" else int(ops.n)

    def _s(self, ops: Any, hp: Hyper) -> float:
        """s with σv = −s ∇Σ(v_i − v̄)ℓ_i (per_example), or √(η/(K−1)) (batches)."""
        import math

        if self.diffusion_kind == "batches":
            return math.sqrt(hp.lr / (self.batches - 1))
        n = int(ops.n)
        B = n if hp.batch_size is None else int(hp.batch_size)
        return math.sqrt(hp.lr * noise_constant(self.scheme(hp), hp.batch_size, n) / (B * n))

    def noise_vector(self, theta: Any, ops: Any, hp: Hyper, v: Any, noise: NoiseSource | None = None) -> Any:
        """σ(θ) v.  ``per_example``: −s ∇Σ_i (v_i − v̄) ℓ_i.  ``batches``: −√(η/(K−1)) Σ_k (v_k − v̄) ĝ_k
        for K batches drawn from ``noise`` (covariance (1/(K−1))Σ_k (ĝ_k − ḡ_K)(ĝ_k − ḡ_K)ᵀ, an unbiased
        estimate of Σ_B)."""
        s = self._s(ops, hp)
        v = v - v.mean(-1)[..., None]
        if self.diffusion_kind == "per_example":
            return -(ops.weighted_loss_grad(theta, s * v)[1])
        if noise is None:
            raise ValueError("diffusion = 'batches' draws its batches: pass the path's NoiseSource")
        grads = self.draw_batch_grads(theta, ops, hp, noise)
        self.last_batch_grads = grads
        return -s * torch.einsum("...k,...km->...m", v.to(grads.dtype), grads)

    def draw_batch_grads(self, theta: Any, ops: Any, hp: Hyper, noise: NoiseSource) -> Any:
        """K batch gradients ĝ_k at θ (K, m) (or (P, K, m) for P paths), batches by the flow's scheme."""
        n = int(ops.n)
        B = n if hp.batch_size is None else int(hp.batch_size)
        paths = theta.shape[0] if theta.ndim == 2 else None
        count = self.batches * (paths or 1)
        idx = torch.stack([noise.batch(n, B, self.scheme(hp)) for _ in range(count)])
        if paths is None:
            return torch.stack([ops.batch_loss_grad(theta, i)[1] for i in idx])
        return ops.batch_grads(theta, idx.view(paths, self.batches, B))

    def diffusion(self, t: Any, state: tuple, ops: Any, hp: Hyper, v: Any, noise: NoiseSource | None = None) -> tuple:
        """σ(state) v as a state-shaped tuple (noise only on θ for first-order forms)."""
        return (self.noise_vector(state[0], ops, hp, v, noise),)

    def step(self, t: float, state: tuple, ops: Any, hp: Hyper, h: float, noise: NoiseSource) -> tuple:
        """One Itô Euler–Maruyama step: state + h·drift + σ ΔW."""
        dw = noise.normal(self._noise_shape(state, ops, hp), h)
        drift = self.vector_field(t, state, ops, hp)
        kick = self.diffusion(t, state, ops, hp, dw, noise)
        return tuple(x + h * f + k if k is not None else x + h * f
                     for x, f, k in zip(state, drift, kick + (None,) * (len(state) - len(kick))))

    def _noise_shape(self, state: tuple, ops: Any, hp: Hyper) -> tuple[int, ...]:
        theta = state[0]
        d = self.noise_dim(ops, hp)
        return (theta.shape[0], d) if theta.ndim == 2 else (d,)

    def noise_law_gain(self, hp: Hyper) -> float:
        """The coefficient of tr Σ_{B,A} in d|θ_A|²/dt (the Itô term of the law)."""
        return hp.lr


class SME(StochasticFlow):
    """SME-1: dθ = −∇L_λ dt + (η Σ_B)^{1/2} dW (weak order 1); one backward pass per EM step."""

    name = "sme"
    order = 1
    weak_order = 1
    needs = frozenset({"loss_and_grad", "weighted_loss_grad"})

    def vector_field(self, t, state, ops, hp):
        return (-grad_l(ops, state[0], hp),)

    def step(self, t, state, ops, hp, h, noise):
        if self.diffusion_kind != "per_example":
            return super().step(t, state, ops, hp, h, noise)
        theta = state[0]
        dw = noise.normal(self._noise_shape(state, ops, hp), h)
        n = int(ops.n)
        w = (h / n) + self._s(ops, hp) * (dw - dw.mean(-1)[..., None])
        g = ops.weighted_loss_grad(theta, w)[1]  # h∇L − σΔW
        out = theta - g
        if hp.weight_decay:
            out = out - (h * hp.weight_decay) * theta
        return (out,)

    def law(self, hp):
        return Law(FORCED, rate=2 * hp.weight_decay, gain=0.0)


class SME2(StochasticFlow):
    """SME-2: dθ = −(∇L_λ + (η/2)H_λ∇L_λ) dt + (η Σ_B)^{1/2} dW (weak order 2)."""

    name = "sme2"
    order = 2
    weak_order = 2
    needs = frozenset({"loss_and_grad", "hvp", "weighted_loss_grad"})

    def vector_field(self, t, state, ops, hp):
        theta = state[0]
        G = grad_l(ops, theta, hp)
        return (-(G + (0.5 * hp.lr) * hvp_l(ops, theta, G, hp)),)

    def law(self, hp):
        lam, eta = hp.weight_decay, hp.lr
        return Law(FORCED, rate=2 * lam * (1 + eta * lam / 2), gain=eta)


class SMEMomentum(StochasticFlow, MomentumSecondOrder):
    """Heavy ball's SDE, second-order form: (η(1+β)/2)θ'' + (1−β)θ' = −∇L_λ + (ηΣ_B)^{1/2}Ẇ, i.e.
    dθ = u dt, m du = (−∇L_λ − c u) dt + (ηΣ_B)^{1/2} dW with m = η(1+β)/2, c = 1−β, u(0) =
    −∇L_λ(θ0)/(1+β) (weak order 1; no time shift).  The drift, mass, damping and start are
    ``momentum_second_order``'s own."""

    name = "sme_momentum"
    order = 1
    weak_order = 1

    def law(self, hp):
        return None  # the oscillator law along a noisy path is derived in the docs, not implemented

    def diffusion(self, t, state, ops, hp, v, noise=None):
        m, _ = self.mass_damping(hp)
        return (None, (1.0 / m) * self.noise_vector(state[0], ops, hp, v, noise))

    def step(self, t, state, ops, hp, h, noise):
        dw = noise.normal(self._noise_shape(state, ops, hp), h)
        drift = self.vector_field(t, state, ops, hp)
        kick = self.diffusion(t, state, ops, hp, dw, noise)
        return (state[0] + h * drift[0], state[1] + h * drift[1] + kick[1])


BUILTIN_SDES = {cls.name: cls for cls in (SME, SME2, SMEMomentum)}
