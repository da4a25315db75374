"""Gradient noise of SGD without a per-example gradient matrix (docs/theory.md#matrix-free-diffusion).

Per-example losses ℓ_i (i = 1..N), ḡ = ∇L = (1/N)Σ g_i, Σ₁ = (1/N)Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ.  A batch of
B examples has gradient covariance Σ_B = c·Σ₁/B with c = 1 when the batch is drawn with replacement
and c = (N−B)/(N−1) for a uniform B-subset without replacement (Li, Tai & E, JMLR 2019, §2).  The map

    σ(θ) v = −s ∇_θ Σ_i (v_i − v̄) ℓ_i(θ),   s = √(η c / (B N)),   v ∈ R^N

has σσᵀ = (η c/(B N)) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ = η Σ_B, so an Euler–Maruyama step of dθ = −∇L_λ dt +
σ dW is θ − ∇_θ Σ_i w_i ℓ_i(θ) − hλθ with w_i = h/N + s(ΔW_i − mean ΔW): ONE backward pass with
per-example weights (:func:`weighted_loss_grad`).  It needs per-example losses that do not depend on
each other: BatchNorm in training mode couples them, and such models estimate the noise from K sampled
batch gradients instead (``diffusion = "batches"``, :func:`batch_grads`).

The weighted gradient is computed from the model's output o = f(θ; X): with the batch-mean loss
L(o) = (1/n)Σ ℓ(o_i, y_i), ∂L/∂o_i = (1/n) ∂ℓ_i/∂o_i, so ∇_θ Σ_i w_i ℓ_i is the vector–Jacobian
product of f with the cotangent n·w_i·∂L/∂o_i — any loss that is a mean of per-example terms works,
with no per-example loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError

DIFFUSIONS = ("per_example", "batches")
#: the sampling scheme each built-in noise constant models
MODELLED = ("with_replacement", "without_replacement")


def noise_constant(sampling: str, batch_size: int | None, n: int) -> float:
    """c in Σ_B = c·Σ₁/B: 1 with replacement, (N−B)/(N−1) without (and for reshuffling, whose every
    batch is marginally a uniform B-subset; the correlation of batches within an epoch is not
    modelled).  A full batch without replacement has no noise (c = 0)."""
    if batch_size is None:  # the full batch: plain GD, no noise
        return 0.0
    B = int(batch_size)
    if sampling == "with_replacement":
        return 1.0
    if n <= 1:
        return 0.0
    return (n - B) / (n - 1)


def noise_scale(hp: Any, n: int, sampling: str | None = None) -> float:
    """s = √(η c/(B N)) for the hyperparameters ``hp`` (its batch size and sampling scheme unless
    ``sampling`` is given)."""
    B = n if hp.batch_size is None else int(hp.batch_size)
    c = noise_constant(sampling or hp.sampling, hp.batch_size, n)
    return math.sqrt(hp.lr * c / (B * n))


def coupled(problem: Any) -> str | None:
    """Why the per-example losses of ``problem`` are coupled (None when they are not)."""
    if getattr(problem, "has_batchnorm", False):
        return "BatchNorm in training mode couples the examples of a batch"
    return None


def check_per_example(problem: Any, field: str) -> None:
    why = coupled(problem)
    if why:
        raise ConfigError(field, "per_example", f"per-example noise is not defined for this model ({why}); "
                          "use diffusion = \"batches\" (the covariance of K sampled batch gradients)")


class NoiseSource:
    """The random numbers of one SDE path (or of K paths at once): Brownian increments and batches,
    from a seeded ``torch.Generator`` (on the CPU, so a path is the same on every device).  ``replay``:
    increments to hand out instead (for path-agreement checks between backends)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64,
                 replay: list[torch.Tensor] | None = None):
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.device, self.dtype = torch.device(device), dtype
        self.replay = list(replay) if replay is not None else None
        self.drawn: list[torch.Tensor] | None = None  # set to [] to keep every increment drawn
        self.substeps = 1  # each increment drawn as the sum of this many of h/substeps (coupled paths)

    def normal(self, shape: tuple[int, ...], h: float) -> torch.Tensor:
        """ΔW ~ N(0, h I) of ``shape``."""
        if self.replay is not None:
            dw = self.replay.pop(0)
        else:
            r = self.substeps
            dw = torch.randn(shape, generator=self.generator, dtype=torch.float64).mul_(math.sqrt(h / r))
            for _ in range(r - 1):
                dw.add_(torch.randn(shape, generator=self.generator, dtype=torch.float64), alpha=math.sqrt(h / r))
        if self.drawn is not None:
            self.drawn.append(dw.clone())
        return dw.to(self.device, self.dtype)

    def batch(self, n: int, size: int, scheme: str) -> torch.Tensor:
        """Indices of one batch of ``size`` from ``n`` examples (with replacement: i.i.d.; otherwise a
        uniform subset)."""
        if scheme == "with_replacement":
            idx = torch.randint(n, (size,), generator=self.generator)
        else:
            idx = torch.randperm(n, generator=self.generator)[:size]
        return idx.to(self.device)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


