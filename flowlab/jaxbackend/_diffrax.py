"""The diffrax stepping kernel behind ``diffrax:*`` integrators (imports JAX and diffrax).

A session holds ONE state on the device and advances it interval by interval (the lock-step
protocol of :mod:`flowlab.flows.base`).  Each ``advance(t1)`` is one call of an ahead-of-time
compiled function: a ``lax.while_loop`` of diffrax steps — ``solver.step`` (any diffrax Runge–Kutta
solver, explicit or implicit), ``PIDController.adapt_step_size``, and the solver's own dense
interpolation — the same calls, in the same order, with the same result bookkeeping as
``diffrax.diffeqsolve``'s loop.  What ``diffeqsolve`` cannot do across calls, the kernel carries:
the step size, the FSAL stage, the controller's memory, so the steps are not cut at recording
times (``land = "interpolate"``) and nothing is recomputed per interval.  Only the state at the
recording time (θ, or (θ, θ')) and a few scalars (time, counts, result code) come out; the
carried step stays on the device.

Compile once: the kernel is traced and compiled once per (flow, hyperparameters, solver settings,
state shapes); times, tolerances and step counts are traced arguments, so recording intervals of
any length, a tightened copy (orders analysis) and a restarted session reuse it.  Compile time is
measured (``integrator.stats["compile_seconds"]``) and kept out of the flow's ``wall_seconds``.

Evaluation counts: explicit solvers count vector-field evaluations from the tableau (stages per
attempted step, one fewer for FSAL steps that reuse the last stage, plus the two evaluations of
the initial-step heuristic); implicit solvers (Kvaerno5) count every evaluation at run time with a
host callback, including the Jacobian-vector products of the Newton solves.
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import torch
from jax import lax

from ..flows.base import FlowStopped
from ._runtime import compile_seconds, to_jax

# ------------------------------------------------------------------ extra tableaux


class RK4_38(dfx.AbstractERK):
    """Kutta's 3/8-rule RK4 (torchdiffeq's ``rk4``): fixed step only (no error estimate)."""

    tableau: ClassVar[dfx.ButcherTableau] = dfx.ButcherTableau(
        c=np.array([1 / 3, 2 / 3, 1.0]),
        b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
        b_error=np.zeros(4),
        a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
    )
    interpolation_cls: ClassVar[Any] = dfx.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


class RK4(dfx.AbstractERK):
    """The classic RK4 (flowlab's ``flowlab:rk4``): fixed step only (no error estimate)."""

    tableau: ClassVar[dfx.ButcherTableau] = dfx.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    interpolation_cls: ClassVar[Any] = dfx.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


_EXTRA = {"RK4_38": RK4_38, "RK4": RK4}

# stop codes of the kernel (besides diffrax's own result codes)
STOP_NONE, STOP_MAX_STEPS, STOP_UNDERFLOW = 0, 1, 2


def _time_dtype() -> Any:
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


class _Counter:
    """Run-time evaluation counter (host callback), for implicit solvers."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *_: Any) -> None:
        self.n += 1


class Kernel:
    """The compiled functions of one (flow, hyperparameters, solver settings, state structure)."""

    def __init__(self, integ: Any, flow: Any, ops: Any, hp: Any, y0: tuple):
        self.name = integ.name
        self.fixed = integ.kind == "fixed"
        self.exact = integ.land == "exact"
        self.max_steps = integ.max_steps
        self.implicit = integ.implicit
        self.linear_solver = integ.linear_solver
        self.root_find_max_steps = integ.root_find_max_steps
        self.controller_options = {k: v for k, v in integ.controller_options.items() if v is not None}
        self.heuristic_first_step = integ.first_step is None
        self.solver_name = integ.solver
        self.traces = {"init": 0, "advance": 0}
        self.compile_seconds = 0.0
        # run-time counting: implicit solvers (Newton iterations), or on request (tests check the formula)
        self.runtime_count = self.implicit or bool(getattr(integ, "count_at_runtime", False))
        self.counter = _Counter() if self.runtime_count else None
        self.tdtype = _time_dtype()
        counter = self.counter

        def field(t, y, args):
            if counter is not None:
                jax.debug.callback(counter)
            return tuple(flow.vector_field(t, y, ops, hp))

        self.term = dfx.ODETerm(field)
        solver0 = self._solver(1e-6, 1e-8)
        self.fsal = bool(getattr(getattr(solver0, "tableau", None), "fsal", False)) and not self.implicit
        self.stages = int(getattr(getattr(solver0, "tableau", None), "num_stages", 1))
        self.error_order = solver0.error_order(self.term) if not self.fixed else None
        self._jitted: dict[str, Any] = {}

    # ------------------------------------------------------------------ parts
    def _solver(self, rtol: Any, atol: Any) -> Any:
        cls = _EXTRA.get(self.solver_name) or getattr(dfx, self.solver_name)
        if not self.implicit:
            return cls()
        import lineax as lx

        linear = (lx.AutoLinearSolver(well_posed=None) if self.linear_solver == "lu"
                  else lx.GMRES(rtol=1e-3 * rtol, atol=1e-3 * atol, restart=20, stagnation_iters=20))
        root = dfx.VeryChord(rtol=rtol, atol=atol, norm=optx.rms_norm, linear_solver=linear)
        return cls(root_finder=root, root_find_max_steps=self.root_find_max_steps)

    def _controller(self, rtol: Any, atol: Any) -> Any:
        return dfx.PIDController(rtol=rtol, atol=atol, **self.controller_options)

    def _attempt_nfe(self, solver_state: Any, made_jump: Any) -> Any:
        """Evaluations one attempted explicit step costs (formula; 0 for implicit: counted at run time)."""
        if self.runtime_count:
            return jnp.zeros((), jnp.int32)
        if self.fsal:
            first = solver_state[0] | made_jump
            return (self.stages - 1) + first.astype(jnp.int32)
        return jnp.int32(self.stages)

    # ------------------------------------------------------------- functions
    def _init(self, t0, y0, rtol, atol, dt0):
        self.traces["init"] += 1
        solver = self._solver(rtol, atol)
        zero_i = jnp.zeros((), jnp.int32)
        nfe = zero_i
        if self.fixed:
            tnext, cstate = t0, None
        else:
            ctrl = self._controller(rtol, atol)
            tnext, cstate = ctrl.init(self.term, t0, t0 + 1, y0, None if self.heuristic_first_step else dt0, None,
                                      solver.func, self.error_order)
            if self.heuristic_first_step and not self.runtime_count:
                nfe = nfe + 2  # the initial-step heuristic evaluates the field twice
        sstate = solver.init(self.term, t0, tnext, y0, None)
        _, _, dense, _, _ = eqx.filter_eval_shape(solver.step, self.term, t0, tnext, y0, None, sstate, False)
        dense = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), dense)
        return {
            "tprev": t0, "tnext": jnp.asarray(tnext, self.tdtype), "y": y0, "sstate": sstate, "cstate": cstate,
            "made_jump": jnp.asarray(False), "d_t0": t0, "d_t1": t0, "dense": dense, "nfe": nfe,
            "accepted": zero_i, "rejected": zero_i, "result": dfx.RESULTS.successful, "stop": zero_i,
        }

    def _advance_adaptive(self, c, t_target, rtol, atol):
        self.traces["advance"] += 1
        solver, ctrl = self._solver(rtol, atol), self._controller(rtol, atol)
        term, exact = self.term, self.exact
        eps = jnp.finfo(self.tdtype).eps

        def cond(s):
            c, n = s
            return (c["tprev"] < t_target) & dfx.is_okay(c["result"]) & (c["stop"] == STOP_NONE) & (n < self.max_steps)

        def body(s):
            c, n = s
            t0, t1 = c["tprev"], c["tnext"]
            if exact:  # land on the recording time (snap as diffeqsolve's _clip_to_end does)
                tol = 1e-10 if self.tdtype == jnp.float64 else 1e-6
                clipped = t1 > t_target - tol * jnp.maximum(1.0, jnp.abs(t_target))
                t1 = jnp.where(clipped, t_target, t1)
            nfe = c["nfe"] + self._attempt_nfe(c["sstate"], c["made_jump"])
            y1, y_err, dense, sstate, sres = solver.step(term, t0, t1, c["y"], None, c["sstate"], c["made_jump"])
            y_err = jax.tree_util.tree_map(lambda x: jnp.where(jnp.isnan(x), jnp.inf, x), y_err)
            keep, ntp, ntn, mj, cstate, cres = ctrl.adapt_step_size(t0, t1, c["y"], y1, None, y_err, self.error_order,
                                                                   c["cstate"])
            if exact:  # after a step cut short to land, go on with the step size it was cut from
                ntn = jnp.where(keep & clipped, ntp + jnp.maximum(ntn - ntp, c["tnext"] - c["tprev"]), ntn)

            def pick(a, b):
                return jnp.where(keep, a, b)

            sres = dfx.RESULTS.where(keep, sres, dfx.RESULTS.successful)
            result = dfx.RESULTS.where(dfx.is_okay(c["result"]), sres, c["result"])
            result = dfx.RESULTS.where(dfx.is_okay(result), cres, result)
            underflow = (ntn - ntp) <= 16 * eps * jnp.maximum(1.0, jnp.abs(ntp))
            new = {
                "tprev": ntp, "tnext": ntn, "y": jax.tree_util.tree_map(pick, y1, c["y"]),
                "sstate": jax.tree_util.tree_map(pick, sstate, c["sstate"]), "cstate": cstate,
                "made_jump": pick(jnp.asarray(mj), c["made_jump"]), "d_t0": pick(t0, c["d_t0"]),
                "d_t1": pick(t1, c["d_t1"]), "dense": jax.tree_util.tree_map(pick, dense, c["dense"]), "nfe": nfe,
                "accepted": c["accepted"] + keep.astype(jnp.int32), "rejected": c["rejected"] + (~keep).astype(jnp.int32),
                "result": result, "stop": jnp.where(underflow, STOP_UNDERFLOW, c["stop"]).astype(jnp.int32),
            }
            return new, n + 1

        c, n = lax.while_loop(cond, body, (c, jnp.zeros((), jnp.int32)))
        c["stop"] = jnp.where((c["stop"] == STOP_NONE) & (c["tprev"] < t_target) & (n >= self.max_steps),
                              STOP_MAX_STEPS, c["stop"]).astype(jnp.int32)
        if exact:
            y_at = c["y"]
        else:
            interp = solver.interpolation_cls(t0=c["d_t0"], t1=c["d_t1"], **c["dense"])
            inside = (c["d_t1"] > c["d_t0"]) & (t_target < c["tprev"])
            y_i = interp.evaluate(jnp.clip(t_target, c["d_t0"], c["d_t1"]))
            y_at = jax.tree_util.tree_map(lambda a, b: jnp.where(inside, a, b), y_i, c["y"])
        return c, y_at, self._finite(y_at)

    def _advance_fixed(self, c, t0, t1, n):
        self.traces["advance"] += 1
        solver, term = self._solver(1e-8, 1e-10), self.term
        h = (t1 - t0) / n

        def cond(s):
            c, i = s
            return (i < n) & dfx.is_okay(c["result"])

        def body(s):
            c, i = s
            ta = t0 + i * h
            tb = jnp.where(i == n - 1, t1, t0 + (i + 1) * h)
            nfe = c["nfe"] + self._attempt_nfe(c["sstate"], c["made_jump"])
            y1, _, _, sstate, sres = solver.step(term, ta, tb, c["y"], None, c["sstate"], c["made_jump"])
            new = dict(c, tprev=tb, tnext=tb, y=y1, sstate=sstate, nfe=nfe, accepted=c["accepted"] + 1,
                       made_jump=jnp.asarray(False), result=dfx.RESULTS.where(dfx.is_okay(c["result"]), sres,
                                                                               c["result"]))
            return new, i + 1

        c, _ = lax.while_loop(cond, body, (c, jnp.zeros((), jnp.int32)))
        return c, c["y"], self._finite(c["y"])

    @staticmethod
    def _finite(y: tuple) -> Any:
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(y)]))

    # -------------------------------------------------------------- compiled
    def call(self, which: str, *args: Any) -> Any:
        """Run ``init`` / ``advance``: jit-compiled on first use; the trace and compile time JAX
        reports during the call is added to ``compile_seconds``.  (Plain ``jax.jit``, not
        ``lower().compile()``: ahead-of-time executables lose the arrays a flow creates while it
        is traced, e.g. flowlab.theory's law terms, on JAX 0.10.)"""
        fn = self._jitted.get(which)
        if fn is None:
            target = {"init": self._init, "advance": self._advance_fixed if self.fixed else self._advance_adaptive}[which]
            fn = self._jitted[which] = jax.jit(target)
        before = compile_seconds()
        out = fn(*args)
        self.compile_seconds += compile_seconds() - before
        return out


# kernels per flow object (weak: a flow that goes away takes its kernels with it)
_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def kernel_for(integ: Any, flow: Any, ops: Any, hp: Any, y0: tuple) -> Kernel:
    key = (id(ops), hp, integ.solver, integ.kind, integ.land, integ.max_steps, integ.first_step is None,
           bool(getattr(integ, "count_at_runtime", False)),
           tuple(sorted((k, v) for k, v in integ.controller_options.items())), integ.linear_solver,
           integ.root_find_max_steps,
           tuple((tuple(a.shape), str(a.dtype)) for a in y0), bool(jax.config.jax_enable_x64))
    per_flow = _KERNELS.setdefault(flow, {})
    if key not in per_flow:
        per_flow[key] = Kernel(integ, flow, ops, hp, y0)
    return per_flow[key]


def _describe_result(code: int, stop: int, t: float, name: str, max_steps: int) -> str:
    where = f"at t={t:.6g}"
    if stop == STOP_MAX_STEPS:
        return f"stopped: more than max_steps={max_steps} steps in one interval {where} ({name})"
    if stop == STOP_UNDERFLOW:
        return f"blew up: step size underflow {where} ({name})"
    message = dfx.RESULTS._index_to_message.get(code, f"code {code}") if hasattr(dfx.RESULTS, "_index_to_message") \
        else f"code {code}"
    return f"failed {where}: diffrax: {message} ({name})"


class DiffraxSession:
    """One flow integrated by a diffrax solver, one state on the device (:class:`flowlab.flows.base.Session`)."""

    def __init__(self, integ: Any, flow: Any, ops: Any, hp: Any, t0: float, state: tuple):
        self.integ, self.flow, self.ops, self.hp = integ, flow, ops, hp
        y0 = tuple(self._as_jax(s) for s in state)
        self.kernel = kernel_for(integ, flow, ops, hp, y0)
        self.tdtype = self.kernel.tdtype
        self._np_tdtype = np.dtype(self.tdtype)
        dtype_name = jnp.dtype(y0[0].dtype).name
        self.rtol, self.atol = integ.tols(dtype_name)
        self.dt = integ.fixed_dt(hp) if self.kernel.fixed else None
        self.t = float(t0)
        self._state = y0
        first = integ.first_step if integ.first_step is not None else 0.0
        before = self._counts_start()
        self.carry = self._call("init", self._t(t0), y0, self._t(self.rtol), self._t(self.atol), self._t(first))
        self.nfe, self.steps, self.rejected = 0, 0, 0
        self._sync_counts(before)

    def _as_jax(self, s: Any) -> Any:
        if isinstance(s, torch.Tensor):
            return to_jax(s, self.ops.device, self.ops.dtype)
        return jnp.asarray(s, dtype=self.ops.dtype)

    def _t(self, x: float) -> Any:
        return np.asarray(x, self._np_tdtype)  # a host scalar: no device op per argument

    def _call(self, which: str, *args: Any) -> Any:
        c0, t0 = self.kernel.compile_seconds, sum(self.kernel.traces.values())
        out = self.kernel.call(which, *args)
        self.integ.stats["compile_seconds"] += self.kernel.compile_seconds - c0
        self.integ.stats["traces"] += sum(self.kernel.traces.values()) - t0
        return out

    def _counts_start(self) -> int:
        return self.kernel.counter.n if self.kernel.counter is not None else 0

    def _sync_counts(self, counter_before: int, counts: tuple | None = None) -> None:
        if counts is None:
            counts = jax.device_get((self.carry["nfe"], self.carry["accepted"], self.carry["rejected"]))
        nfe, acc, rej = (int(x) for x in counts)
        if self.kernel.counter is not None:
            jax.effects_barrier()
            nfe = self.nfe + (self.kernel.counter.n - counter_before)
        d_nfe, d_acc, d_rej = nfe - self.nfe, acc - self.steps, rej - self.rejected
        self.nfe, self.steps, self.rejected = nfe, acc, rej
        for key, d in (("nfe", d_nfe), ("accepted", d_acc), ("rejected", d_rej)):
            self.integ.stats[key] += d

    @property
    def state(self) -> tuple:
        return self._state

    def state_dict(self) -> dict:
        """Time, state, counts and the kernel's whole carried loop state (step size, FSAL stage,
        controller memory, dense output) as host arrays — :mod:`flowlab.checkpoint`."""
        from ..checkpoint import pack

        leaves = jax.tree_util.tree_leaves(self.carry)
        return {"t": self.t, "state": pack(tuple(np.asarray(x) for x in self._state)),
                "carry": [pack(np.asarray(x)) for x in leaves],
                "nfe": self.nfe, "steps": self.steps, "rejected": self.rejected}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import unpack

        leaves, treedef = jax.tree_util.tree_flatten(self.carry)
        saved = unpack(state["carry"])
        if len(saved) != len(leaves):
            raise RuntimeError(f"checkpoint: the diffrax loop state has {len(saved)} arrays, this kernel {len(leaves)}")
        new = [jax.device_put(jnp.asarray(a, dtype=x.dtype), getattr(x, "sharding", None))
               for a, x in zip(saved, leaves)]
        self.carry = jax.tree_util.tree_unflatten(treedef, new)
        self._state = tuple(jnp.asarray(a, dtype=x.dtype) for a, x in zip(unpack(state["state"]), self._state))
        self.t = float(state["t"])
        self.nfe, self.steps, self.rejected = int(state["nfe"]), int(state["steps"]), int(state["rejected"])

    def advance(self, t1: float) -> tuple:
        t1 = float(t1)
        if t1 <= self.t:
            return self._state
        before = self._counts_start()
        if self.kernel.fixed:
            n = max(1, int(np.ceil((t1 - self.t) / self.dt - 1e-9)))
            self.carry, y, finite = self._call("advance", self.carry, self._t(self.t), self._t(t1), jnp.int32(n))
        else:
            self.carry, y, finite = self._call("advance", self.carry, self._t(t1), self._t(self.rtol),
                                               self._t(self.atol))
        # one transfer back per interval: the counts and the few scalars that say how it went
        nfe, acc, rej, code, stop, tprev, finite = jax.device_get((
            self.carry["nfe"], self.carry["accepted"], self.carry["rejected"], self.carry["result"]._value,
            self.carry["stop"], self.carry["tprev"], finite))
        self._sync_counts(before, (nfe, acc, rej))
        if int(code) != 0 or int(stop) != 0:
            reached = min(float(tprev), t1)
            self.t = reached
            raise FlowStopped(_describe_result(int(code), int(stop), reached, self.integ.name, self.kernel.max_steps))
        if not bool(finite):
            raise FlowStopped(f"blew up: non-finite state at t={t1:.6g} ({self.integ.name})")
        self.t, self._state = t1, y
        return y
