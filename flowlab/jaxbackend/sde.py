"""SDE paths of flowlab's stochastic flows with diffrax (``diffrax:Euler``; imports JAX, diffrax, lineax).

A stochastic flow (:class:`flowlab.stochastic.StochasticFlow`) is integrated as diffrax's Itô SDE

    dy = drift(y) dt + σ(y) dW,   terms = MultiTerm(ODETerm(drift), ControlTerm(diffusion, W))

with ``drift`` the flow's ``vector_field`` and ``diffusion`` a ``lineax.FunctionLinearOperator``
v ↦ σ(y)v on the noise space R^N, built from the flow's own ``diffusion`` method on
:class:`~flowlab.jaxbackend.problem.JaxOps` (``diffusion = "per_example"``: σ(θ)v = −s ∇_θ Σ_i (v_i − v̄)
ℓ_i(θ), one weighted backward pass; ``"batches"`` draws batches from torch's generator and is not
available here).  diffrax's ``Euler`` solver on these terms is Euler–Maruyama: y + h·drift + σΔW.

Fused step: for ``sme`` the term's ``vf_prod`` (what ``Euler`` evaluates) is ``SME.step``'s single
backward pass, h·drift + σΔW = −∇_θ Σ_i w_i ℓ_i − hλθ with w = h/N + s(ΔW − mean ΔW) (the same
value as the MultiTerm's, one pass instead of two).  ``fuse = false`` (an option of ``diffrax:Euler``)
evaluates the MultiTerm as written (drift and diffusion apart).

Grid: the same as ``flowlab:euler_maruyama``'s: each recording interval [t_a, t_b] is cut into
⌈(t_b − t_a)/dt⌉ equal steps (dt default: the flow's step, η), so every recording time is a step end.

Noise: diffrax's :class:`diffrax.UnsafeBrownianPath` (a fresh normal increment per step, keyed from
the step's end points; meant for fixed steps), its key ``jax.random.key(seed)`` with the path's seed
(``integrator.noise.seed``: the follower's derived seed, or the integrator's ``seed`` option).  It
folds the step's times in as float32 bit patterns, so two steps collide only on grids finer than
float32 resolves (more than ~2²⁴ steps per unit of t/η).  Given increments instead
(``integrator.noise.replay``, e.g. the ``drawn`` increments of a torch path) are fed in through
:class:`IncrementPath`, whose ``evaluate(t0, t1)`` returns the stored increment of that step: then
the torch and the diffrax paths see the same Brownian increments and agree to round-off.

K paths at once: :func:`sample_paths` (``jax.vmap`` over K keys).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import torch
from jax import lax

from ..errors import ConfigError
from ..flows.base import FlowStopped
from ._diffrax import _time_dtype
from ._runtime import compile_seconds, to_jax

# ------------------------------------------------------------------ noise-space vectors


def _raw(x: Any) -> Any:
    return x.a if isinstance(x, NoiseVector) else x


class NoiseVector:
    """v ∈ R^N handed to a flow's ``diffusion`` (a JAX array behind the torch-style calls the flows
    make on it: ``v.mean(-1, keepdim=True)``, arithmetic); the flows' code is written against torch
    tensors and JAX arrays take ``keepdims``."""

    __slots__ = ("a",)

    def __init__(self, a: Any):
        self.a = a

    def mean(self, axis: Any = None, keepdim: bool = False, keepdims: bool = False, **_: Any) -> Any:
        return jnp.mean(self.a, axis=axis, keepdims=keepdim or keepdims)

    def __jax_array__(self) -> Any:
        return self.a

    @property
    def shape(self) -> tuple:
        return self.a.shape

    @property
    def ndim(self) -> int:
        return self.a.ndim

    @property
    def dtype(self) -> Any:
        return self.a.dtype

    def dim(self) -> int:
        return self.a.ndim

    def __getitem__(self, index: Any) -> Any:
        return self.a[index]

    def __neg__(self) -> Any:
        return -self.a

    def __add__(self, o: Any) -> Any:
        return self.a + _raw(o)

    def __radd__(self, o: Any) -> Any:
        return _raw(o) + self.a

    def __sub__(self, o: Any) -> Any:
        return self.a - _raw(o)

    def __rsub__(self, o: Any) -> Any:
        return _raw(o) - self.a

    def __mul__(self, o: Any) -> Any:
        return self.a * _raw(o)

    def __rmul__(self, o: Any) -> Any:
        return _raw(o) * self.a


# ------------------------------------------------------------------ checks


def check_stochastic(flow: Any, integ_name: str) -> None:
    """Refuse what diffrax cannot integrate (one ConfigError line); fields relative to the flow's table."""
    name = getattr(flow, "name", type(flow).__name__)
    if integ_name != "diffrax:Euler":
        raise ConfigError("integrator", integ_name, f"{name} is stochastic: integrate it with diffrax:Euler (JAX) "
                          "or flowlab:euler_maruyama (torch)")
    if getattr(flow, "diffusion_kind", "per_example") == "batches":
        raise ConfigError("diffusion", "batches", "diffrax:Euler integrates per-example noise only; diffusion = "
                          "\"batches\" (K sampled batch gradients per step) runs on torch: use "
                          "flowlab:euler_maruyama, or diffusion = \"per_example\"")
    if getattr(flow, "inner", None) is not None and not callable(getattr(flow, "diffusion", None)):
        raise ConfigError("integrator", integ_name, f"{name} with its symmetry law (theory.flow_laws) is stepped on "
                          "torch only: use flowlab:euler_maruyama, or theory.flow_laws = false")
    if not callable(getattr(flow, "diffusion", None)) or not callable(getattr(flow, "noise_dim", None)):
        raise ConfigError("integrator", integ_name, f"{flow!r} has no diffusion(t, state, ops, hp, v) / noise_dim: "
                          "diffrax:Euler integrates flowlab.stochastic.StochasticFlow subclasses; use "
                          "flowlab:euler_maruyama")


