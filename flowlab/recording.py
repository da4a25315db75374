"""Recorders: the extension point through which every method's trajectory reaches the store.

A :class:`Recorder` declares the variables it fills (:class:`Variable`: name, dims, dtype, new
coordinates), sees every update of the discrete run (``before_update`` / ``after_update`` with a
:class:`StepInfo`), and at each recording time gets one :class:`Point` per method, which it turns
into values with ``rows.put(name, method_index, value)``.  Values stay on the device until a chunk
of rows is flushed to disk, so recording costs no synchronisation.

Row convention: the row at time t_k holds the state θ_k *before* update k, the batch loss at θ_k
and the batch gradient ĝ_k that update k applies.  The last row (k = steps) has its own
evaluation at θ_steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import Study
    from .problem import Problem


@dataclass(frozen=True)
class Variable:
    """A variable of the trajectory Dataset.

    ``dims`` name its dimensions in order.  A per-method variable starts with ``method``; a variable
    of the discrete run alone (``grad_term``, ``theory``) has none.  It grows along ``time`` or
    ``snapshot`` if one of them is among its dims (anywhere after ``method``: ``("variant", "time",
    "group")`` is fine); a variable with neither (``("method",)``) is a per-method summary.
    ``shape`` gives the sizes of the other dims, in order; ``coords`` coordinate values for new dims
    (``proj``, ``group``...), ``dim_coords`` non-index coordinates on them (name → (dim, values)).
    Values passed to ``Rows.put`` have ``shape``.
    """

    name: str
    dims: tuple[str, ...]
    dtype: Any = np.float64
    shape: tuple[int, ...] = ()  # sizes of the dims other than method and the growing one
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    dim_coords: dict[str, tuple[str, np.ndarray]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def per_method(self) -> bool:
        return self.dims[0] == "method"

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

    def full_shape(self, n_methods: int, length: int) -> tuple[int, ...]:
        """The array shape for ``length`` entries along the growing dim."""
        others = iter(self.shape)
        out = []
        for d in self.dims:
            if d == "method":
                out.append(n_methods)
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
    """One method's state at a recording time (tensors are live buffers: read, do not keep)."""

    method: str
    index: int
    step: int
    time: float
    theta: torch.Tensor
    loss: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    buf: torch.Tensor | None = None
    velocity: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    study: Study
    problem: Problem
    methods: list[str]
    steps: int
    record_steps: np.ndarray
    record_times: np.ndarray
    snapshot_steps: np.ndarray
    lrs: np.ndarray
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_methods(self) -> int:
        return len(self.methods)


class Rows:
    """A chunk of rows along one growing dim, held as device tensors until flushed."""

    def __init__(self, dim: str, variables: list[Variable], n_methods: int, capacity: int,
                 device: torch.device):
        self.dim, self.capacity, self.n_methods = dim, capacity, n_methods
        self.variables = {v.name: v for v in variables}
        self.data: dict[str, torch.Tensor] = {}
        for v in variables:
            tdtype = _torch_dtype(v.dtype)
            fill = math.nan if tdtype.is_floating_point else 0
            lead = (n_methods, capacity) if v.per_method else (capacity,)
            self.data[v.name] = torch.full((*lead, *v.shape), fill, dtype=tdtype, device=device)
        self.steps = np.zeros(capacity, dtype=np.int64)
        self.times = np.zeros(capacity, dtype=np.float64)
        self.n = 0  # rows filled
        self.row = -1  # current row

    def begin(self, step: int, time: float) -> None:
        self.row = self.n
        self.steps[self.row], self.times[self.row] = step, time
        self.n += 1

    def put(self, name: str, method_index: int | None, value: torch.Tensor | float) -> None:
        """Store ``value`` in the current row (``method_index`` None for a variable without a method dim)."""
        if method_index is None:
            self.data[name][self.row] = value
        else:
            self.data[name][method_index, self.row] = value

    def put_at(self, name: str, method_index: int | None, row: int, value: torch.Tensor) -> None:
        if method_index is None:
            self.data[name][row] = value
        else:
            self.data[name][method_index, row] = value

    @property
    def full(self) -> bool:
        return self.n >= self.capacity

    def take(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        n = self.n
        arrays = {}
        for k, t in self.data.items():
            v = self.variables[k]
            part = t[:, :n] if v.per_method else t[:n]
            values = part.detach().cpu().numpy()
            arrays[k] = np.moveaxis(values, 1 if v.per_method else 0, v.axis).copy(order="C")
            part.fill_(math.nan if t.dtype.is_floating_point else 0)
        steps, times = self.steps[:n].copy(), self.times[:n].copy()
        self.n, self.row = 0, -1
        return arrays, steps, times


def _torch_dtype(dtype: Any) -> torch.dtype:
    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
            np.dtype(np.bool_): torch.bool}[np.dtype(dtype)]


