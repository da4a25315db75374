"""The lock-step engine: one discrete run and any number of continuous models, advanced to matched
times t_k = Σ_{j<k} η_j and recorded together.

``flowlab.run`` (a study into a trajectory store), ``flowlab orders`` (errors of every flow against
GD at several η) and ``Integrator.trajectory`` (a flow alone at given times) all drive this one
loop.  Its steps have names:

- **advance(k)** — the discrete run evaluates its batch loss and gradient at θ_k; at a recording
  step every other dynamics is integrated up to t_k (one state each in memory);
- **record(k)** — one :class:`~flowlab.recording.Point` per running dynamics goes to every recorder;
- **snapshot(k)** — the same points to the recorders that keep full θ;
- **update(k)** — the discrete update θ_k → θ_{k+1}, between the recorders' ``before_update`` and
  ``after_update`` hooks;
- **flush** — a full chunk of rows leaves the device for the sink (the run's zarr writer), and
  whatever is buffered at least every ``flush_seconds``;
- **summarise** — status, wall time and gradient evaluations per dynamics.

Every dynamics stops alone, and what it recorded until then is kept (its rows are NaN from there):

- the **discrete run** stops when its loss turns non-finite, with status
  ``diverged: non-finite loss at step k (t = t_k)`` (tested at every step on a CPU, every
  :data:`DIVERGENCE_CHECK_EVERY_DEVICE` steps and at every recording step elsewhere, so on a GPU
  k is the first step tested after the divergence).  Its row k — θ_k and the non-finite loss — is
  recorded (and snapshot) even off the recording grid, beside every other dynamics at t_k;
- **replicas of an ensemble** (θ of shape (K, m)) stop one by one: a replica whose loss is
  non-finite is set to NaN from there and the others go on; the status lists them
  (``partly diverged: 2 of 8 replicas: 3 non-finite loss at step 41 (t = 4.1), ...``), and the run
  is ``diverged: ...`` only when every replica has;
- a **flow** stops when its integrator fails (non-finite state, step-size underflow, more than
  ``max_steps`` steps: its follower's status gives the reason and the time) or its loss turns
  non-finite at a recording step (``diverged: non-finite loss at step k (t = t_k)``); the paths of
  an ensemble's stochastic flow stop one by one like SGD's replicas.

Flows follow the discrete run's clock, t_k = Σ_{j<k} η_j, which the learning-rate schedule fixes
before the run starts; so when the discrete run diverges its flows go on, on the same times, to the
end of the clock (a flow is a model of the discrete run, and where the model stays finite while SGD
blows up is a result: e.g. SGD past its edge of stability, η·λ_max > 2, against gradient flow).
Their ``distance`` to the discrete run is NaN from its last row on.  An engine built with
``followers_outlive_discrete=False`` (``flowlab orders``, which needs the discrete run) stops them
with it instead: ``stopped with sgd (diverged: ...)``.

Rows reach the sink when a chunk is full, and at least every ``flush_seconds`` (the study's
``[record] flush_seconds``), with every dynamics' status, so a run that is still going — or was
killed — shows what it had done.  Ctrl-C marks every running dynamics ``interrupted at step k``,
flushes what was recorded and re-raises; any other exception marks them ``failed at step k: ...``
the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .recording import Point, Recorder, Rows, StepInfo, Variable

#: On a CPU the discrete loss is tested for divergence at every step (cheap); elsewhere every so
#: many steps, since each test synchronises the device (and at every recording step).
DIVERGENCE_CHECK_EVERY = {"cpu": 1}
DIVERGENCE_CHECK_EVERY_DEVICE = 64
#: Snapshot rows (full θ of every dynamics) held on the device before a flush: at most this many,
#: and at most this many bytes.
SNAPSHOT_ROWS = 16
SNAPSHOT_BYTES = 64 << 20
#: Rows along time held on the device before a flush: at most ``record.chunk``, and at most this many
#: bytes (an ensemble's rows are K times wider)
ROWS_BYTES = 256 << 20


class Dynamics(Protocol):
    """A continuous model run in lock step with the discrete run (a flow's follower)."""

    label: str
    status: str  # "running" until it stops; then "ok", or why it stopped
    wall_seconds: float
    n_grad_evals: int

    def advance_to(self, time: float) -> None: ...

    def point(self, index: int, step: int, time: float) -> Point: ...


class Discrete(Protocol):
    """The discrete run that sets the clock (:class:`flowlab.DiscreteSGD`)."""

    label: str
    theta: torch.Tensor
    loss: torch.Tensor | None
    grad: torch.Tensor | None
    buf: torch.Tensor | None
    batch: Any
    step: int
    n_grad_evals: int
    lrs: np.ndarray  # η_k of every update

    def evaluate(self) -> None: ...

    def update(self) -> None: ...

    def keep_grad(self) -> None: ...


def record_grid(steps: int, every: int) -> np.ndarray:
    """0, every, 2·every, ..., and the last step."""
    grid = np.arange(0, steps + 1, every, dtype=np.int64)
    return grid if grid[-1] == steps else np.append(grid, steps)


def snapshot_grid(record_steps: np.ndarray, snapshot_every: int | str | None) -> np.ndarray:
    """Snapshot rows: the first and last record, plus the first record at or after every multiple
    of ``snapshot_every`` steps (default: about ten over the run)."""
    steps = int(record_steps[-1])
    if snapshot_every == "ends" or steps == 0:
        return np.unique(record_steps[[0, -1]])
    every = snapshot_every or max(1, math.ceil(steps / 10))
    bucket = record_steps // every
    keep = np.ones(len(record_steps), dtype=bool)
    keep[1:] = bucket[1:] > bucket[:-1]
    keep[-1] = True
    return record_steps[keep]


@dataclass(frozen=True)
class Clock:
    """The engine's grid: ``times[k]`` = t_k for k = 0..K; ``record`` the steps recorded (ascending,
    the last is K); ``snapshot`` the recorded steps that also keep full θ."""

    times: np.ndarray
    record: np.ndarray
    snapshot: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @classmethod
    def of_run(cls, lrs: np.ndarray, every: int = 1, snapshot_every: int | str | None = "ends") -> Clock:
        """t_k = Σ_{j<k} η_j for the learning rates ``lrs`` (K = len(lrs) updates)."""
        times = np.concatenate([[0.0], np.cumsum(np.asarray(lrs, dtype=np.float64))])
        record = record_grid(len(lrs), every)
        return cls(times, record, snapshot_grid(record, snapshot_every))

    @classmethod
    def at(cls, times: Sequence[float]) -> Clock:
        """Exactly ``times``, each recorded (no discrete run, no snapshots)."""
        t = np.asarray(times, dtype=np.float64).reshape(-1)
        return cls(t, np.arange(len(t), dtype=np.int64), np.zeros(0, dtype=np.int64))


@dataclass
class Summary:
    """Per dynamics (in ``dynamics`` order): status, wall seconds, gradient evaluations."""

    labels: list[str]
    status: list[str]
    wall_seconds: list[float]
    n_grad_evals: list[int]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"status": np.array(self.status, dtype=object), "wall_seconds": np.array(self.wall_seconds),
                "n_grad_evals": np.array(self.n_grad_evals, dtype=np.int64)}

    def by_label(self) -> dict[str, dict[str, Any]]:
        return {"status": dict(zip(self.labels, self.status)), "wall_seconds": dict(zip(self.labels, self.wall_seconds)),
                "n_grad_evals": dict(zip(self.labels, self.n_grad_evals))}