def _fusable(flow: Any) -> bool:
    """``sme`` with per-example noise: its EM step is one weighted backward pass (SME.step)."""
    from ..stochastic.sde import SME

    cls = type(flow)
    return (isinstance(flow, SME) and getattr(flow, "diffusion_kind", None) == "per_example"
            and cls.vector_field is SME.vector_field and cls.diffusion is SME.diffusion
            and cls.noise_vector is SME.noise_vector and cls.step is SME.step)


# ------------------------------------------------------------------ paths and terms


class IncrementPath(dfx.AbstractPath):
    """Given Brownian increments as a diffrax control: ``evaluate(t0, t1)`` returns ``increments[k]``
    for the step whose start ``starts[k]`` is nearest to t0 (steps of one fixed grid)."""

    starts: jax.Array
    increments: jax.Array

    @property
    def t0(self):
        return self.starts[0]

    @property
    def t1(self):
        return jnp.inf

    def evaluate(self, t0: Any, t1: Any = None, left: bool = True) -> Any:
        if t1 is None:
            raise ValueError("IncrementPath holds increments over steps: call evaluate(t0, t1)")
        k = jnp.argmin(jnp.abs(self.starts - t0))
        return self.increments[k]


class FusedSDETerm(dfx.AbstractTerm):
    """``MultiTerm(drift, diffusion)`` whose ``vf_prod`` (the product Euler takes) is one fused
    evaluation of h·drift + σΔW (``fused(t, y, (h, ΔW))``); ``vf``/``contr``/``prod`` are the MultiTerm's."""

    multi: dfx.MultiTerm
    fused: Any = eqx.field(static=True)

    def vf(self, t, y, args):
        return self.multi.vf(t, y, args)

    def contr(self, t0, t1, **kwargs):
        return self.multi.contr(t0, t1, **kwargs)

    def prod(self, vf, control):
        return self.multi.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        return self.fused(t, y, control)


