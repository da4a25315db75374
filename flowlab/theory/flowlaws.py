"""The law each continuous model's symmetry quantities obey along its OWN trajectory
(docs/theory.md#laws-along-each-flow, derived in docs/theory.md#derivation-of-the-laws).

Each flow states its law (:meth:`flowlab.flows.Flow.law`, a :class:`~flowlab.flows.Law`); this
module integrates it.  Projecting a flow's vector field on a group's generator with the gradient
and Hessian constraints closes the dynamics of Q on a few per-group scalars.  With g = ∇L (no weight decay),
G_A = |g_A|² (rescale |g_A1|² − |g_A2|²), λ the weight decay, η the learning rate, β the momentum:

| flow | law for scale / rescale Q (translation: same rate/2 and no forcing) |
|---|---|
| ``gradient_flow`` | Q' = −2λQ |
| ``momentum_first_order`` | Q' = −2λQ/(1−β) |
| ``modified_loss`` (IGR) | Q' = −2λ̂Q + η G_A,  λ̂ = λ(1 + ηλ/2)  (the ``paper_hat`` law, full-batch g) |
| ``momentum_modified`` | Q' = −2λ̃Q + η(1+β)/(1−β)³ G_A,  λ̃ = λ(1 + 2cλ)/(1−β), c = η(1+β)/(4(1−β)²) |
| ``modified_second_order`` | Q' = −2λ(1 + ηλ/2 + η²λ²/3)Q + η G_A + η²(⟨g_A, H∇L_λ⟩ + λG_A) |
| ``modified_temporal``, ``momentum_second_order`` | x'' + 2γx' + ω²x = 2|θ'_A|², γ = (1−β)/(η(1+β)), ω² = 4λ/(η(1+β)); translation ω_tr² = 2λ/(η(1+β)), no forcing; x(0) = Q(0), x'(0) from θ'(0) |

(⟨g_A, ·⟩ for rescale is the A1 part minus the A2 part; the third-derivative term of
``modified_second_order`` uses ∇³L[θ_A, v, v] = −2⟨v_A, Hv⟩, from differentiating Hθ_A = −g_A.)

Every law is integrated *alongside* the flow: :class:`LawFlow` composes a flow with its law,
appending the law's own state (Q_law, or (x, x') for the oscillators) to its ODE state, so the check
is exact to the solver's tolerance, not limited by the recording interval; coefficients follow η(t)
under a schedule.  The gradient (and, for the second-order modified equation, the first HVP) the
flow computes anyway is reused, not recomputed.  The composition happens when the run builds its
followers (:class:`FlowLaws`, the theory part's ``laws`` service): nothing is patched afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from flowlab.flows.base import CLOSED, OSCILLATOR, Flow, Hyper


class QuadForms:
    """Per-group Σ_A1 x⊙y − Σ_A2 x⊙y (``quad``) and ⟨x_A, 1⟩ (``lin``) as segment sums that work on
    torch tensors and on JAX arrays (inside jit) alike."""

    def __init__(self, groups):
        self.G = len(groups)
        rows, cols, vals = [], [], []
        for part in ("quad", "lin"):
            c = groups.csr(part)
            counts = (c.crow[1:] - c.crow[:-1]).to(torch.int64)
            rows.append(torch.repeat_interleave(torch.arange(self.G), counts))
            cols.append(c.col.to(torch.int64))
            vals.append(c.val.to(torch.float64))
        self.parts = {"quad": (rows[0], cols[0], vals[0]), "lin": (rows[1], cols[1], vals[1])}
        self.is_translation = torch.as_tensor(groups.kinds == "translation")
        self._cache: dict = {}

    def _part(self, name: str, like: Any):
        key = (name, type(like).__name__, str(getattr(like, "device", "")), str(like.dtype))
        if key not in self._cache:
            r, c, v = self.parts[name]
            if isinstance(like, torch.Tensor):
                self._cache[key] = (r.to(like.device), c.to(like.device), v.to(like.device, like.dtype))
            else:  # numpy constants: safe to cache across jit traces (JAX arrays made in a trace are not)
                import numpy as np

                self._cache[key] = (r.numpy(), c.numpy(), v.numpy().astype(np.dtype(like.dtype)))
        return self._cache[key]

    def _segment(self, name: str, x: Any, y: Any | None) -> Any:
        r, c, v = self._part(name, x)
        terms = v * x[c] if y is None else v * x[c] * y[c]
        if isinstance(x, torch.Tensor):
            return torch.zeros(self.G, dtype=x.dtype, device=x.device).index_add_(0, r, terms)
        import jax

        return jax.ops.segment_sum(terms, r, num_segments=self.G)

    def quad(self, x: Any, y: Any) -> Any:
        return self._segment("quad", x, y)

    def lin(self, x: Any) -> Any:
        return self._segment("lin", x, None)

    def mask(self, like: Any) -> tuple[Any, Any]:
        """(translation mask, rate factor: 1/2 on translation groups, 1 elsewhere) as arrays like ``like``."""
        key = ("mask", type(like).__name__, str(getattr(like, "device", "")), str(like.dtype))
        if key not in self._cache:
            half = torch.where(self.is_translation, 0.5, 1.0).to(torch.float64)
            tr = self.is_translation.to(torch.float64)
            if isinstance(like, torch.Tensor):
                self._cache[key] = (tr.to(like.device, like.dtype), half.to(like.device, like.dtype))
            else:
                import numpy as np

                dt = np.dtype(like.dtype)
                self._cache[key] = (tr.numpy().astype(dt), half.numpy().astype(dt))
        return self._cache[key]


class _Remember:
    """An ops proxy that remembers the gradient (and first HVP) the wrapped flow computed at θ."""

    def __init__(self, ops: Any, theta: Any):
        self.ops, self.theta = ops, theta
        self.last_grad: Any = None
        self.first_hvp: Any = None
        self.counts = getattr(ops, "counts", {})

    def loss(self, theta):
        return self.ops.loss(theta)

    def loss_and_grad(self, theta):
        out = self.ops.loss_and_grad(theta)
        if theta is self.theta and self.last_grad is None:
            self.last_grad = out[1]
        return out

    def grad(self, theta):
        return self.loss_and_grad(theta)[1]

    def hvp(self, theta, v):
        out = self.ops.hvp(theta, v)
        if theta is self.theta and self.first_hvp is None:
            self.first_hvp = out
        return out

    def d3(self, theta, v):
        return self.ops.d3(theta, v)


class LawFlow(Flow):
    """``inner`` with its law's state appended: (*inner_state, Q_law) for first-order laws
    (Q_law' = −rate·Q_law + forcing, Q_law(0) = Q(0)) or (*inner_state, x, x') for the oscillators
    (x(0) = Q(0), x'(0) = Q'(0) from θ'(0)).  Translation groups decay at rate/2 without forcing
    (oscillators: ω_tr² = ω²/2)."""

    def __init__(self, inner: Flow, forms: QuadForms, q0: torch.Tensor, hp0: Hyper):
        law = inner.law(hp0)
        if law is None:
            raise ValueError(f"{inner!r} has no law")
        self.inner, self.forms, self.q0 = inner, forms, q0
        self.kind = law.kind
        self.name, self.order, self.discrete = inner.name, inner.order, getattr(inner, "discrete", "gd")
        self.n_inner = inner.state_size
        self.state_size = self.n_inner + (2 if law.kind == OSCILLATOR else 1)
        self.needs = getattr(inner, "needs", frozenset())

    def options(self) -> dict:
        return self.inner.options()

    def law(self, hp: Hyper):
        return self.inner.law(hp)

    def observe(self, state: tuple) -> dict:
        observe = getattr(self.inner, "observe", None)
        inner = observe(state[: self.n_inner]) if observe is not None else {}
        return {**inner, "flow_law": self.predicted(state)}

    def time_shift(self, hp: Hyper) -> float:
        return self.inner.time_shift(hp)

    def theta(self, state: tuple) -> Any:
        return self.inner.theta(state[: self.n_inner])

    def velocity(self, state: tuple) -> Any:
        velocity = getattr(self.inner, "velocity", None)
        return velocity(state[: self.n_inner]) if velocity is not None else None

    def initial_state(self, theta0, ops, hp):
        inner = tuple(self.inner.initial_state(theta0, ops, hp))
        x0 = self.q0.to(theta0.device, theta0.dtype) if isinstance(theta0, torch.Tensor) else _like(self.q0, theta0)
        if self.kind != OSCILLATOR:
            return (*inner, x0)
        u0 = inner[1]
        tr, _ = self.forms.mask(theta0)
        y0 = tr * self.forms.lin(u0) + (1 - tr) * 2 * self.forms.quad(theta0, u0)
        return (*inner, x0, y0)

    def vector_field(self, t, state, ops, hp):
        inner_state = tuple(state[: self.n_inner])
        law = self.inner.law(hp)
        theta = inner_state[0]
        tr, half = self.forms.mask(theta)
        if law.kind == OSCILLATOR:  # the forcing 2|θ'_A|² comes from the state itself
            d_inner = self.inner.vector_field(t, inner_state, ops, hp)
            u = inner_state[1]
            x, y = state[self.n_inner], state[self.n_inner + 1]
            forcing = (1 - tr) * 2 * self.forms.quad(u, u)
            return (*d_inner, y, forcing - 2 * law.gamma * y - (law.omega2 * half) * x)
        q = state[self.n_inner]
        if law.kind == CLOSED:
            d_inner = self.inner.vector_field(t, inner_state, ops, hp)
            return (*d_inner, -(law.rate * half) * q)
        proxy = _Remember(ops, theta)
        d_inner = self.inner.vector_field(t, inner_state, proxy, hp)
        g = proxy.last_grad if proxy.last_grad is not None else ops.grad(theta)
        forcing = law.gain * self.forms.quad(g, g)
        if law.hvp_gain:
            hv = proxy.first_hvp if proxy.first_hvp is not None else ops.hvp(theta, g + hp.weight_decay * theta)
            forcing = forcing + law.hvp_gain * self.forms.quad(g, hv)
        return (*d_inner, (1 - tr) * forcing - (law.rate * half) * q)

    def predicted(self, state: tuple) -> torch.Tensor:
        """Q_law (float64 torch) from a state."""
        return _to_torch(state[self.n_inner], self.q0)


def _like(q0: torch.Tensor, x: Any) -> Any:
    import numpy as np

    return q0.cpu().numpy().astype(np.dtype(x.dtype))


def _to_torch(x: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(like.device, torch.float64)
    import numpy as np

    return torch.as_tensor(np.array(x, dtype=np.float64), device=like.device)


class FlowLaws:
    """The theory part's ``laws`` service: composes each flow that states a law with it
    (:class:`LawFlow`), for the groups of the run's symmetry recorder."""

    def __init__(self, groups, projector, theta0: torch.Tensor, problem: Any = None):
        self.forms = QuadForms(groups)
        self.projector, self.problem = projector, problem
        self.q0 = projector.quantities(theta0).cpu()
        self.composed: list[str] = []  # labels of the flows composed with their law

    def compose(self, flow: Flow, hp0: Hyper, label: str = "") -> Flow:
        """``flow`` with its law appended to its state (``flow`` itself when it states none)."""
        law = getattr(flow, "law", None)
        if law is None or law(hp0) is None:
            return flow
        self.composed.append(label or str(getattr(flow, "name", flow)))
        if getattr(flow, "stochastic", False):  # the Itô law, stepped with the path
            from flowlab.stochastic.laws import StochasticLawFlow

            return StochasticLawFlow(flow, self.forms, self.projector, self.q0, hp0, self.problem)
        return LawFlow(flow, self.forms, self.q0, hp0)
