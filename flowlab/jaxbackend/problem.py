"""The JAX twin of a :class:`~flowlab.problem.Problem`: jit-compiled loss, gradient, HVP and third
derivative of the full-batch loss, as pure functions of the same flat θ.

Full batches are evaluated chunk by chunk exactly as ``Problem.chunks`` does (``chunk_size``
examples per chunk, the last one smaller, weights n_c/N; with BatchNorm each chunk is normalised
with its own statistics): the equal-sized chunks go through one ``lax.scan`` whose body evaluates a
chunk's value and derivatives, so memory holds one chunk's activations at a time; a smaller last
chunk is one more call.

``JaxProblem(problem).ops`` is what the flows use (see :class:`JaxOps`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from ..problem import Problem
from ._runtime import jax_device, jax_dtype, to_jax, to_torch
from .twin import labels_as_jax, loss_twin, model_twin

Batch = tuple[jax.Array, jax.Array]


def _batch_loss(apply, loss) -> Callable[[jax.Array, Batch], jax.Array]:
    return lambda theta, batch: loss(apply(theta, batch[0]), batch[1])


class JaxOps:
    """The full-batch derivatives a flow's vector field needs, of the UNREGULARISED loss L(θ)
    (flows add weight decay themselves) — :class:`flowlab.flows.base.Ops` on JAX arrays.

    - ``loss(theta)`` → L
    - ``grad(theta)`` → ∇L
    - ``loss_and_grad(theta)`` → (L, ∇L)
    - ``hvp(theta, v)`` → H(θ)v (forward-over-reverse: ``jax.jvp`` of ``jax.grad``)
    - ``d3(theta, v)`` → ∇_θ(vᵀH(θ)v) = ∇³L[v, v] (the directional derivative of H(θ)v along v)
    - ``weighted_loss_grad(theta, w)`` → (L, ∇_θ Σ_i w_i ℓ_i) with per-example weights w ∈ R^N (the
      per-example losses ℓ_i whose batch mean is the loss; one forward and one backward pass, as
      :func:`flowlab.stochastic.noise.weighted_loss_grad`); ``n`` is N

    Each is a jit-compiled pure JAX function: call it on arrays, or trace it inside a larger jitted
    function (an integrator's step).  Given torch tensors instead (a flow's ``initial_state`` on the
    torch Problem's θ0), a method converts them, evaluates in JAX and returns torch tensors on the
    same device, so backend-agnostic flow code works on either kind of input.
    """

    backend = "jax"

    def __init__(self, loss: Callable, loss_and_grad: Callable, hvp: Callable, d3: Callable, dim: int, dtype: Any,
                 device: Any, weighted_loss_grad: Callable | None = None, n: int | None = None):
        self._loss = jax.jit(loss)
        self._loss_and_grad = jax.jit(loss_and_grad)
        self._grad = jax.jit(lambda theta: loss_and_grad(theta)[1])
        self._hvp = jax.jit(hvp)
        self._d3 = jax.jit(d3)
        self._weighted = jax.jit(weighted_loss_grad) if weighted_loss_grad is not None else None
        self.dim, self.dtype, self.device = dim, dtype, device
        self.n = n

    def _call(self, fn: Callable, *args: Any) -> Any:
        if not isinstance(args[0], torch.Tensor):
            return fn(*args)
        like = args[0]
        out = fn(*(to_jax(a, self.device, self.dtype) for a in args))
        return jax.tree_util.tree_map(lambda a: to_torch(a, like.device, like.dtype), out)

    def loss(self, theta: Any) -> Any:
        return self._call(self._loss, theta)

    def grad(self, theta: Any) -> Any:
        return self._call(self._grad, theta)

    def loss_and_grad(self, theta: Any) -> tuple[Any, Any]:
        return self._call(self._loss_and_grad, theta)

    def hvp(self, theta: Any, v: Any) -> Any:
        return self._call(self._hvp, theta, v)

    def d3(self, theta: Any, v: Any) -> Any:
        return self._call(self._d3, theta, v)

    def weighted_loss_grad(self, theta: Any, w: Any) -> tuple[Any, Any]:
        if self._weighted is None:
            raise NotImplementedError("these ops were built without per-example weights")
        return self._call(self._weighted, theta, w)

    def __repr__(self) -> str:
        return f"JaxOps({self.dim} parameters, {jnp.dtype(self.dtype).name}, {self.device})"


class JaxProblem:
    """A torch :class:`~flowlab.problem.Problem` seen through its JAX twin.

    Parameters
    ----------
    problem: the torch Problem (model, loss, data, dtype, chunk size); its model must be built from
        the layers :mod:`flowlab.jaxbackend.twin` supports, its loss one of flowlab's.
    device: ``auto`` (the torch Problem's device kind where JAX has it), ``cpu``, ``gpu``/``cuda[:N]``.
    chunk_size: examples per chunk of a full batch (default: the Problem's).
    precision: matmul/conv precision (``highest`` by default: no TF32 on GPUs).
    conv: ``auto`` (im2col matrix products on CPU, ``lax.conv`` elsewhere), ``lax`` or ``im2col``
        (:func:`~flowlab.jaxbackend.twin.model_twin`).
    """

    def __init__(self, problem: Problem, *, device: Any = "auto", chunk_size: int | None = None,
                 precision: str = "highest", conv: str = "auto"):
        self.problem = problem
        self.layout = problem.layout
        self.dim = problem.dim
        self.torch_dtype = problem.dtype
        self.dtype = jax_dtype(problem.dtype)  # float64 switches JAX's x64 on (global)
        self.device = jax_device(device, like=problem.device)
        self.apply = model_twin(problem.module, problem.layout, self.dtype, precision, conv=conv,
                                platform=self.device.platform)
        self.loss_fn = loss_twin(problem.loss_fn)
        self.batch_loss = _batch_loss(self.apply, self.loss_fn)
        self.n = problem.n
        self.chunk_size = min(int(chunk_size or problem.chunk_size), self.n)
        X = jax.device_put(np.asarray(problem.X.detach().cpu().numpy(), dtype=self.dtype), self.device)
        y = jax.device_put(labels_as_jax(problem.y), self.device)
        self.X, self.y = X, y
        self._split(X, y)
        self.ops = self._make_ops()

    # ------------------------------------------------------------- chunking
    def _split(self, X: jax.Array, y: jax.Array) -> None:
        cs, n = self.chunk_size, self.n
        self.n_full = n // cs
        self.rest = n - self.n_full * cs
        head = self.n_full * cs
        self.X_chunks = X[:head].reshape(self.n_full, cs, *X.shape[1:])
        self.y_chunks = y[:head].reshape(self.n_full, cs, *y.shape[1:])
        self.X_rest, self.y_rest = X[head:], y[head:]
        self.w_full, self.w_rest = cs / n, self.rest / n

    def chunk_sizes(self) -> list[int]:
        return [self.chunk_size] * self.n_full + ([self.rest] if self.rest else [])

    def _full(self, per_batch: Callable[[Batch], Any]) -> Callable[[], Any]:
        """Σ_c w_c · per_batch(chunk c) (a pytree of arrays), the equal chunks in one lax.scan."""
        Xc, yc, Xr, yr = self.X_chunks, self.y_chunks, self.X_rest, self.y_rest
        n_full, w_full, w_rest = self.n_full, self.w_full, self.w_rest

        def total():
            if n_full == 1:
                acc = jax.tree_util.tree_map(lambda a: a * w_full if w_full != 1.0 else a, per_batch((Xc[0], yc[0])))
            else:
                def body(carry, batch):
                    out = per_batch(batch)
                    return jax.tree_util.tree_map(lambda c, o: c + w_full * o, carry, out), None

                zero = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(per_batch, (Xc[0], yc[0])))
                acc, _ = lax.scan(body, zero, (Xc, yc))
            if Xr.shape[0]:
                acc = jax.tree_util.tree_map(lambda a, o: a + w_rest * o, acc, per_batch((Xr, yr)))
            return acc

        return total

    def _full_weighted(self, per_batch: Callable[[Batch, jax.Array], tuple[Any, Any]]) -> Callable[[jax.Array], Any]:
        """(Σ_c w_c L_c, Σ_c G_c) for per_batch(chunk c, the weights of its examples) = (L_c, G_c): the
        chunk losses weighted as in :meth:`_full`, the (already per-example weighted) gradients summed."""
        Xc, yc, Xr, yr = self.X_chunks, self.y_chunks, self.X_rest, self.y_rest
        n_full, cs, w_full, w_rest = self.n_full, self.chunk_size, self.w_full, self.w_rest
        head = n_full * cs

        def total(w):
            wc, wr = w[:head].reshape(n_full, cs), w[head:]
            if n_full == 1:
                loss, g = per_batch((Xc[0], yc[0]), wc[0])
                loss = loss * w_full if w_full != 1.0 else loss
            else:
                def body(carry, xs):
                    X, y, wb = xs
                    lb, gb = per_batch((X, y), wb)
                    return (carry[0] + w_full * lb, carry[1] + gb), None

                zero = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(per_batch, (Xc[0], yc[0]), wc[0]))
                (loss, g), _ = lax.scan(body, zero, (Xc, yc, wc))
            if Xr.shape[0]:
                lr, gr = per_batch((Xr, yr), wr)
                loss, g = loss + w_rest * lr, g + gr
            return loss, g

        return total

    # ------------------------------------------------------------ functions
    def _make_ops(self) -> JaxOps:
        f = self.batch_loss
        vg = jax.value_and_grad(f)

        def hvp_b(theta, v, batch):
            return jax.jvp(lambda th: jax.grad(f)(th, batch), (theta,), (v,))[1]

        def d3_b(theta, v, batch):
            return jax.jvp(lambda th: hvp_b(th, v, batch), (theta,), (v,))[1]

        full = self._full

        def loss(theta):
            return full(lambda b: f(theta, b))()

        def loss_and_grad(theta):
            return full(lambda b: vg(theta, b))()

        def hvp(theta, v):
            return full(lambda b: hvp_b(theta, v, b))()

        def d3(theta, v):
            return full(lambda b: d3_b(theta, v, b))()

        apply, loss_fn = self.apply, self.loss_fn

        def weighted_b(theta, batch, w):
            # ∇_θ Σ_i w_i ℓ_i = the VJP of the model with the cotangent n·w_i·∂L/∂o_i (L = the batch mean)
            X, y = batch
            out, vjp = jax.vjp(lambda th: apply(th, X), theta)
            value, dl = jax.value_and_grad(loss_fn)(out, y)
            scale = (w * X.shape[0]).astype(dl.dtype).reshape((-1,) + (1,) * (dl.ndim - 1))
            return value, vjp(dl * scale)[0]

        def weighted_loss_grad(theta, w):
            return self._full_weighted(lambda b, wb: weighted_b(theta, b, wb))(w)

        return JaxOps(loss, loss_and_grad, hvp, d3, self.dim, self.dtype, self.device,
                      weighted_loss_grad=weighted_loss_grad, n=self.n)

    # ------------------------------------------------------------ transfers
    def theta(self, theta: torch.Tensor | np.ndarray | jax.Array) -> jax.Array:
        """θ as a JAX array of this problem's dtype on its device."""
        if isinstance(theta, torch.Tensor):
            return to_jax(theta, self.device, self.dtype)
        return jax.device_put(jnp.asarray(theta, dtype=self.dtype), self.device)

    def to_torch(self, a: jax.Array) -> torch.Tensor:
        return to_torch(a, self.problem.device, self.torch_dtype)

    def batch(self, index: Any = None) -> Batch:
        if index is None:
            return self.X, self.y
        return self.X[index], self.y[index]

    def __repr__(self) -> str:
        return (f"JaxProblem({self.dim} parameters, {self.n} examples in chunks of {self.chunk_size}, "
                f"{jnp.dtype(self.dtype).name}, {self.device})")


def jax_problem(problem: Problem, **options: Any) -> JaxProblem:
    """The JAX twin of ``problem`` (cached: one twin per Problem and set of options, dropped with it)."""
    cache = problem.derived.setdefault("jax.twins", {})
    key = tuple(sorted(options.items()))
    if key not in cache:
        cache[key] = JaxProblem(problem, **options)
    return cache[key]