def sde_terms(flow: Any, ops: Any, hp: Any, control: Any, y_like: tuple, fuse: bool = True) -> dfx.AbstractTerm:
    """diffrax terms of ``flow``'s SDE: ``MultiTerm(ODETerm(drift), ControlTerm(diffusion, control))``,
    the diffusion a ``lineax.FunctionLinearOperator`` v ↦ σ(y)v over R^N (``flow.noise_dim``); with
    ``fuse`` and ``sme``, wrapped in :class:`FusedSDETerm` (module docstring)."""
    N = int(flow.noise_dim(ops, hp))
    dtype = y_like[0].dtype
    v_struct = jax.ShapeDtypeStruct((N,), dtype)

    def drift(t, y, args):
        return tuple(flow.vector_field(t, y, ops, hp))

    def diffusion(t, y, args):
        def mv(v):
            out = tuple(flow.diffusion(t, y, ops, hp, NoiseVector(v)))
            out = out + (None,) * (len(y) - len(out))
            return tuple(jnp.zeros_like(a) if k is None else _raw(k).astype(a.dtype) for a, k in zip(y, out))

        return lx.FunctionLinearOperator(mv, v_struct)

    multi = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, control))
    if not (fuse and _fusable(flow)):
        return multi
    s, n, lam = float(flow._s(ops, hp)), int(ops.n), float(hp.weight_decay)

    def fused(t, y, control):
        (h, dw) = control
        theta = y[0]
        h = jnp.asarray(h, theta.dtype)
        w = h / n + s * (dw - jnp.mean(dw, axis=-1, keepdims=True))  # SME.step's weights
        g = ops.weighted_loss_grad(theta, w)[1]  # h∇L − σΔW
        return (-g - (h * lam) * theta,) if lam else (-g,)

    return FusedSDETerm(multi, fused)


def brownian(seed_or_key: Any, noise_dim: int, dtype: Any) -> dfx.UnsafeBrownianPath:
    """diffrax's Brownian motion on R^N for one path: a seed (``jax.random.key(seed)``) or a key."""
    key = path_key(seed_or_key) if isinstance(seed_or_key, int | np.integer) else seed_or_key
    return dfx.UnsafeBrownianPath(shape=jax.ShapeDtypeStruct((int(noise_dim),), dtype), key=key)


def path_key(seed: int) -> Any:
    """The JAX key of a path's seed (flowlab's seeds are 32-bit)."""
    return jax.random.key(int(seed) % (1 << 32))


# ------------------------------------------------------------------ the compiled stepping


def _finite(y: tuple) -> Any:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(y)]))


def _euler_step(terms: Any, ta: Any, tb: Any, y: tuple) -> tuple:
    y1, _, _, _, _ = dfx.Euler().step(terms, ta, tb, y, None, None, False)
    return tuple(a.astype(b.dtype) for a, b in zip(y1, y))


class SDEKernel:
    """The compiled Euler–Maruyama interval of one (flow, ops, hyperparameters, fusion, state shapes):
    ``advance(y, control, t0, t1, n)`` takes n equal steps from t0 to t1 (traced times and count; the
    control — a Brownian path or an :class:`IncrementPath` — an argument)."""

    def __init__(self, flow: Any, ops: Any, hp: Any, y0: tuple, fuse: bool):
        self.flow, self.ops, self.hp, self.fuse = flow, ops, hp, fuse
        self.noise_dim = int(flow.noise_dim(ops, hp))
        self.dtype = y0[0].dtype
        self.tdtype = _time_dtype()
        self.fused = fuse and _fusable(flow)
        self.traces = 0
        self.compile_seconds = 0.0
        self._jitted = jax.jit(self._advance)

    def terms(self, control: Any, y_like: tuple) -> Any:
        return sde_terms(self.flow, self.ops, self.hp, control, y_like, self.fuse)

    def _advance(self, y, control, t0, t1, n):
        self.traces += 1
        terms = self.terms(control, y)
        h = (t1 - t0) / n

        def body(i, y):
            ta = t0 + i * h
            tb = jnp.where(i == n - 1, t1, t0 + (i + 1) * h)
            return _euler_step(terms, ta, tb, y)

        y = lax.fori_loop(0, n, body, y)
        return y, _finite(y)

    def advance(self, y: tuple, control: Any, t0: float, t1: float, n: int) -> tuple[tuple, Any]:
        before = compile_seconds()
        tt = np.dtype(self.tdtype)
        out = self._jitted(y, control, np.asarray(t0, tt), np.asarray(t1, tt), np.int32(n))  # host scalars
        self.compile_seconds += compile_seconds() - before
        return out