class Recorder:
    """Base class: override what you need.  Hooks not overridden cost nothing per step."""

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

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Recorder, hook)


# ------------------------------------------------------------- core recorders


class LossRecorder(Recorder):
    """``loss`` (method, time): the loss each method reports at θ(t) — for the discrete run the
    batch loss of the update taken there, for flows the full-batch loss they integrate."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [Variable("loss", ("method", "time"), attrs={"long_name": "loss at θ(t)"})]

    def record(self, rows: Rows, point: Point) -> None:
        if point.loss is not None:
            rows.put("loss", point.index, point.loss)


class FullLossRecorder(Recorder):
    """``full_loss`` (method, time): the full-batch loss at θ(t) (one extra evaluation per row)."""

    def start(self, ctx: RunContext) -> None:
        self.problem = ctx.problem

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [Variable("full_loss", ("method", "time"), attrs={"long_name": "full-batch loss at θ(t)"})]

    def record(self, rows: Rows, point: Point) -> None:
        value = point.extras.get("full_loss")
        if value is None:
            value = self.problem.full_loss(point.theta)
        rows.put("full_loss", point.index, value)


class DistanceRecorder(Recorder):
    """``distance`` (method, time) = |θ_method(t) − θ_sgd(t)|."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [Variable("distance", ("method", "time"), attrs={"long_name": "|θ(t) − θ_sgd(t)|"})]

    def record(self, rows: Rows, point: Point) -> None:
        if point.reference is None or point.reference is point.theta:
            rows.put("distance", point.index, 0.0)
        else:
            rows.put("distance", point.index, torch.linalg.vector_norm(point.theta - point.reference))


class ProjectionRecorder(Recorder):
    """``projection`` (method, time, proj) = ⟨r_i, θ(t)⟩ for seeded Gaussian r_i ~ N(0, I/m).

    θ's are gathered in a small ring and projected together (one matrix product per batch of
    rows instead of one matrix-vector product per row)."""

    def __init__(self, count: int, seed: int, ring_bytes: int = 32 << 20):
        self.count, self.seed, self.ring_bytes = count, seed, ring_bytes

    def variables(self, ctx: RunContext) -> list[Variable]:
        return [Variable("projection", ("method", "time", "proj"), shape=(self.count,),
                         coords={"proj": np.arange(self.count)},
                         attrs={"long_name": "⟨r_i, θ(t)⟩, r_i ~ N(0, I/m) seeded by study.seed"})]

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
        rows.data["projection"][idx_m, idx_r] = values.T.to(rows.data["projection"].dtype)
        self.pending.clear()


class SnapshotRecorder(Recorder):
    """``theta`` (method, snapshot, param): full θ at the snapshot times (t = 0 and the end always)."""

    def variables(self, ctx: RunContext) -> list[Variable]:
        dt = np.float32 if ctx.problem.dtype == torch.float32 else np.float64
        return [Variable("theta", ("method", "snapshot", "param"), dtype=dt, shape=(ctx.problem.dim,),
                         attrs={"long_name": "θ at the snapshot times", "layout": "see the Dataset's param_layout attribute"})]

    def snapshot(self, rows: Rows, point: Point) -> None:
        rows.put("theta", point.index, point.theta)


# Plugins add recorders to every run: factory(ctx) -> list[Recorder] (may be empty), called in
# ascending ``order`` (a recorder that reuses another's results, like the theory, goes later).
RECORDER_FACTORIES: list = []
_ORDER: dict = {}


def register_recorders(factory, order: int = 100) -> None:
    if factory not in RECORDER_FACTORIES:
        RECORDER_FACTORIES.append(factory)
    _ORDER[factory] = order
    RECORDER_FACTORIES.sort(key=lambda f: _ORDER[f])


def core_recorders(study: Study) -> list[Recorder]:
    rec = study.record
    recorders: list[Recorder] = [LossRecorder(), DistanceRecorder()]
    if rec.full_loss:
        recorders.append(FullLossRecorder())
    if rec.projections:
        recorders.append(ProjectionRecorder(rec.projections, study.study.seed))
    recorders.append(SnapshotRecorder())
    return recorders
