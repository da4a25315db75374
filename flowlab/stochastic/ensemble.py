"""Ensembles: K independent replicas of every stochastic dynamics of a run, in one process.

``[ensemble] size = K`` runs SGD with K batch orders (:class:`ReplicaSGD`: each replica is still
exactly ``torch.optim.SGD``'s update rule), K Brownian paths per SDE flow and K SVAG runs; the
deterministic flows run once.  A replicated dynamics carries θ of shape (K, m); every per-path
variable of the Dataset gains a ``sample`` dim (deterministic dynamics repeat their value along it).

Vectorisation: with ``vectorise = "auto"`` (or true) the K replicas' gradients are one
``torch.func.vmap`` call over a functional version of the model (:class:`EnsembleOps`); without it
(or where the model refuses vmap) a loop over the replicas on the module itself.  Replica s of SGD
draws its batches from ``derive_seed(study.seed, "sgd", s)`` (replica 0 = the single run's seed).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..seeds import derive_seed
from ..sgd import BatchSampler, DiscreteSGD


def full_losses(problem: Any, thetas: torch.Tensor) -> torch.Tensor:
    """L(θ_k) for K states (K,), vectorised (a loop where vmap fails)."""
    f = problem.functional_output
    try:
        with torch.no_grad():
            total = None
            for (x, y), w in problem.chunks():
                val = torch.func.vmap(lambda th, x=x, y=y: problem.loss_fn(f(th, x), y))(thetas) * w
                total = val if total is None else total + val
            return total
    except (RuntimeError, NotImplementedError, ValueError):
        return torch.stack([problem.full_loss(t) for t in thetas])


class VectoriseWarning(UserWarning):
    """torch.func.vmap failed on this model: the ensemble loops over its replicas."""


def vmap_or_loop(owner: Any, vmapped, looped):
    """``vmapped()`` unless ``owner.vectorise`` is False; where vmap fails and ``owner.vectorise`` is
    "auto", warn once, set it False and ``looped()`` from then on."""
    if owner.vectorise is False:
        return looped()
    try:
        with torch.enable_grad():
            return vmapped()
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        if owner.vectorise is True:
            raise
        warnings.warn(f"torch.func.vmap failed on this model ({str(exc).splitlines()[0]}); the ensemble "
                      "loops over its replicas", VectoriseWarning, stacklevel=3)
        owner.vectorise = False
        return looped()


class EnsembleOps:
    """The ops of :mod:`flowlab.flows.base` on K states at once: θ (K, m) → losses (K,), gradients
    (K, m); plus ``weighted_loss_grad(θ (K,m), w (K,N))`` and ``batch_grads(θ (K,m), idx (K,J,B))``
    for the stochastic models.  Vectorised by ``torch.func.vmap`` (``vectorise`` True/"auto"), else
    a loop over the states with the single-state ops."""

    backend = "torch"
    #: states carry K paths along their first dim (an integrator stops them one by one)
    replicated = True

    def __init__(self, problem: Any, vectorise: Any = "auto"):
        from ..flows.torch_ops import TorchOps

        self.problem = problem
        self.single = TorchOps(problem)
        self.vectorise = vectorise
        self.counts = self.single.counts
        self._f = problem.functional_output

    @property
    def n(self) -> int:
        return self.problem.n

    def state_dict(self) -> dict:
        return {"single": self.single.state_dict(), "vectorise": self.vectorise}

    def load_state_dict(self, state: dict) -> None:
        self.single.load_state_dict(state["single"])
        self.counts = self.single.counts
        self.vectorise = state["vectorise"]

    def _try(self, vmapped, looped):
        return vmap_or_loop(self, vmapped, looped)

    def _batch_loss(self, theta, x, y):
        return self.problem.loss_fn(self._f(theta, x), y)

    # ----------------------------------------------------------------- full batch
    def loss_and_grad(self, thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.counts["grad"] += thetas.shape[0]

        def vm():
            total = grad = None
            for (x, y), w in self.problem.chunks():
                g, loss = torch.func.vmap(torch.func.grad_and_value(self._batch_loss), in_dims=(0, None, None))(thetas, x, y)
                total = loss * w if total is None else total + loss * w
                grad = g * w if grad is None else grad.add_(g, alpha=w)
            return total.detach(), grad.detach()

        def lp():
            out = [self.problem.full_loss_and_grad(t) for t in thetas]
            return torch.stack([o[0] for o in out]), torch.stack([o[1].clone() for o in out])

        return self._try(vm, lp)

    def grad(self, thetas):
        return self.loss_and_grad(thetas)[1]

    def loss(self, thetas: torch.Tensor) -> torch.Tensor:
        self.counts["loss"] += thetas.shape[0]
        with torch.no_grad():
            def vm():
                total = None
                for (x, y), w in self.problem.chunks():
                    val = torch.func.vmap(self._batch_loss, in_dims=(0, None, None))(thetas, x, y) * w
                    total = val if total is None else total + val
                return total.detach()

            return self._try(vm, lambda: torch.stack([self.problem.full_loss(t) for t in thetas]))

    def hvp(self, thetas: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        self.counts["hvp"] += thetas.shape[0]

        def vm():
            total = None
            for (x, y), w in self.problem.chunks():
                def one(theta, v, x=x, y=y):
                    g = torch.func.grad(lambda th: self._batch_loss(th, x, y))
                    return torch.func.jvp(g, (theta,), (v,))[1]

                hv = torch.func.vmap(one, in_dims=(0, 0))(thetas, vs) * w
                total = hv if total is None else total + hv
            return total.detach()

        return self._try(vm, lambda: torch.stack([self.single.hvp(t, v) for t, v in zip(thetas, vs)]))

    def d3(self, thetas: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.single.d3(t, v) for t, v in zip(thetas, vs)])

    # ---------------------------------------------------------- stochastic models
    def weighted_loss_grad(self, thetas: torch.Tensor, ws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from .noise import batched_weighted_loss_grad, weighted_loss_grad

        self.counts["grad"] += thetas.shape[0]

        def lp():
            out = [weighted_loss_grad(self.problem, t, w) for t, w in zip(thetas, ws)]
            return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

        return self._try(lambda: batched_weighted_loss_grad(self.problem, thetas, ws), lp)

    def batch_grads(self, thetas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """∇L̂ on the batches ``idx`` (K, J, B) at θ_k: (K, J, m)."""
        self.counts["grad"] += idx.shape[0] * idx.shape[1]
        X, Y = self.problem.X, self.problem.y

        def vm():
            def per_path(theta, ix):
                return torch.func.vmap(lambda i: torch.func.grad(self._batch_loss)(theta, X[i], Y[i]))(ix)

            return torch.func.vmap(per_path)(thetas, idx).detach()

        def lp():
            return torch.stack([torch.stack([self.problem.grad(t, self.problem.batch(i)) for i in ix])
                                for t, ix in zip(thetas, idx)])

        return self._try(vm, lp)


#: ``streams = "auto"``: one seeded sampler per replica up to this many replicas, one block beyond
REPLICA_STREAMS_UP_TO = 4096


class BlockSampler:
    """The batches of K replicas from ONE seeded generator, drawn as (K, B) blocks (for ensembles
    too large for a sampler per replica): ``with_replacement`` i.i.d. indices, ``without_replacement``
    a fresh uniform B-subset per replica and step, ``reshuffle`` a permutation per replica and epoch."""

    def __init__(self, n: int, batch_size: Any, seed: int, size: int, drop_last: bool, scheme: str):
        self.n, self.K, self.scheme, self.drop_last = n, size, scheme, drop_last
        self.full = batch_size in (None, "full") or (batch_size == n and scheme != "with_replacement")
        self.B = n if batch_size in (None, "full") else int(batch_size)
        self.generator = torch.Generator().manual_seed(int(seed))
        self._perm: torch.Tensor | None = None
        self._pos = 0

    def state_dict(self) -> dict:
        from ..checkpoint import attrs_state

        return attrs_state(self, ("generator", "_perm", "_pos"))

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_attrs

        load_attrs(self, state)

    def next(self) -> torch.Tensor | None:
        if self.full:
            return None
        g, K, n, B = self.generator, self.K, self.n, self.B
        if self.scheme == "with_replacement":
            return torch.randint(n, (K, B), generator=g)
        if self.scheme == "without_replacement":
            return torch.rand(K, n, generator=g).argsort(dim=1)[:, :B]
        limit = n - n % B if self.drop_last else n
        if self._perm is None or self._pos >= limit:
            self._perm = torch.rand(K, n, generator=g).argsort(dim=1)
            self._pos = 0
        out = self._perm[:, self._pos:min(self._pos + B, n)]
        self._pos += B
        return out


class ReplicaSGD(DiscreteSGD):
    """K replicas of the discrete run (the engine's ``Discrete`` protocol with θ of shape (K, m)).

    ``streams = "replica"``: replica s draws its batches from its own :class:`~flowlab.sgd.BatchSampler`,
    seeded ``derive_seed(seed, "sgd", s)`` (replica 0 is the single run); ``"block"``: all replicas
    from one :class:`BlockSampler` (vectorised draws; ``"auto"``: replica up to
    :data:`REPLICA_STREAMS_UP_TO` replicas).  The update is torch.optim.SGD's arithmetic applied to the
    (K, m) block (``DiscreteSGD.update`` itself: elementwise, so replica s is bitwise the single run
    with the same batches and gradients).  Gradients: one vmapped call over the replicas (``vectorise``), else a loop on the
    module (then each replica's gradient is bitwise the single run's)."""

    label = "sgd"

    def __init__(self, problem: Any, opt: Any, lrs: Any, seed: int, size: int, vectorise: Any = "auto",
                 streams: str = "auto"):
        self.problem, self.size = problem, int(size)
        self.lrs = np.asarray(lrs, dtype=np.float64)
        self.times = np.concatenate([[0.0], np.cumsum(self.lrs)])
        self.wd, self.beta, self.damp, self.nesterov = opt.weight_decay, opt.momentum, opt.dampening, opt.nesterov
        if streams == "auto":
            streams = "replica" if self.size <= REPLICA_STREAMS_UP_TO else "block"
        self.streams = streams
        if streams == "replica":
            self.seeds = [derive_seed(seed, "sgd", s) for s in range(self.size)]
            self.samplers = [BatchSampler(problem.n, opt.batch_size, s, opt.drop_last, problem.device, opt.sampling)
                             for s in self.seeds]
        else:
            self.seeds = [derive_seed(seed, "sgd-block")]
            self.block = BlockSampler(problem.n, opt.batch_size, self.seeds[0], self.size, opt.drop_last, opt.sampling)
        self.theta = problem.theta0.detach().clone().expand(self.size, -1).contiguous()
        self._d = torch.empty_like(self.theta)
        self.buf: torch.Tensor | None = None
        self.step = 0
        self.loss: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.batch: Any = None
        self.n_grad_evals = 0
        self.vectorise = vectorise
        self._f = problem.functional_output
        self._own_grad: torch.Tensor | None = None

    def state_dict(self) -> dict:
        from ..checkpoint import attrs_state

        out = attrs_state(self, ("theta", "buf", "step", "n_grad_evals", "vectorise"))
        out["samplers"] = ([sm.state_dict() for sm in self.samplers] if self.streams == "replica"
                           else [self.block.state_dict()])
        return out

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import load_attrs

        state = dict(state)
        samplers = state.pop("samplers")
        load_attrs(self, state)
        for sm, st in zip(self.samplers if self.streams == "replica" else [self.block], samplers):
            sm.load_state_dict(st)

    def _vmapped(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.problem.X.device)
        X, Y = self.problem.X[idx], self.problem.y[idx]
        loss_fn = self.problem.loss_fn

        def one(theta, x, y):
            return loss_fn(self._f(theta, x), y)

        with torch.enable_grad():
            g, loss = torch.func.vmap(torch.func.grad_and_value(one))(self.theta, X, Y)
        return loss.detach(), g.detach()

    def _looped(self, idx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if idx is None:
            idx = [None] * self.size
        losses, grads = [], torch.empty_like(self.theta)
        for s, i in enumerate(idx):
            loss, g = self.problem.loss_and_grad_(self.theta[s], self.problem.batch(i), update_stats=True)
            losses.append(loss)
            grads[s].copy_(g)
        return torch.stack(losses), grads

    def evaluate(self) -> None:
        if self.streams == "replica":
            idx = [s.next() for s in self.samplers]
            full = idx[0] is None
            idx = None if full else torch.stack(idx)
        else:
            idx = self.block.next()
            full = idx is None
        self.batch = idx
        if full:
            self.loss, self.grad = self._looped(idx)
        else:
            self.loss, self.grad = vmap_or_loop(self, lambda: self._vmapped(idx), lambda: self._looped(idx))
        self.n_grad_evals += 1

    def keep_grad(self) -> None:
        pass  # the gradients are this object's own tensors
