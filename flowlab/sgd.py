"""The discrete run: SGD with exactly ``torch.optim.SGD``'s semantics on the flat θ.

Update k (η_k from the schedule, ĝ_k the batch gradient at θ_k, λ the weight decay, β the momentum,
τ the dampening)::

    d_k = ĝ_k + λ θ_k
    v_{k+1} = d_k                      (k = 0)
    v_{k+1} = β v_k + (1 − τ) d_k      (k > 0)
    d_k ← d_k + β v_{k+1}  (Nesterov)  or  d_k ← v_{k+1}  (heavy ball)   [when β > 0]
    θ_{k+1} = θ_k − η_k d_k

with the same floating-point operations as torch's single-tensor SGD, applied to one flat vector.
Batches come from :class:`BatchSampler`, by the study's ``optimizer.sampling``: ``reshuffle`` (a
seeded random permutation per epoch, cut into consecutive batches of B examples: torch's
``DataLoader(shuffle=True)``), ``with_replacement`` (B i.i.d. uniform indices per step) or
``without_replacement`` (a fresh uniform B-subset per step, independent across steps).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import OptimizerSection
from .errors import ConfigError
from .problem import Batch, Problem

SAMPLING = ("reshuffle", "with_replacement", "without_replacement")


class BatchSampler:
    """Seeded minibatch indices.  ``scheme`` ``reshuffle``: a new random permutation each epoch,
    consecutive batches of ``batch_size`` (the last short batch of an epoch dropped when
    ``drop_last``); ``with_replacement``: ``batch_size`` i.i.d. uniform indices per step;
    ``without_replacement``: a fresh uniform ``batch_size``-subset per step.  ``next()`` returns
    None for full-batch runs (with replacement, a batch of N is still drawn: it is not the full
    batch)."""

    def __init__(self, n: int, batch_size: int | str | None, seed: int, drop_last: bool = True,
                 device: torch.device | str = "cpu", scheme: str = "reshuffle"):
        if scheme not in SAMPLING:
            raise ConfigError("optimizer.sampling", scheme, f"allowed: {', '.join(SAMPLING)}")
        if batch_size not in (None, "full") and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ConfigError("optimizer.batch_size", batch_size, "expected a positive integer or \"full\"")
        if isinstance(batch_size, int) and batch_size > n:
            raise ConfigError("optimizer.batch_size", batch_size, f"larger than the dataset ({n} examples)")
        self.n = n
        self.scheme = scheme
        self.full = batch_size in (None, "full") or (batch_size == n and scheme != "with_replacement")
        self.size = n if batch_size in (None, "full") else int(batch_size)  # type: ignore[arg-type]
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def state_dict(self) -> dict:
        """The generator and the epoch position (:mod:`flowlab.checkpoint`)."""
        from .checkpoint import attrs_state

        return attrs_state(self, ("generator", "_perm", "_pos"))

    def load_state_dict(self, state: dict) -> None:
        from .checkpoint import load_attrs

        load_attrs(self, state)

    def next(self) -> torch.Tensor | None:
        if self.full:
            return None
        if self.scheme == "with_replacement":
            return torch.randint(self.n, (self.size,), generator=self.generator).to(self.device)
        if self.scheme == "without_replacement":
            return torch.randperm(self.n, generator=self.generator)[: self.size].to(self.device)
        limit = self.n - self.n % self.size if self.drop_last else self.n
        if self._perm is None or self._pos >= limit:
            self._perm = torch.randperm(self.n, generator=self.generator).to(self.device)
            self._pos = 0
        idx = self._perm[self._pos: min(self._pos + self.size, self.n)]
        self._pos += self.size
        return idx


class DiscreteSGD:
    """SGD on a :class:`Problem`, one update at a time (``evaluate`` then ``update``)."""

    label = "sgd"

    def __init__(self, problem: Problem, opt: OptimizerSection, lrs, seed: int,
                 theta0: torch.Tensor | None = None):
        self.problem = problem
        self.lrs = np.asarray(lrs, dtype=np.float64)
        self.times = np.concatenate([[0.0], np.cumsum(self.lrs)])
        self.wd, self.beta, self.damp, self.nesterov = opt.weight_decay, opt.momentum, opt.dampening, opt.nesterov
        self.sampler = BatchSampler(problem.n, opt.batch_size, seed, opt.drop_last, problem.device,
                                    getattr(opt, "sampling", "reshuffle"))
        self.theta = (problem.theta0 if theta0 is None else theta0).detach().clone()
        self._d = torch.empty_like(self.theta)
        self.buf: torch.Tensor | None = None
        self.step = 0
        self.loss: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.batch: Batch | None = None
        self.n_grad_evals = 0
        self._own_grad: torch.Tensor | None = None

    #: what a checkpoint keeps of the discrete run (:mod:`flowlab.checkpoint`); taken after an
    #: update, when the loss, gradient and batch are the next ``evaluate``'s to compute
    STATE = ("theta", "buf", "step", "n_grad_evals", "sampler")

    def state_dict(self) -> dict:
        from .checkpoint import attrs_state

        return attrs_state(self, self.STATE)

    def load_state_dict(self, state: dict) -> None:
        from .checkpoint import load_attrs

        load_attrs(self, state)

    def evaluate(self) -> None:
        """Draw the next batch and evaluate the batch loss and gradient at θ_k."""
        idx = self.sampler.next()
        self.batch = self.problem.batch(idx)
        self.loss, self.grad = self.problem.loss_and_grad_(self.theta, self.batch, update_stats=True)
        self.n_grad_evals += 1

    def keep_grad(self) -> None:
        """Copy ĝ_k out of the problem's buffer (before anyone else evaluates the problem)."""
        if self._own_grad is None:
            self._own_grad = torch.empty_like(self.theta)
        self._own_grad.copy_(self.grad)
        self.grad = self._own_grad

    @torch.no_grad()
    def update(self) -> None:
        """θ_{k+1} = θ_k − η_k d_k (torch.optim.SGD's arithmetic)."""
        lr = float(self.lrs[self.step])
        d = self.grad
        if self.wd != 0:
            d = torch.add(d, self.theta, alpha=self.wd, out=self._d)
        if self.beta != 0:
            if self.buf is None:
                self.buf = d.detach().clone()
            else:
                self.buf.mul_(self.beta).add_(d, alpha=1 - self.damp)
            if self.nesterov:
                d = torch.add(d, self.buf, alpha=self.beta, out=self._d)
            else:
                d = self.buf
        self.theta.add_(d, alpha=-lr)
        self.step += 1

    @property
    def time(self) -> float:
        """t_k = Σ_{j<k} η_j."""
        return float(self.times[self.step])