_SDE_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sde_kernel(flow: Any, ops: Any, hp: Any, y0: tuple, fuse: bool) -> SDEKernel:
    key = (id(ops), hp, bool(fuse), tuple((tuple(a.shape), str(a.dtype)) for a in y0), bool(jax.config.jax_enable_x64))
    per_flow = _SDE_KERNELS.setdefault(flow, {})
    if key not in per_flow:
        per_flow[key] = SDEKernel(flow, ops, hp, y0, fuse)
    return per_flow[key]


def _steps(t0: float, t1: float, dt: float) -> int:
    return max(1, math.ceil((t1 - t0) / dt - 1e-9))


def _fixed_dt(integ: Any, flow: Any, hp: Any) -> float:
    if integ.dt is not None:
        return float(integ.dt)
    size = getattr(flow, "step_size", None)
    return float(size(hp) if size is not None else hp.lr) / integ.dt_divisor


class SDESession:
    """One SDE path integrated by ``diffrax:Euler`` interval by interval (:class:`flowlab.flows.base.Session`):
    one state on the device; the Brownian path (or the replayed increments) of ``integ.noise``."""

    def __init__(self, integ: Any, flow: Any, ops: Any, hp: Any, t0: float, state: tuple):
        from ..stochastic.noise import NoiseSource

        check_stochastic(flow, integ.name)
        self.integ, self.flow, self.ops, self.hp = integ, flow, ops, hp
        if integ.noise is None:
            integ.noise = NoiseSource(integ.seed if integ.seed is not None else 0)
        self.noise = integ.noise
        y0 = tuple(self._as_jax(s) for s in state)
        self.kernel = sde_kernel(flow, ops, hp, y0, integ.fuse)
        self.dt = _fixed_dt(integ, flow, hp)
        self.t = float(t0)
        self._state = y0
        self.nfe, self.steps, self.rejected = 0, 0, 0
        self.replay = self.noise.replay is not None
        self.brownian = None if self.replay else brownian(self.noise.seed, self.kernel.noise_dim, y0[0].dtype)

    def _as_jax(self, s: Any) -> Any:
        if isinstance(s, torch.Tensor):
            return to_jax(s, self.ops.device, self.ops.dtype)
        return jnp.asarray(s, dtype=self.ops.dtype)

    @property
    def state(self) -> tuple:
        return self._state

    def state_dict(self) -> dict:
        """Time, state and counts: the Brownian path is a function of its key and the times, so
        nothing of it needs keeping (:mod:`flowlab.checkpoint`)."""
        from ..checkpoint import pack

        if self.replay:
            raise RuntimeError("checkpoint: a session replaying given increments cannot be checkpointed")
        return {"t": self.t, "state": pack(tuple(np.asarray(x) for x in self._state)), "nfe": self.nfe,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import unpack

        self._state = tuple(jnp.asarray(a, dtype=x.dtype) for a, x in zip(unpack(state["state"]), self._state))
        self.t, self.nfe, self.steps = float(state["t"]), int(state["nfe"]), int(state["steps"])

    def _control(self, n: int, t1: float) -> Any:
        if not self.replay:
            return self.brownian
        if len(self.noise.replay) < n:
            raise ValueError(f"replay: {len(self.noise.replay)} increments left, {n} steps to take")
        dws = [self.noise.replay.pop(0) for _ in range(n)]
        h = (t1 - self.t) / n
        starts = self.t + np.arange(n) * h
        inc = np.stack([d.detach().cpu().numpy() for d in dws]).astype(jnp.dtype(self.kernel.dtype))
        return IncrementPath(jnp.asarray(starts, self.kernel.tdtype), jax.device_put(inc, self.ops.device))

    def advance(self, t1: float) -> tuple:
        t1 = float(t1)
        if t1 <= self.t:
            return self._state
        n = _steps(self.t, t1, self.dt)
        control = self._control(n, t1)
        c0, tr0 = self.kernel.compile_seconds, self.kernel.traces
        y, finite = self.kernel.advance(self._state, control, self.t, t1, n)
        stats = self.integ.stats
        stats["compile_seconds"] += self.kernel.compile_seconds - c0
        stats["traces"] += self.kernel.traces - tr0
        self.nfe += n
        self.steps += n
        stats["nfe"] += n
        stats["accepted"] += n
        if not bool(jax.device_get(finite)):
            raise FlowStopped(f"blew up: non-finite state at t={t1:.6g} ({self.integ.name})")
        self.t, self._state = t1, y
        return y


# ------------------------------------------------------------------ K paths at once


def sample_paths(flow: Any, problem: Any, hp: Any, times: Any, paths: int = 1, *, seed: int = 0, keys: Any = None,
                 dt: float | None = None, fuse: bool = True, theta0: Any = None, **jax_options: Any) -> jax.Array:
    """K Euler–Maruyama paths of the stochastic ``flow`` on ``problem`` from θ0 (or ``theta0``) at
    ``times`` (increasing, > 0; from t = 0), on the grid of a session (each interval cut into
    ⌈Δt/dt⌉ equal steps, dt default the flow's step), as one jitted ``jax.vmap`` over the paths'
    keys: ``keys`` (K JAX keys) or ``jax.random.split(jax.random.key(seed), paths)``.  A path with
    key k is the path of a ``diffrax:Euler`` session whose Brownian key is k.

    Returns θ of each path at each time, (K, len(times), m) (a JAX array).  ``jax_options``: the
    twin's options (``device``, ``chunk_size``, ``precision``, ``conv``)."""
    from .problem import jax_problem

    check_stochastic(flow, "diffrax:Euler")
    ops = jax_problem(problem, **jax_options).ops
    th0 = problem.theta0.clone() if theta0 is None else theta0
    with torch.no_grad():
        state0 = tuple(flow.initial_state(th0, ops, hp))
    y0 = tuple(s if not isinstance(s, torch.Tensor) else to_jax(s, ops.device, ops.dtype) for s in state0)
    if keys is None:
        keys = jax.random.split(path_key(seed), int(paths))
    step = float(dt) if dt is not None else float(getattr(flow, "step_size", lambda hp: hp.lr)(hp))
    # the grid, on the host: (start, end) of every step, and which steps end a recording interval
    starts, ends, rec = [], [], []
    t = 0.0
    for k, t1 in enumerate(float(x) for x in times):
        if t1 <= t:
            raise ValueError(f"times must increase from 0: {list(times)}")
        n = _steps(t, t1, step)
        h = (t1 - t) / n
        for i in range(n):
            starts.append(t + i * h)
            ends.append(t1 if i == n - 1 else t + (i + 1) * h)
            rec.append(k if i == n - 1 else -1)
        t = t1
    tdtype = _time_dtype()
    starts_a, ends_a = jnp.asarray(np.array(starts), tdtype), jnp.asarray(np.array(ends), tdtype)
    rec_a = jnp.asarray(np.array(rec), jnp.int32)
    N = int(flow.noise_dim(ops, hp))
    n_times = len(times)

    def one(key):
        terms = sde_terms(flow, ops, hp, brownian(key, N, y0[0].dtype), y0, fuse)
        out0 = jnp.zeros((n_times,) + y0[0].shape, y0[0].dtype)

        def body(carry, xs):
            y, out = carry
            ta, tb, r = xs
            y = _euler_step(terms, ta, tb, y)
            out = lax.cond(r >= 0, lambda o: o.at[r].set(flow.theta(y)), lambda o: o, out)
            return (y, out), None

        (_, out), _ = lax.scan(body, (y0, out0), (starts_a, ends_a, rec_a))
        return out

    return jax.jit(jax.vmap(one))(keys)
