"""The Itô law of the symmetry quantities along an SDE path (docs/theory.md#symmetry-under-noise).

Every per-example loss has the network's symmetries, so every per-example gradient g_i obeys the
group's gradient constraint (scale: ⟨θ_A, g_i,A⟩ = 0; rescale: ⟨θ_A1, g_i,A1⟩ = ⟨θ_A2, g_i,A2⟩;
translation: ⟨g_i,A, 1⟩ = 0), and so does every column of σ(θ) (a combination of the g_i − ḡ, or of
batch gradients).  Itô's formula on Q = |θ_A|² along dθ = b dt + σ dW gives
dQ = 2⟨θ_A, b_A⟩dt + 2⟨θ_A, σ_A dW⟩ + tr(σ_A σ_Aᵀ)dt; the martingale term vanishes identically and,
path by path,

    scale / rescale:  dQ/dt = −2λ̂ Q + gain·G_A + η·tr Σ_{B,A}        translation: d⟨θ_A,1⟩/dt = −λ⟨θ_A,1⟩

with tr Σ_{B,A} = (c/B)(1/N)Σ_i |g_i,A − ḡ_A|² (rescale: the A1 part minus the A2 part), λ̂ and gain
those of the drift's own law (``sme``: λ̂ = λ, gain 0; ``sme2``: IGR's λ̂ = λ(1 + ηλ/2), gain η).
:class:`StochasticLawFlow` integrates this law beside the path, by Euler on the same grid with the
trace at the step's left end (exact per-example group norms, chunk by chunk through ``torch.func``;
for ``diffusion = "batches"`` the trace of the estimator the step itself used).  Along one path the
law then holds to the solver's strong accuracy: the quadratic variation |σ_AΔW|² fluctuates about
h·tr(σ_Aσ_Aᵀ), an O(h^{1/2}) martingale over a fixed horizon; in expectation to O(h).
"""

from __future__ import annotations

from typing import Any

import torch

from ..flows.base import Flow, Hyper
from .noise import noise_constant


def per_example_quads(problem: Any, theta: torch.Tensor, projector: Any, chunk: int = 128) -> torch.Tensor:
    """Σ_i quad(g_i − ḡ) (G,) over the whole dataset: per-example gradients by ``torch.func.vmap``,
    ``chunk`` examples at a time (never the whole N × m matrix)."""
    f = problem.functional_output
    loss_fn = problem.loss_fn

    def one(th, x, y):
        return loss_fn(f(th, x.unsqueeze(0)), y.unsqueeze(0))

    grad_i = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    total_sq = None
    total_g = torch.zeros(problem.dim, dtype=torch.float64, device=theta.device)
    n = problem.n
    with torch.enable_grad():
        for start in range(0, n, chunk):
            g = grad_i(theta.detach(), problem.X[start:start + chunk], problem.y[start:start + chunk]).detach()
            sq = projector.quad(g).sum(0)
            total_sq = sq if total_sq is None else total_sq + sq
            total_g += g.sum(0).to(torch.float64)
    mean = total_g / n
    return total_sq - n * projector.quad(mean)


class StochasticLawFlow(Flow):
    """A stochastic flow with its Itô law appended to its state: (θ, [u,] Q_law).  Its ``step`` takes
    the inner flow's step and one Euler step of the law (module docstring)."""

    stochastic = True

    def __init__(self, inner: Any, forms: Any, projector: Any, q0: torch.Tensor, hp0: Hyper, problem: Any):
        law = inner.law(hp0)
        if law is None:
            raise ValueError(f"{inner!r} has no law")
        self.inner, self.forms, self.projector, self.q0, self.problem = inner, forms, projector, q0, problem
        self.name, self.order = inner.name, inner.order
        self.discrete = getattr(inner, "discrete", "gd")
        self.n_inner = inner.state_size
        self.state_size = self.n_inner + 1
        self.needs = getattr(inner, "needs", frozenset())
        self.default_integrator = getattr(inner, "default_integrator", None)
        self.weak_order = getattr(inner, "weak_order", 1)

    # delegation
    def options(self):
        return self.inner.options()

    def law(self, hp):
        return self.inner.law(hp)

    def time_shift(self, hp):
        return self.inner.time_shift(hp)

    def theta(self, state):
        return self.inner.theta(state[: self.n_inner])

    def velocity(self, state):
        v = getattr(self.inner, "velocity", None)
        return v(state[: self.n_inner]) if v is not None else None

    def step_size(self, hp):
        size = getattr(self.inner, "step_size", None)
        return size(hp) if size is not None else hp.lr

    def check(self, hp, problem, field):
        return self.inner.check(hp, problem, field)

    def noise_dim(self, ops, hp):
        return self.inner.noise_dim(ops, hp)

    def observe(self, state):
        observe = getattr(self.inner, "observe", None)
        inner = observe(state[: self.n_inner]) if observe is not None else {}
        return {**inner, "flow_law": state[self.n_inner].detach().to(torch.float64)}

    def initial_state(self, theta0, ops, hp):
        inner = tuple(self.inner.initial_state(theta0, ops, hp))
        q0 = self.q0.to(theta0.device, torch.float64)
        if theta0.dim() == 2:
            q0 = q0.expand(theta0.shape[0], -1).clone()
        return (*inner, q0)

    def vector_field(self, t, state, ops, hp):  # the drift, for code that asks
        return (*self.inner.vector_field(t, state[: self.n_inner], ops, hp), None)

    def trace(self, theta: torch.Tensor, ops: Any, hp: Hyper) -> torch.Tensor:
        """tr Σ_{B,A} per group at θ ((G,) or (K, G)), as the step's noise has it."""
        inner = self.inner
        if getattr(inner, "diffusion_kind", "per_example") == "batches":
            g = inner.last_batch_grads  # (K_b, m) or (P, K_b, m), drawn by the step at θ
            d = g - g.mean(-2, keepdim=True)
            quads = self.projector.quad(d.reshape(-1, d.shape[-1])).reshape(*d.shape[:-1], -1)
            return quads.sum(-2) / (inner.batches - 1)
        n = self.problem.n
        B = n if hp.batch_size is None else int(hp.batch_size)
        c = noise_constant(inner.scheme(hp), hp.batch_size, n)
        if c == 0 or bool(self.projector.is_translation.all()):  # no noise, or only translation groups (no Itô term)
            lead = (theta.shape[0],) if theta.dim() == 2 else ()
            return torch.zeros(*lead, self.projector.G, dtype=torch.float64, device=theta.device)
        if theta.dim() == 2:
            sums = torch.stack([per_example_quads(self.problem, t, self.projector) for t in theta])
        else:
            sums = per_example_quads(self.problem, theta, self.projector)
        return (c / (B * n)) * sums

    def step(self, t, state, ops, hp, h, noise):
        inner_state = tuple(state[: self.n_inner])
        theta = inner_state[0]
        q = state[self.n_inner]
        law = self.inner.law(hp)
        new_inner = tuple(self.inner.step(t, inner_state, ops, hp, h, noise))
        tr_mask = self.projector.is_translation.to(torch.float64)
        half = torch.where(self.projector.is_translation, 0.5, 1.0).to(torch.float64)
        forcing = self.inner.noise_law_gain(hp) * self.trace(theta, ops, hp)
        if law.gain:
            g = ops.grad(theta).to(torch.float64)
            forcing = forcing + law.gain * self.projector.quad(g)
        dq = (1 - tr_mask) * forcing - (law.rate * half) * q
        return (*new_inner, q + h * dq)
