"""Recorders: the extension point through which every dynamics' trajectory reaches the store.

A :class:`Recorder` declares the variables it fills (:class:`Variable`: name, dims, dtype, new
coordinates), sees every update of the discrete run (``before_update`` / ``after_update`` with a
:class:`StepInfo`), and at each recording time gets one :class:`Point` per dynamics (the discrete
run ``sgd``, then every continuous model), which it turns into values with
``rows.put(name, index, value)``.  Values stay on the device until a chunk of rows is flushed to
disk, so recording costs no synchronisation.  A recorder that needs another (the theory needs the
symmetry recorder's per-step terms) is given it as a constructor argument by the part that builds
both (:mod:`flowlab.parts`).

Row convention: the row at time t_k holds the state θ_k *before* update k, the batch loss at θ_k
and the batch gradient ĝ_k that update k applies.  The last row (k = steps) has its own
evaluation at θ_steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import Study
    from .problem import Problem


#: Dims renamed because xarray's ``sel(method=...)`` / ``groupby(group=...)`` swallow them
#: (stores written before the rename are read with the new names: :func:`flowlab.open_result`).
RENAMED_DIMS = {"method": "dynamics", "group": "symmetry_group"}
#: Keyword arguments of xarray's sel / isel / interp / reindex / groupby / rolling / coarsen and of
#: reductions: a dim with one of these names cannot be selected by keyword.
XARRAY_KEYWORDS = frozenset({
    "method", "tolerance", "drop", "indexers", "missing_dims", "coords", "assume_sorted", "kwargs",
    "method_non_numeric", "copy", "fill_value", "group", "squeeze", "restore_coord_dims", "dim", "axis",
    "skipna", "keep_attrs", "keepdims", "min_count", "min_periods", "center", "boundary", "side",
    "coord_func", "func", "numeric_only", "eagerly_compute_group",
})


@dataclass(frozen=True)
class Variable:
    """A variable of the trajectory Dataset.

    ``dims`` name its dimensions in order.  A per-dynamics variable starts with ``dynamics``; a
    variable of the discrete run alone (``grad_term``, ``theory``) has none.  It grows along ``time``
    or ``snapshot`` if one of them is among its dims (anywhere after ``dynamics``: ``("variant",
    "time", "symmetry_group")`` is fine); a variable with neither (``("dynamics",)``) is a
    per-dynamics summary.  ``shape`` gives the sizes of the other dims, in order; ``coords``
    coordinate values for new dims (``proj``, ``symmetry_group``...), ``dim_coords`` non-index
    coordinates on them (name → (dim, values)).  Values passed to ``Rows.put`` have ``shape``.

    Dims must not be named like a keyword of xarray's ``sel``/``isel``/``interp``/``groupby``/
    reductions (``method``, ``group``, ``dim``, ``drop``, ...): ``ds.x.sel(method="sgd")`` would not
    select.  The old names ``method`` and ``group`` are read as ``dynamics`` and ``symmetry_group``
    (with a DeprecationWarning); others are refused.
    """

    name: str
    dims: tuple[str, ...]
    dtype: Any = np.float64
    shape: tuple[int, ...] = ()  # sizes of the dims other than dynamics and the growing one
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    dim_coords: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        old = [d for d in self.dims if d in RENAMED_DIMS]
        if old:
            warnings.warn(f"variable {self.name!r}: dims {old} are now named "
                          f"{[RENAMED_DIMS[d] for d in old]}", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "dims", tuple(RENAMED_DIMS.get(d, d) for d in self.dims))
        clash = [d for d in self.dims if d in XARRAY_KEYWORDS]
        if clash:
            raise ValueError(f"variable {self.name!r}: dim name(s) {clash} are keywords of xarray's methods "
                             "(ds.sel / isel / interp / groupby / reductions would not select them); choose another")

    @property
    def per_dynamics(self) -> bool:
        return self.dims[0] == "dynamics"

    per_method = per_dynamics  # the name before the rename

    @property
    def grows_along(self) -> str | None:
        for d in self.dims:
            if d in ("time", "snapshot"):
                return d
        return None

    @property
    def axis(self) -> int:
        """Position of the growing dim in ``dims``."""
        return self.dims.index(self.grows_along)

    def full_shape(self, n_dynamics: int, length: int) -> tuple[int, ...]:
        """The array shape for ``length`` entries along the growing dim."""
        others = iter(self.shape)
        out = []
        for d in self.dims:
            if d == "dynamics":
                out.append(n_dynamics)
            elif d == self.grows_along:
                out.append(length)
            else:
                out.append(next(others))
        return tuple(out)


@dataclass
class StepInfo:
    """One update k of the discrete run: θ_{k+1} = θ_k − η_k · d_k.

    In ``before_update``: ``theta`` is θ_k, ``buf`` is v_k (None before the first momentum step).
    In ``after_update``: ``theta`` is θ_{k+1}, ``buf`` is v_{k+1}.  ``grad`` is the applied batch
    gradient ĝ_k without weight decay, ``loss`` the batch loss at θ_k, ``lr`` η_k, ``time`` t_k.
    Tensors are live buffers: read them, do not keep them.
    """

    step: int
    time: float
    lr: float
    theta: torch.Tensor
    grad: torch.Tensor
    loss: torch.Tensor
    buf: torch.Tensor | None
    batch: Any = None


@dataclass
class Point:
    """One dynamics' state at a recording time (tensors are live buffers: read, do not keep).

    ``label`` names the dynamics (``sgd`` or a flow's label), ``index`` its position along the
    ``dynamics`` dim.  ``loss`` is what the dynamics reports at θ (the discrete run: the batch loss
    of the update taken there; a flow: the full-batch loss it integrates), ``grad`` and ``buf`` the
    discrete run's applied batch gradient and momentum buffer, ``velocity`` θ' of a second-order
    flow, ``reference`` the discrete run's θ at the same time.  ``nfe``, ``flow_time``,
    ``full_loss``: a flow's evaluation count, its own time (t − s) and full-batch loss; ``extras``:
    what a flow reports beyond these (:meth:`flowlab.flows.Flow.observe`, e.g. ``flow_law``)."""

    label: str
    index: int
    step: int
    time: float
    theta: torch.Tensor
    loss: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    buf: torch.Tensor | None = None
    velocity: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    nfe: float | None = None
    flow_time: float | None = None
    full_loss: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        """The label (its name before the ``dynamics`` rename)."""
        return self.label


@dataclass
class RunContext:
    """What recorders see of a run: ``dynamics`` are the labels along the ``dynamics`` dim
    (``sgd`` first), ``record_steps`` / ``snapshot_steps`` the steps recorded."""

    study: Study
    problem: Problem
    dynamics: list[str]
    steps: int
    record_steps: np.ndarray
    record_times: np.ndarray
    snapshot_steps: np.ndarray
    lrs: np.ndarray
    #: replicas of every stochastic dynamics (``[ensemble] size``; 1: a single run)
    samples: int = 1

    def per_path(self, name: str, dims: tuple[str, ...], shape: tuple[int, ...] = (), **kw: Any) -> Variable:
        """A per-path :class:`Variable`: in an ensemble it gains a ``sample`` dim (after
        ``dynamics``, else first) with coordinate 0..K−1; deterministic dynamics repeat their value
        along it."""
        if self.samples <= 1:
            return Variable(name, dims, shape=shape, **kw)
        dims = ("dynamics", "sample", *dims[1:]) if dims[0] == "dynamics" else ("sample", *dims)
        coords = {**kw.pop("coords", {}), "sample": np.arange(self.samples)}
        return Variable(name, dims, shape=(self.samples, *shape), coords=coords, **kw)

    @property
    def n_dynamics(self) -> int:
        return len(self.dynamics)

    @property
    def methods(self) -> list[str]:  # the name before the rename
        return self.dynamics


class Rows:
    """A chunk of rows along one growing dim, held as device tensors until flushed."""

    def __init__(self, dim: str, variables: list[Variable], n_dynamics: int, capacity: int,
                 device: torch.device):
        self.dim, self.capacity, self.n_dynamics = dim, capacity, n_dynamics
        self.variables = {v.name: v for v in variables}
        self.data: dict[str, torch.Tensor] = {}
        for v in variables:
            tdtype = _torch_dtype(v.dtype)
            fill = math.nan if tdtype.is_floating_point else 0
            lead = (n_dynamics, capacity) if v.per_dynamics else (capacity,)
            self.data[v.name] = torch.full((*lead, *v.shape), fill, dtype=tdtype, device=device)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.times = np.zeros(capacity, dtype=np.float64)
        self.n = 0  # rows filled
        self.row = -1  # current row

    def begin(self, step: int, time: float) -> None:
        self.row = self.n
        self.steps[self.row], self.times[self.row] = step, time
        self.n += 1

    def put(self, name: str, index: int | None, value: torch.Tensor | float) -> None:
        """Store ``value`` in the current row (``index``: the dynamics' position; None for a variable
        without a ``dynamics`` dim)."""
        if index is None:
            self.data[name][self.row] = value
        else:
            self.data[name][index, self.row] = value

    def put_at(self, name: str, index: int | None, row: int, value: torch.Tensor) -> None:
        if index is None:
            self.data[name][row] = value
        else:
            self.data[name][index, row] = value

    def put_rows(self, name: str, index: int | None, rows: list[int], values: torch.Tensor) -> None:
        """Store ``values`` (len(rows), *shape) in several rows of this chunk at once."""
        at = torch.as_tensor(rows, dtype=torch.long, device=self.data[name].device)
        if index is None:
            self.data[name].index_copy_(0, at, values.to(self.data[name].dtype))
        else:
            self.data[name][index].index_copy_(0, at, values.to(self.data[name].dtype))

    @property
    def full(self) -> bool:
        return self.n >= self.capacity

    def take(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        n = self.n
        arrays = {}
        for k, t in self.data.items():
            v = self.variables[k]
            part = t[:, :n] if v.per_dynamics else t[:n]
            values = part.detach().cpu().numpy()
            arrays[k] = np.moveaxis(values, 1 if v.per_dynamics else 0, v.axis).copy(order="C")
            part.fill_(math.nan if t.dtype.is_floating_point else 0)
        steps, times = self.steps[:n].copy(), self.times[:n].copy()
        self.n, self.row = 0, -1
        return arrays, steps, times


def _torch_dtype(dtype: Any) -> torch.dtype:
    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
            np.dtype(np.bool_): torch.bool}[np.dtype(dtype)]


class Recorder:
    """Base class: override what you need.  Hooks not overridden cost nothing per step.

    ``variables(ctx)`` declares what it records; ``start(ctx)`` once before the first step;
    a recorder that draws random numbers from a generator of its own may define ``seeds()`` →
    {name: seed}, recorded in the Dataset's ``seeds`` attribute;
    ``before_update`` / ``after_update`` around every discrete update; ``record(rows, point)`` at
    every recording time, once per dynamics (in ``dynamics`` order); ``snapshot(rows, point)`` at the
    snapshot times; ``before_flush(rows)`` before a chunk of rows goes to the store."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return []

    def start(self, ctx: RunContext) -> None:
        pass

    def before_update(self, info: StepInfo) -> None:
        pass

    def after_update(self, info: StepInfo) -> None:
        pass

    def record(self, rows: Rows, point: Point) -> None:
        pass

    def snapshot(self, rows: Rows, point: Point) -> None:
        pass

    def before_flush(self, rows: Rows) -> None:
        pass

    def state_dict(self) -> dict:
        """What a checkpoint must keep of this recorder, taken right after a flush (nothing of the
        flushed rows is pending): accumulators, generators (:mod:`flowlab.checkpoint`).  A recorder
        whose state is rebuilt by ``start`` keeps nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Recorder, hook)


# ------------------------------------------------------------- core recorders


class LossRecorder(Recorder):
    """``loss`` (dynamics, time): the loss each dynamics reports at θ(t) — for the discrete run the
    batch loss of the update taken there, for flows the full-batch loss they integrate."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [ctx.per_path("loss", ("dynamics", "time"), attrs={"long_name": "loss at θ(t)"})]

    def record(self, rows: Rows, point: Point) -> None:
        if point.loss is not None:
            rows.put("loss", point.index, point.loss)


class FullLossRecorder(Recorder):
    """``full_loss`` (dynamics, time): the full-batch loss at θ(t) (one extra evaluation per row)."""

    def start(self, ctx: RunContext) -> None:
        self.problem = ctx.problem

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [ctx.per_path("full_loss", ("dynamics", "time"), attrs={"long_name": "full-batch loss at θ(t)"})]

    def record(self, rows: Rows, point: Point) -> None:
        value = point.full_loss
        if value is None:
            theta = point.theta
            if theta.dim() == 1:
                value = self.problem.full_loss(theta)
            else:
                from .stochastic.ensemble import full_losses

                value = full_losses(self.problem, theta)
        rows.put("full_loss", point.index, value)


class DistanceRecorder(Recorder):
    """``distance`` (dynamics, time) = |θ_dynamics(t) − θ_sgd(t)|."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [ctx.per_path("distance", ("dynamics", "time"), attrs={
            "long_name": "|θ(t) − θ_sgd(t)|", "ensemble": "sample s: against SGD replica s"})]

    def record(self, rows: Rows, point: Point) -> None:
        if point.reference is None or point.reference is point.theta:
            rows.put("distance", point.index, 0.0)
        else:
            rows.put("distance", point.index, torch.linalg.vector_norm(point.theta - point.reference, dim=-1))


class ProjectionRecorder(Recorder):
    """``projection`` (dynamics, time, proj) = ⟨r_i, θ(t)⟩ for seeded Gaussian r_i ~ N(0, I/m).

    θ's are gathered in a small ring and projected together (one matrix product per batch of
    rows instead of one matrix-vector product per row)."""

    def __init__(self, count: int, seed: int, ring_bytes: int = 32 << 20):
        self.count, self.seed, self.ring_bytes = count, seed, ring_bytes

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [ctx.per_path("projection", ("dynamics", "time", "proj"), shape=(self.count,),
                         coords={"proj": np.arange(self.count)},
                         attrs={"long_name": "⟨r_i, θ(t)⟩, r_i ~ N(0, I/m) seeded by study.seed"})]

    def seeds(self) -> dict[str, int]:
        """The seed of the r_i (the Dataset's ``seeds`` attribute)."""
        return {"projections": self.seed + 7919}

    def start(self, ctx: RunContext) -> None:
        p = ctx.problem
        gen = torch.Generator().manual_seed(self.seed + 7919)
        R = torch.randn(self.count, p.dim, generator=gen, dtype=torch.float64) / math.sqrt(p.dim)
        self.R = R.to(device=p.device, dtype=p.dtype)
        width = max(1, min(256, self.ring_bytes // max(1, p.dim * p.theta0.element_size())))
        # one row per pending θ: each record is one contiguous copy (a column of a (dim, width) ring
        # would write every parameter to its own cache line)
        self.ring = torch.empty(width, p.dim, dtype=p.dtype, device=p.device)
        self.pending: list[tuple[int, int]] = []

    def record(self, rows: Rows, point: Point) -> None:
        if point.theta.dim() == 2:  # K replicas: project them now
            rows.put("projection", point.index, (point.theta @ self.R.T).to(rows.data["projection"].dtype))
            return
        self.ring[len(self.pending)] = point.theta
        self.pending.append((point.index, rows.row))
        if len(self.pending) == self.ring.shape[0]:
            self._drain(rows)

    def before_flush(self, rows: Rows) -> None:
        self._drain(rows)

    def _drain(self, rows: Rows) -> None:
        if not self.pending:
            return
        n = len(self.pending)
        values = (self.ring[:n] @ self.R.T).T  # (count, n)
        idx_m = torch.tensor([m for m, _ in self.pending], device=values.device)
        idx_r = torch.tensor([r for _, r in self.pending], device=values.device)
        out = rows.data["projection"]
        vals = values.T.to(out.dtype)
        out[idx_m, idx_r] = vals.unsqueeze(1) if out.dim() == 4 else vals  # (dynamics, time, sample, proj) in an ensemble
        self.pending.clear()


class SnapshotRecorder(Recorder):
    """``theta`` (dynamics, snapshot, param): full θ at the snapshot times (t = 0 and the end always)."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        dt = np.float32 if ctx.problem.dtype == torch.float32 else np.float64
        return [ctx.per_path("theta", ("dynamics", "snapshot", "param"), dtype=dt, shape=(ctx.problem.dim,),
                         attrs={"long_name": "θ at the snapshot times", "layout": "see the Dataset's param_layout attribute"})]

    def snapshot(self, rows: Rows, point: Point) -> None:
        rows.put("theta", point.index, point.theta)


def core_recorders(study: Study) -> list[Recorder]:
    rec = study.record
    recorders: list[Recorder] = [LossRecorder(), DistanceRecorder()]
    if rec.full_loss:
        recorders.append(FullLossRecorder())
    if rec.projections:
        recorders.append(ProjectionRecorder(rec.projections, study.study.seed))
    if getattr(rec, "sharpness", False):
        from .spectrum import SharpnessRecorder

        recorders.append(SharpnessRecorder())
    recorders.append(SnapshotRecorder())
    return recorders
