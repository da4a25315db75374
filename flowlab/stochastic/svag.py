"""SVAG and the SGD modified loss: two more models of minibatch SGD (docs/theory.md#stochastic-models).

``svag`` — Stochastic Variance Amplified Gradient (Li, Malladi & Arora, "On the validity of modeling
SGD with stochastic differential equations (SDEs)", NeurIPS 2021).  A discrete dynamics that takes l
steps of η/l per SGD step, each with two independent batch gradients weighted so that the mean drift
stays ∇L_λ while the noise covariance per unit time stays ηΣ_B:

    θ ← θ − (η/l)(r₁ ĝ_{γ1} + r₂ ĝ_{γ2}) − (η/l) λθ,      r₁,₂ = (1 ± √(2l − 1))/2,

r₁ + r₂ = 1 and r₁² + r₂² = l, so one step has mean −(η/l)∇L_λ and covariance (η/l)²·l·Σ_B = (η²/l)Σ_B,
i.e. per unit time (η/l of time per step) drift −∇L_λ and covariance ηΣ_B for every l (checked
exactly in tests/test_svag.py).  As l → ∞ it converges weakly to ``sme`` (SME-1), with weak error
O(1/l) at fixed η (the paper's main theorem, Thm 4.3; the rate is theirs, not re-derived here); l = 1
is plain SGD (r = (1, 0)).

``sgd_modified_loss`` — the modified loss of SGD with random reshuffling (Smith, Dherin, Barrett &
De, "On the origin of implicit regularization in stochastic gradient descent", ICLR 2021): gradient
flow on L̃ = L_λ + (η/4m) Σ_k |∇L̂_{k,λ}|² for the m = ⌊N/B⌋ batches of an epoch, the path the mean
SGD iterate follows (averaged over the orders of an epoch's batches) to O(η²) per step.

Batch Hessian-vector products come from :func:`batch_grad_hvp` on the torch :class:`flowlab.Problem`
(``ops.problem``): the ops contract of :mod:`flowlab.flows.base` has full-batch derivatives only.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..flows.base import Flow, Hyper, grad_l, hvp_l
from .sde import SamplingWarning, StochasticFlow

#: how ``sgd_modified_loss`` computes its correction term
SGD_CORRECTIONS = ("epoch", "sampled")


def svag_weights(ell: float) -> tuple[float, float]:
    """(r₁, r₂) = ((1 + √(2l−1))/2, (1 − √(2l−1))/2) at l = ``ell``: r₁ + r₂ = 1, r₁² + r₂² = l; (1, 0) at l = 1."""
    s = math.sqrt(2.0 * ell - 1.0)
    return 0.5 * (1.0 + s), 0.5 * (1.0 - s)


def _batch_size(hp: Hyper, n: int, field: str, name: str) -> int:
    if hp.batch_size is None:
        raise ConfigError(field, name, "draws minibatches of B examples: it needs optimizer.batch_size "
                          "(this study is full batch)")
    return int(hp.batch_size)


class SVAG(StochasticFlow):
    """SVAG (module docstring): l steps of η/l per SGD step, each θ ← θ − (η/l)(r₁ĝ₁ + r₂ĝ₂ + λθ) with
    two independent batches of B examples drawn from the path's
    :class:`~flowlab.stochastic.noise.NoiseSource` (one batch when l = 1, where r₂ = 0).

    Weak order 1 in 1/l against ``sme``: E φ(θ_SVAG(t)) − E φ(Θ_SME(t)) = O(1/l) at fixed η, so it
    converges weakly to ``sme`` as l grows; l = 1 is SGD itself (with the path's own batches).

    Options: ``l`` (a number ≥ 1, default 4) and ``sampling`` (``with_replacement`` or
    ``without_replacement``, the scheme of each batch; default the study's, reshuffling read as
    without replacement with a :class:`~flowlab.stochastic.sde.SamplingWarning`, as for the SDEs).

    Integration: ``flowlab:euler_maruyama`` (the default) with its default step, the flow's
    :meth:`step_size` η/l; **do not set dt**.  Each recording interval of j SGD steps is cut into
    ⌈j·l⌉ equal steps, so j·l must be an integer (any integer l works); a step that is not η/l (a dt
    given, a non-integer j·l, a tightened integrator) is refused with a :class:`ConfigError` on
    ``dt`` at that step (:meth:`check_integrator` refuses a given dt up front where the caller
    invokes it).  Recorded at the matched times t = Σ η; ``nfe`` counts SVAG steps (l per SGD step,
    each two batch gradients).  A study needs a batch size (a full-batch study is refused).

    ``vector_field`` is the drift −∇L_λ (for code that asks); SVAG has no law of its own (None).
    Paths: θ of shape (m,) uses ``ops.batch_loss_grad``; θ of shape (K, m) (an ensemble) uses
    ``ops.batch_grads(θ, idx (K, J, B))``, with the K·J batches drawn path by path in the same
    order as K single paths sharing one generator.  torch only (the batches come from a torch
    generator)."""

    name = "svag"
    order = 1
    weak_order = 1
    needs = frozenset({"loss_and_grad", "batch_loss_grad"})
    #: relative mismatch of a step with η/l that counts as round-off
    STEP_RTOL: ClassVar[float] = 1e-6
    #: its step is part of the model (η/l), not a discretisation to refine: callers that set a dt for
    #: stochastic flows (weak-error refinement, Talay–Tubaro) must leave this one alone
    takes_dt: ClassVar[bool] = False

    def __init__(self, l: float = 4, sampling: str | None = None):  # noqa: E741 - the paper's name
        if (not isinstance(l, numbers.Real) or isinstance(l, bool) or not math.isfinite(float(l))
                or float(l) < 1):
            raise ConfigError("l", l, "expected a number >= 1 (SVAG's amplification: l steps of η/l per "
                              "SGD step; l = 1 is SGD)")
        super().__init__(diffusion="batches", batches=2, sampling=sampling)
        self.l = float(l)
        self.r1, self.r2 = svag_weights(self.l)
        self._field = "flows"

    def options(self) -> dict:
        return {"l": self.l, "sampling": self.sampling}

    def step_size(self, hp: Hyper) -> float:
        """η/l: the step of ``flowlab:euler_maruyama`` when no dt is given."""
        return hp.lr / self.l

    def check(self, hp: Hyper, problem: Any, field: str) -> None:
        """Refuse a full-batch study; warn about sampling schemes it does not model (the SDEs' rules)."""
        self._field = field
        _batch_size(hp, int(problem.n), f"{field}.name", self.name)
        super().check(hp, problem, field)

    def check_integrator(self, integrator: Any, hp: Hyper, field: str = "flows") -> None:
        """Refuse an integrator whose given dt is not η/l (a caller that has the integrator at build
        time invokes this; without it the first step refuses)."""
        dt = getattr(integrator, "dt", None)
        if dt is not None and not self._is_step(float(dt), hp):
            raise ConfigError(f"{field}.dt", dt, f"svag steps by η/l = {hp.lr / self.l:.6g}: leave dt unset")

    def _is_step(self, h: float, hp: Hyper) -> bool:
        want = hp.lr / self.l
        return abs(h - want) <= self.STEP_RTOL * want

    # ------------------------------------------------------------------ dynamics
    def vector_field(self, t, state, ops, hp):
        """The drift −∇L_λ (SVAG itself is :meth:`step`)."""
        return (-grad_l(ops, state[0], hp),)

    def step(self, t: float, state: tuple, ops: Any, hp: Hyper, h: float, noise: Any) -> tuple:
        """One SVAG step θ − (η/l)(r₁ĝ₁ + r₂ĝ₂ + λθ) (``h`` must be η/l)."""
        if not self._is_step(float(h), hp):
            raise ConfigError(f"{self._field}.dt", h, f"svag steps by η/l = {hp.lr / self.l:.6g}: leave dt unset, and "
                              "record at multiples of 1/l SGD steps (an integer l always works)")
        theta = state[0]
        n = int(ops.n)
        B = _batch_size(hp, n, f"{self._field}.name", self.name)
        scheme = self.scheme(hp)
        J = 1 if self.r2 == 0.0 else 2
        if theta.dim() == 1:
            grads = [ops.batch_loss_grad(theta, noise.batch(n, B, scheme))[1] for _ in range(J)]
        else:
            K = theta.shape[0]
            idx = torch.stack([noise.batch(n, B, scheme) for _ in range(K * J)]).view(K, J, B)
            both = ops.batch_grads(theta, idx)
            grads = [both[:, j] for j in range(J)]
        d = grads[0] if J == 1 else self.r1 * grads[0] + self.r2 * grads[1]  # J = 1: l = 1, r₁ = 1
        if hp.weight_decay:
            d = torch.add(d, theta, alpha=hp.weight_decay)  # torch.optim.SGD's d = ĝ + λθ
        return (torch.add(theta, d, alpha=-(hp.lr / self.l)),)

    def law(self, hp: Hyper) -> None:
        return None


# --------------------------------------------------------------------- the SGD modified loss


def batch_grad_hvp(problem: Any, theta: torch.Tensor, index: torch.Tensor | None, weight_decay: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, H_λ v) with v = ∇L̂_λ = ∇L̂ + λθ the gradient of the batch loss on the examples ``index``
    (None: all of them, in one piece) and H_λ = Ĥ + λI its Hessian: one gradient with its autograd
    graph kept and one double-backward pass (:meth:`flowlab.Problem.grad_graph`; BatchNorm with the
    batch's statistics).  Counted as one ``grad`` and one ``hvp`` in ``problem.counts``."""
    problem.counts["grad"] += 1
    problem.counts["hvp"] += 1
    _, g, graph = problem.grad_graph(theta, problem.batch(index))
    v = g + weight_decay * theta if weight_decay else g
    hv = graph.hvp(v, retain=False)
    return v, (hv + weight_decay * v if weight_decay else hv)


class SGDModifiedLoss(Flow):
    """Gradient flow on the SGD modified loss (Smith, Dherin, Barrett & De, ICLR 2021):

        θ' = −∇L̃,   L̃ = L_λ + (η/4m) Σ_k |∇L̂_{k,λ}|²,   ∇L̃ = ∇L_λ + (η/2m) Σ_k H_{k,λ} ∇L̂_{k,λ},

    over the m = ⌊N/B⌋ batches of an epoch (L̂_{k,λ} = L̂_k + (λ/2)|θ|²: each SGD step descends its
    batch loss with the coupled weight decay, so the regulariser is in every batch loss and in L_λ).
    Since Σ_k(∇L̂_k − ∇L) = 0 for a partition of the data, L̃ = L_λ + (η/4)|∇L_λ|² + (η/4m)Σ_k|∇L̂_k −
    ∇L|²: IGR (``modified_loss``) plus the batch-gradient variance; averaged over partitions the last
    term is (N−B)/(N−1)·(η/4B)·(1/N)Σ_i|g_i − ḡ|².  Full batch (B = N, m = 1): L̃ = L_λ + (η/4)|∇L_λ|²,
    i.e. ``modified_loss`` with ``correction = "hvp"`` (a full-batch study takes that path itself).

    The constant, checked by derivation and numerically (tests/test_svag.py): one epoch of SGD in
    the order σ is θ_m = θ0 − ηΣ_k ĝ_k + η²Σ_{j<k} H_{σ(k)}ĝ_{σ(j)} + O(η³); averaged over the m!
    orders Σ_{j<k} becomes ½(Σ_a H_a Σ_b ĝ_b − Σ_a H_a ĝ_a) = ½(m² H ḡ − Σ_a H_a ĝ_a), while the flow
    gives θ(mη) = θ0 − mη∇L̃ + ½m²η² H ḡ + O(η³); they agree iff ∇(L̃ − L) = (η/2m)Σ_a H_a ĝ_a, the
    gradient of (η/4m)Σ_a|ĝ_a|² — the constant of the team notes and of the paper's statement as
    recalled (the paper itself was not available to read here).  The test averages one epoch of SGD
    over all 3! orders of a partition (tiny tanh network, m = 3, λ = 0.05) and finds the gap to this
    flow falling by 7.8× from η = 0.1 to 0.05 (η³), against 3.95× (η²) for IGR's correction alone.

    The flow models random reshuffling (the mean iterate over the orders within each epoch); with
    the study's batches drawn i.i.d. (``with_replacement`` / ``without_replacement``) the batches of
    consecutive steps are independent and the mean drift is IGR's — a :class:`SamplingWarning`
    says so.  With N not a multiple of B the epoch's m batches cover mB < N examples (torch's
    ``drop_last``); L_λ stays the full loss (its expectation over partitions).

    Options:

    - ``correction = "epoch"`` (default): exact for ONE fixed partition of the data into m batches,
      drawn once from a permutation seeded by ``seed`` (default 0) and kept for the whole run (the
      shuffle-averaged form would need per-example HVPs; not implemented).  The field is a smooth,
      deterministic function of θ: any integrator works.
    - ``correction = "sampled"`` with ``samples = K`` (default 8): (η/2K)Σ_j H_{S_j,λ}∇L̂_{S_j,λ} over
      K independent uniform B-subsets S_j drawn afresh at each evaluation (generator seeded by
      ``seed``) — an unbiased estimate of the correction averaged over shuffles (each batch of a
      random partition is marginally a uniform B-subset).  The field is then random: integrate it
      with a fixed-step method (``flowlab:euler`` or ``flowlab:rk4`` with dt), not an adaptive one.

    Cost per evaluation, in units of a full-batch gradient (an HVP costs about two gradients):
    ``epoch`` one full gradient + m batch gradients and m batch HVPs over mB ≤ N examples ≈ 1 + 1 + 2
    = 4; ``sampled`` 1 + 3KB/N.  torch only (batch HVPs through ``ops.problem``)."""

    name = "sgd_modified_loss"
    order = 2
    needs = frozenset({"loss_and_grad", "hvp"})

    def __init__(self, correction: str = "epoch", samples: int | None = None, seed: int = 0):
        if correction not in SGD_CORRECTIONS:
            raise ConfigError("correction", correction, f"allowed: {', '.join(SGD_CORRECTIONS)}")
        if samples is not None:
            if correction != "sampled":
                raise ConfigError("samples", samples, "only with correction = \"sampled\" (the epoch correction "
                                  "uses the m batches of one epoch)")
            if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
                raise ConfigError("samples", samples, "expected an integer >= 1 (batches sampled per evaluation)")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError("seed", seed, "expected an integer >= 0 (the partition's / samples' generator)")
        self.correction = correction
        self.samples = (8 if samples is None else samples) if correction == "sampled" else None
        self.seed = seed
        self._partition: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._warned = False

    def options(self) -> dict:
        return {"correction": self.correction, "samples": self.samples, "seed": self.seed}

    def partition(self, n: int, batch_size: int) -> torch.Tensor:
        """The ``epoch`` correction's m = ⌊n/B⌋ batches (m, B): a permutation of range(n) drawn from a
        generator seeded ``seed``, cut into consecutive batches (the remainder dropped); fixed once drawn."""
        m = n // batch_size
        part = self._partition
        if part is None or part.shape != (m, batch_size):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            part = self._partition = perm[: m * batch_size].view(m, batch_size)
        return part

    def sampled_batches(self, n: int, batch_size: int) -> torch.Tensor:
        """``samples`` independent uniform B-subsets (K, B), drawn afresh (``sampled`` correction)."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return torch.stack([torch.randperm(n, generator=self._generator)[:batch_size]
                            for _ in range(int(self.samples or 1))])

    def _warn(self, hp: Hyper) -> None:
        if not self._warned and hp.sampling != "reshuffle":
            self._warned = True
            warnings.warn(f"{self.name}: the modified loss with the batch-gradient term models random reshuffling; "
                          f"the discrete run samples {hp.sampling!r} (independent batches), whose mean drift is "
                          "modified_loss's", SamplingWarning, stacklevel=3)

    def vector_field(self, t, state, ops, hp):
        theta = state[0]
        G = grad_l(ops, theta, hp)
        eta, lam = hp.lr, hp.weight_decay
        if hp.batch_size is None:  # full batch: m = 1, the correction is (η/2) H_λ ∇L_λ
            return (-(G + (0.5 * eta) * hvp_l(ops, theta, G, hp)),)
        self._warn(hp)
        problem = getattr(ops, "problem", None)
        if problem is None or not hasattr(problem, "grad_graph"):
            raise ConfigError("integrator", getattr(ops, "backend", type(ops).__name__),
                              f"{self.name} needs batch Hessian-vector products of a torch Problem: use a torch "
                              "integrator (flowlab:* or torchdiffeq:*)")
        n = int(ops.n) if hasattr(ops, "n") else int(problem.n)
        B = int(hp.batch_size)
        if self.correction == "epoch":
            batches = self.partition(n, B)
        else:
            batches = self.sampled_batches(n, B)
        batches = batches.to(problem.X.device)
        total = None
        for idx in batches:
            _, hv = batch_grad_hvp(problem, theta, idx, lam)
            total = hv if total is None else total.add_(hv)
        counts = getattr(ops, "counts", None)
        if isinstance(counts, dict):
            counts["grad"] = counts.get("grad", 0) + len(batches)
            counts["hvp"] = counts.get("hvp", 0) + len(batches)
        return (-(G + (0.5 * eta / len(batches)) * total),)


#: the flows this module adds to the ``flows`` registry (through :mod:`flowlab.stochastic.part`)
BUILTIN_EXTRA = {SVAG.name: SVAG, SGDModifiedLoss.name: SGDModifiedLoss}