class Sink(Protocol):
    """Takes flushed chunks of rows (the run's :class:`~flowlab.store.TrajectoryWriter`)."""

    def append(self, dim: str, arrays: dict[str, np.ndarray], steps: np.ndarray, times: np.ndarray) -> None: ...

    def set(self, arrays: dict[str, np.ndarray]) -> None: ...


class Recording:
    """The recorders' device buffers (``rows`` along time, ``snaps`` along snapshot) and the sink
    that takes full chunks (None: rows are dropped when full, for internal uses that keep their
    own results).

    Rows leave for the sink when a buffer is full (a chunk, bounded in bytes) and, with
    ``flush_seconds``, at the first recording step at least that long after the last flush
    (:meth:`due`), so the store never lags the run by more than about that."""

    def __init__(self, variables: Sequence[Variable], n_dynamics: int, chunk: int, device: torch.device,
                 theta_bytes: int, sink: Sink | None = None, flush_seconds: float | None = None):
        time_vars = [v for v in variables if v.grows_along == "time"]
        snap_vars = [v for v in variables if v.grows_along == "snapshot"]
        row_bytes = sum((n_dynamics if v.per_dynamics else 1) * int(np.prod(v.shape, dtype=np.int64))
                        * np.dtype(v.dtype).itemsize for v in time_vars)
        chunk = max(1, min(chunk, ROWS_BYTES // max(1, row_bytes)))
        self.rows = Rows("time", time_vars, n_dynamics, chunk, device)
        snap_bytes = sum((n_dynamics if v.per_dynamics else 1) * int(np.prod(v.shape, dtype=np.int64))
                         * np.dtype(v.dtype).itemsize for v in snap_vars)
        snap_cap = max(1, min(SNAPSHOT_ROWS, SNAPSHOT_BYTES // max(1, n_dynamics * theta_bytes, snap_bytes)))
        self.snaps = Rows("snapshot", snap_vars, n_dynamics, snap_cap, device)
        self.sink = sink
        self.flush_seconds = flush_seconds
        self.last_flush = time.monotonic()  # when rows last left for the sink (or the recording began)

    @classmethod
    def discard(cls, n_dynamics: int, device: torch.device) -> Recording:
        """No variables, no sink (orders, trajectories: their recorders keep what they need)."""
        return cls([], n_dynamics, 1024, device, 0)

    def due(self) -> bool:
        """True when ``flush_seconds`` have passed since the last flush (never without a sink)."""
        return (self.sink is not None and self.flush_seconds is not None
                and time.monotonic() - self.last_flush >= self.flush_seconds)


def replica_note(stops: dict[int, tuple[str, int, float]], size: int, noun: str = "replicas") -> str:
    """``2 of 8 replicas: 3 non-finite loss at step 41 (t = 4.1), 5 ...`` (in the order they stopped)."""
    order = sorted(stops.items(), key=lambda kv: (kv[1][1], kv[0]))
    return f"{len(stops)} of {size} {noun}: " + ", ".join(
        f"{s} {why} at step {k} (t = {t:.6g})" for s, (why, k, t) in order)


def with_replicas(status: str, stops: dict | None, size: int, noun: str = "replicas") -> str:
    """A dynamics' status with the replicas (paths) that stopped before it ended (module docstring)."""
    if not stops:
        return status
    if status == "ok":
        return f"partly diverged: {replica_note(stops, size, noun)}"
    if status.startswith("diverged") and len(stops) == size:
        return f"{status}; {noun}: " + replica_note(stops, size, noun).split(": ", 1)[1]
    return f"{status}; diverged before: {replica_note(stops, size, noun)}"


class LockStep:
    """The engine (module docstring).  ``discrete`` sets the clock's steps and is the reference of
    every other dynamics (``point.reference``); without one the ``followers`` are advanced to
    ``clock.times`` alone.

    State between steps (all of it, besides the dynamics' own and the recorders'): ``k`` the step
    being taken, ``status`` the discrete run's (``running`` until it stops), ``replica_stops`` the
    replicas of an ensemble's discrete run that stopped (replica → (why, step, time)), each
    follower's ``status``, and the buffers of ``recording``."""

    def __init__(self, clock: Clock, discrete: Discrete | None, followers: Sequence[Dynamics],
                 recorders: Sequence[Recorder], recording: Recording, *, progress: Any = None,
                 device: torch.device | None = None, followers_outlive_discrete: bool = True):
        self.clock, self.discrete, self.followers = clock, discrete, list(followers)
        self.recorders = list(recorders)
        self.recording = recording
        self.progress = progress
        self.followers_outlive_discrete = followers_outlive_discrete
        self.labels = ([discrete.label] if discrete is not None else []) + [f.label for f in self.followers]
        self.offset = 1 if discrete is not None else 0
        kind = (device or torch.device("cpu")).type
        self.check_every = DIVERGENCE_CHECK_EVERY.get(kind, DIVERGENCE_CHECK_EVERY_DEVICE)
        self.status = "running"  # the discrete run's
        self.replica_stops: dict[int, tuple[str, int, float]] = {}
        self.k = 0
        self.wall_seconds = 0.0
        self._hooks: dict[str, list[Recorder]] = {
            h: [r for r in self.recorders if r.overrides(h)]
            for h in ("before_update", "after_update", "record", "snapshot", "before_flush")}
        self._info: StepInfo | None = None
        #: takes checkpoints at safe points (:class:`flowlab.checkpoint.Checkpointer`; None: none)
        self.checkpointer: Any = None
        #: set (by a signal handler) to stop at the next safe point, after a checkpoint
        self.stop_requested = False
        self._fresh: list[int] = []  # replicas found non-finite at this step (NaN'd after its row)
        self._nan_reference: torch.Tensor | None = None

    @property
    def discrete_running(self) -> bool:
        return self.discrete is not None and self.status == "running"

    @property
    def replicas(self) -> int:
        """The discrete run's replicas (1: a single run)."""
        d = self.discrete
        return int(d.theta.shape[0]) if d is not None and d.theta.dim() == 2 else 1

    # ----------------------------------------------------------------- the steps
    def advance(self, k: int, record: bool) -> str | None:
        """Evaluate the discrete run at θ_k (while it runs); bring the followers to t_k when
        recording or when the discrete run has just stopped.  Returns why the discrete run stops
        at this step (None: it goes on, or had stopped)."""
        stop = None
        d = self.discrete
        if self.discrete_running:
            t0 = time.perf_counter()
            d.evaluate()
            self.wall_seconds += time.perf_counter() - t0
            if k % self.check_every == 0 or record:
                stop = self._check_discrete(k)
        if (record or stop) and self.followers:
            if self.discrete_running:  # (still so at the step where it stops)
                d.keep_grad()  # the followers evaluate the same problem: ĝ_k must survive them
            t = float(self.clock.times[k])
            for f in self.followers:
                f.advance_to(t)
        return stop

    def _check_discrete(self, k: int) -> str | None:
        """One synchronisation: is the discrete run's loss finite?  (A non-finite θ or momentum
        buffer makes the loss at the next evaluation non-finite.)  A single run that is not stops
        (the reason is returned); an ensemble's replicas stop one by one (``_fresh``) and the run
        only when every one has."""
        ok = torch.isfinite(self.discrete.loss)
        if bool(ok.all()):
            return None
        t = float(self.clock.times[k])
        if ok.dim() == 0:
            return f"diverged: non-finite loss at step {k} (t = {t:.6g})"
        for s in (~ok).nonzero().flatten().tolist():
            if s not in self.replica_stops:
                self.replica_stops[s] = ("non-finite loss", k, t)
                self._fresh.append(s)
        if len(self.replica_stops) == ok.numel():
            return f"diverged: non-finite loss in every replica, the last at step {k} (t = {t:.6g})"
        return None

    def _stop_fresh_replicas(self) -> None:
        """The replicas found non-finite at this step are NaN from here on (after their last row)."""
        d = self.discrete
        idx = torch.tensor(self._fresh, device=d.theta.device)
        with torch.no_grad():
            d.theta[idx] = math.nan
            if d.buf is not None:
                d.buf[idx] = math.nan
        self._fresh.clear()

    def points(self, k: int) -> list[Point]:
        """The running dynamics' states at t_k (the discrete run's while it runs, and at the step
        where it stops)."""
        t = float(self.clock.times[k])
        d = self.discrete
        out = []
        reference = None
        if d is not None:
            if self.discrete_running:
                reference = d.theta
                out.append(Point(d.label, 0, k, t, d.theta, d.loss, d.grad, d.buf, reference=d.theta))
            else:  # it has stopped: the flows that go on have no reference (distance NaN)
                if self._nan_reference is None:
                    self._nan_reference = torch.full_like(d.theta, math.nan)
                reference = self._nan_reference
        for i, f in enumerate(self.followers, start=self.offset):
            if f.status != "running":  # a stopped dynamics keeps its rows empty (NaN) from here on
                continue
            p = f.point(i, k, t)
            if reference is not None:
                p.reference = reference
            out.append(p)
        return out

    def _check_followers(self, k: int, points: Sequence[Point]) -> None:
        """A flow whose loss at this recording step is non-finite stops (after this row)."""
        t = float(self.clock.times[k])
        for p in points:
            if p.index < self.offset or p.loss is None or not isinstance(p.loss, torch.Tensor) or p.loss.dim() != 0:
                continue
            if not bool(torch.isfinite(p.loss)):
                self.followers[p.index - self.offset].status = f"diverged: non-finite loss at step {k} (t = {t:.6g})"

    def record(self, k: int, points: Sequence[Point]) -> None:
        rows = self.recording.rows
        rows.begin(k, float(self.clock.times[k]))
        for p in points:
            for r in self._hooks["record"]:
                r.record(rows, p)
        if rows.full:
            self.flush(rows)
            self._set_summary()
        elif self.recording.due():
            self.flush_all()

    def snapshot(self, k: int, points: Sequence[Point]) -> None:
        snaps = self.recording.snaps
        snaps.begin(k, float(self.clock.times[k]))
        for p in points:
            for r in self._hooks["snapshot"]:
                r.snapshot(snaps, p)
        if snaps.full:
            self.flush(snaps)

    def update(self, k: int) -> None:
        d = self.discrete
        if d is None:
            return
        info = self._info
        if info is None:
            info = self._info = StepInfo(0, 0.0, 0.0, d.theta, d.theta, d.theta, None)
        info.step, info.time, info.lr = k, float(self.clock.times[k]), float(d.lrs[k])
        info.grad, info.loss, info.batch = d.grad, d.loss, d.batch
        if self._hooks["before_update"]:
            info.theta, info.buf = d.theta, d.buf
            for r in self._hooks["before_update"]:
                r.before_update(info)
        t0 = time.perf_counter()
        d.update()
        self.wall_seconds += time.perf_counter() - t0
        if self._hooks["after_update"]:
            info.theta, info.buf = d.theta, d.buf
            for r in self._hooks["after_update"]:
                r.after_update(info)

    def flush(self, buffer: Rows) -> None:
        if buffer is self.recording.rows:
            self.recording.last_flush = time.monotonic()
        if buffer.n == 0:
            return
        if buffer is self.recording.rows:
            for r in self._hooks["before_flush"]:
                r.before_flush(buffer)
        arrays, steps, times = buffer.take()
        if self.recording.sink is not None:
            self.recording.sink.append(buffer.dim, arrays, steps, times)

    def flush_all(self) -> None:
        """Every buffered row and snapshot to the sink, with the statuses as they are now."""
        self.flush(self.recording.rows)
        self.flush(self.recording.snaps)
        self._set_summary()

    def statuses(self) -> list[str]:
        """Every dynamics' status now (in ``labels`` order; replicas that stopped included)."""
        d = self.discrete
        head = [with_replicas(self.status, self.replica_stops, self.replicas)] if d is not None else []
        return head + [with_replicas(f.status, getattr(f, "path_stops", None), int(getattr(f, "samples", 1)), "paths")
                       for f in self.followers]

    def summarise(self) -> Summary:
        d = self.discrete
        head = [d] if d is not None else []
        return Summary(
            labels=list(self.labels),
            status=self.statuses(),
            wall_seconds=([self.wall_seconds] if d is not None else []) + [f.wall_seconds for f in self.followers],
            n_grad_evals=[int(x.n_grad_evals) for x in head] + [int(f.n_grad_evals) for f in self.followers],
        )

    def _set_summary(self) -> None:
        if self.recording.sink is not None:
            self.recording.sink.set(self.summarise().arrays())

    def _running(self) -> bool:
        return self.discrete_running or any(f.status == "running" for f in self.followers)

    def _mark_running(self, status: str) -> None:
        if self.discrete_running:
            self.status = status
        for f in self.followers:
            if f.status == "running":
                f.status = status

    # --------------------------------------------------------------------- loop
    def safe_point(self, k_next: int, ri: int, si: int) -> None:
        """After update k_next − 1: every row so far is flushed, then a checkpoint is taken when one
        is due or a stop was requested; a requested stop then raises :class:`Interrupted`."""
        cp = self.checkpointer
        if self.stop_requested or (cp is not None and cp.due(k_next)):
            self.flush(self.recording.rows)
            self.flush(self.recording.snaps)
            self._set_summary()
            if cp is not None and cp.enabled:
                cp.save(self, k_next, ri, si)
        if self.stop_requested:
            raise Interrupted(k_next, cp is not None and cp.enabled)

    def run(self, start: int = 0, ri: int = 0, si: int = 0) -> Summary:
        """Advance, record, snapshot and update from k = ``start`` (0, or a checkpoint's next step
        with its record and snapshot positions ``ri``, ``si``) to K; flush and summarise at the end
        (also after an interruption or an error).  The loop ends early when no dynamics is left
        running."""
        clock = self.clock
        K, record, snap = clock.steps, clock.record, clock.snapshot
        try:
            for k in range(start, K + 1):
                self.k = k
                recording = ri < len(record) and k == record[ri]
                stop = self.advance(k, recording)
                if recording or stop:
                    points = self.points(k)
                    self.record(k, points)
                    if si < len(snap) and (k == snap[si] or stop):
                        self.snapshot(k, points)
                        si += 1 if k == snap[si] else 0
                    ri += 1 if recording else 0
                    if self.followers:
                        self._check_followers(k, points)
                if self._fresh:
                    self._stop_fresh_replicas()
                if stop:
                    self.status = stop
                    if not self.followers_outlive_discrete:
                        self._mark_running(f"stopped with sgd ({stop})")
                if k == K or not self._running():
                    break
                if self.discrete_running:
                    self.update(k)
                if self.progress is not None:
                    self.progress.update(k + 1, self)
                if self.checkpointer is not None or self.stop_requested:
                    self.safe_point(k + 1, ri, si)
            self._mark_running("ok")
        except KeyboardInterrupt:
            self._mark_running(f"interrupted at step {self.k}")
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self._mark_running(f"failed at step {self.k}: {type(exc).__name__}" + (f": {first}" if first else ""))
            raise
        finally:
            self.flush_all()
        return self.summarise()


class Interrupted(KeyboardInterrupt):
    """A run stopped at a safe point on request (Ctrl-C, SIGTERM): ``step`` is the next update,
    ``checkpointed`` whether a checkpoint was written there."""

    def __init__(self, step: int, checkpointed: bool):
        super().__init__(f"stopped before update {step}")
        self.step, self.checkpointed = step, checkpointed


def drive(followers: Sequence[Dynamics], times: Sequence[float], recorders: Sequence[Recorder],
          device: torch.device | None = None) -> Summary:
    """Advance ``followers`` alone (no discrete run) to each of ``times``, handing their points to
    ``recorders``."""
    dev = device or torch.device("cpu")
    return LockStep(Clock.at(times), None, followers, recorders, Recording.discard(len(followers), dev), device=dev).run()