# ------------------------------------------------------------------ one path (the module itself)


def _cotangent(loss_fn, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, n·w_i·∂L/∂o_i) for the batch-mean loss L = loss_fn(o, y)."""
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(o, y)
        (dl,) = torch.autograd.grad(loss, o)
    shape = (-1,) + (1,) * (o.dim() - 1)
    return loss.detach(), dl * (w * len(y)).view(shape).to(dl.dtype)


def weighted_loss_grad(problem: Any, theta: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(θ), ∇_θ Σ_i w_i ℓ_i(θ)) over the whole dataset (chunk by chunk): one forward and one backward
    pass of the model (the examples must not be coupled, :func:`coupled`)."""
    problem.counts["grad"] += 1
    total = None
    out_grad = None
    with torch.no_grad():
        problem.load(theta)
    for start, (batch, cw) in zip(range(0, problem.n, problem.chunk_size), problem.chunks()):
        x, y = batch
        with torch.enable_grad():
            out = problem.module(x)
            loss, cot = _cotangent(problem.loss_fn, out, y, w[start:start + len(y)])
            parts = torch.autograd.grad(out, problem._params, grad_outputs=cot, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(problem._params, parts)])
        out_grad = flat if out_grad is None else out_grad.add_(flat)
        total = loss * cw if total is None else total + loss * cw
    return total, out_grad


def batch_loss_grad(problem: Any, theta: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L̂, ∇L̂) on the examples ``index`` (BatchNorm with that batch's statistics), as new tensors."""
    loss, g = problem.loss_and_grad_(theta, problem.batch(index))
    return loss, g.clone()


# ------------------------------------------------------------ K paths at once (torch.func.vmap)


def batched_weighted_loss_grad(problem: Any, thetas: torch.Tensor, ws: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (K,), ∇ Σ_i w_ki ℓ_i at θ_k (K, m)) for K paths, vectorised over the paths."""
    f = problem.functional_output
    loss_fn = problem.loss_fn
    problem.counts["grad"] += thetas.shape[0]
    total = grad = None
    for start, (batch, cw) in zip(range(0, problem.n, problem.chunk_size), problem.chunks()):
        x, y = batch
        n = len(y)

        def one(theta, w, x=x, y=y, n=n):
            out, vjp = torch.func.vjp(lambda th: f(th, x), theta)
            loss, dl = torch.func.grad_and_value(lambda o: loss_fn(o, y))(out)[::-1]
            shape = (-1,) + (1,) * (out.dim() - 1)
            return loss, vjp(dl * (w * n).view(shape).to(dl.dtype))[0]

        with torch.enable_grad():
            loss, g = torch.func.vmap(one, in_dims=(0, 0))(thetas, ws[:, start:start + n])
        total = loss * cw if total is None else total + loss * cw
        grad = g if grad is None else grad.add_(g)
    return total.detach(), grad.detach()
