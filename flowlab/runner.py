"""Running a study: the discrete run (and, with ``[[flows]]``, the continuous models in lock step
with it) recorded into one trajectory Dataset."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import xarray as xr

from . import __version__
from .build import Built, build
from .config import Study
from .errors import FlowlabError
from .plugins import load_plugins
from .recording import RECORDER_FACTORIES, Point, Recorder, Rows, RunContext, StepInfo, Variable, core_recorders
from .sgd import DiscreteSGD
from .store import STORE_NAME, TrajectoryWriter, attrs_json, open_result


class Follower(Protocol):
    """A method that runs in lock step with the discrete run (a flow, from issue 4 on)."""

    label: str
    status: str
    wall_seconds: float
    n_grad_evals: int

    def advance_to(self, time: float) -> None: ...

    def point(self, index: int, step: int, time: float) -> Point: ...


# Set by the flows plugin: built -> list[Follower], one per [[flows]] entry.
FOLLOWER_FACTORY = None


def set_follower_factory(factory) -> None:
    global FOLLOWER_FACTORY
    FOLLOWER_FACTORY = factory


@dataclass
class RunResult:
    out: Path
    dataset: xr.Dataset
    statuses: dict[str, str] = field(default_factory=dict)


def record_grid(steps: int, every: int) -> np.ndarray:
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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "flowlab": __version__}
    for pkg in ("torch", "numpy", "xarray", "zarr", "torchdiffeq", "jax", "diffrax", "equinox", "h5netcdf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--verify", "-q", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        sha = head.stdout.strip() if head.returncode == 0 else ""
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def default_out(study: Study) -> Path:
    return Path(study.study.out) if study.study.out else Path("runs") / study.name


class Progress:
    """A rich progress bar on stderr (silent when ``enabled`` is False)."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.enabled, self.total = enabled, total
        self.stride = max(1, total // 200)
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                    transient=False)
            self.task = self.bar.add_task(label, total=total, loss="…")
            self.bar.start()

    def update(self, step: int, loss: torch.Tensor | None) -> None:
        if self.enabled and (step % self.stride == 0 or step == self.total):
            self.bar.update(self.task, completed=step, loss=f"{float(loss):.4g}" if loss is not None else "…")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


class Run:
    """One study run: build, record, stream to disk.  ``Run(study).execute()`` → Dataset."""

    def __init__(self, study: Study, out: str | Path | None = None, *, overwrite: bool = False,
                 progress: bool = False, recorders: Sequence[Recorder] = (), built: Built | None = None):
        self.study = study
        self.out = Path(out) if out is not None else default_out(study)
        self.overwrite = overwrite
        self.show_progress = progress
        load_plugins()
        self.built = built or build(study)
        self.problem = self.built.problem
        self.extra_recorders = list(recorders)

    # ---------------------------------------------------------------- set-up
    def _followers(self) -> list[Follower]:
        if not self.study.flows:
            return []
        if FOLLOWER_FACTORY is None:
            raise FlowlabError("[[flows]] needs the flows module, which this flowlab does not have yet")
        return FOLLOWER_FACTORY(self.built)

    def _attrs(self) -> dict[str, Any]:
        return {
            "study": self.study.to_json(),
            "study_name": self.study.name,
            "flowlab_version": __version__,
            "versions": attrs_json(versions()),
            "git_commit": git_commit(),
            "param_layout": self.problem.layout.to_json(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": str(self.problem.device),
            "dtype": str(self.problem.dtype).replace("torch.", ""),
            "n_examples": self.problem.n,
            "n_params": self.problem.dim,
        }

    # ------------------------------------------------------------------ run
    def execute(self) -> xr.Dataset:
        study, problem = self.study, self.problem
        opt, rec = study.optimizer, study.record
        sgd = DiscreteSGD(problem, opt, self.built.lrs, study.study.seed)
        followers = self._followers()
        methods = ["sgd"] + [f.label for f in followers]
        record_steps = record_grid(opt.steps, rec.every)
        times = sgd.times
        snap_steps = snapshot_grid(record_steps, rec.snapshot_every)
        ctx = RunContext(study, problem, methods, opt.steps, record_steps, times[record_steps], snap_steps,
                         self.built.lrs, extras={"followers": followers, "sgd": sgd})
        recorders = core_recorders(study)
        for factory in RECORDER_FACTORIES:
            recorders += factory(ctx)
        recorders += self.extra_recorders
        variables: list[Variable] = []
        for r in recorders:
            variables += r.variables(ctx)
        names = [v.name for v in variables]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise FlowlabError(f"two recorders declare the same variable(s): {', '.join(sorted(dupes))}")
        for r in recorders:
            r.start(ctx)

        self.out.mkdir(parents=True, exist_ok=True)
        writer = TrajectoryWriter(self.out / STORE_NAME, variables, methods, self._attrs(), rec.chunk, self.overwrite)
        (self.out / "study.json").write_text(json.dumps(study.to_dict(), indent=2) + "\n")
        time_vars = [v for v in variables if v.grows_along == "time"]
        snap_vars = [v for v in variables if v.grows_along == "snapshot"]
        rows = Rows("time", time_vars, len(methods), rec.chunk, problem.device)
        snap_cap = max(1, min(16, (64 << 20) // max(1, len(methods) * problem.dim * problem.theta0.element_size())))
        snaps = Rows("snapshot", snap_vars, len(methods), snap_cap, problem.device)
        before = [r for r in recorders if r.overrides("before_update")]
        after = [r for r in recorders if r.overrides("after_update")]
        recording = [r for r in recorders if r.overrides("record")]
        snapping = [r for r in recorders if r.overrides("snapshot")]
        flushing = [r for r in recorders if r.overrides("before_flush")]

        def flush(buffer: Rows) -> None:
            if buffer.n == 0:
                return
            if buffer is rows:
                for r in flushing:
                    r.before_flush(rows)
            arrays, steps_, times_ = buffer.take()
            writer.append(buffer.dim, arrays, steps_, times_)

        def summary() -> dict[str, np.ndarray]:
            return {
                "status": np.array([sgd_status] + [f.status for f in followers], dtype=object),
                "wall_seconds": np.array([sgd_wall] + [f.wall_seconds for f in followers]),
                "n_grad_evals": np.array([sgd.n_grad_evals] + [f.n_grad_evals for f in followers], dtype=np.int64),
            }

        sgd_status, sgd_wall = "running", 0.0
        info = StepInfo(0, 0.0, 0.0, sgd.theta, sgd.theta, sgd.theta, None)
        bar = Progress(opt.steps, self.show_progress, study.name)
        ri, si, K = 0, 0, opt.steps
        check_every = 1 if problem.device.type == "cpu" else 64
        try:
            for k in range(K + 1):
                t0 = time.perf_counter()
                sgd.evaluate()
                sgd_wall += time.perf_counter() - t0
                diverged = (k % check_every == 0 or k == record_steps[ri]) and not bool(torch.isfinite(sgd.loss))
                if k == record_steps[ri] or diverged:
                    if followers:
                        sgd.keep_grad()
                        for f in followers:
                            f.advance_to(float(times[k]))
                    rows.begin(k, float(times[k]))
                    points = [Point("sgd", 0, k, float(times[k]), sgd.theta, sgd.loss, sgd.grad, sgd.buf,
                                    reference=sgd.theta)]
                    for i, f in enumerate(followers, start=1):
                        if f.status != "running":  # a stopped flow keeps its rows empty (NaN) from here on
                            continue
                        p = f.point(i, k, float(times[k]))
                        p.reference = sgd.theta
                        points.append(p)
                    for p in points:
                        for r in recording:
                            r.record(rows, p)
                    if si < len(snap_steps) and (k == snap_steps[si] or diverged):
                        snaps.begin(k, float(times[k]))
                        for p in points:
                            for r in snapping:
                                r.snapshot(snaps, p)
                        si += 1 if k == snap_steps[si] else 0
                        if snaps.full:
                            flush(snaps)
                    if rows.full:
                        flush(rows)
                        writer.set(summary())
                    ri += 1 if k == record_steps[ri] else 0
                if diverged:
                    sgd_status = f"diverged: non-finite loss at step {k}"
                    break
                if k == K:
                    break
                info.step, info.time, info.lr = k, float(times[k]), float(self.built.lrs[k])
                info.grad, info.loss, info.batch = sgd.grad, sgd.loss, sgd.batch
                if before:
                    info.theta, info.buf = sgd.theta, sgd.buf
                    for r in before:
                        r.before_update(info)
                t0 = time.perf_counter()
                sgd.update()
                sgd_wall += time.perf_counter() - t0
                if after:
                    info.theta, info.buf = sgd.theta, sgd.buf
                    for r in after:
                        r.after_update(info)
                bar.update(k + 1, sgd.loss)
            else:  # pragma: no cover - the loop always breaks
                pass
            if sgd_status == "running":
                sgd_status = "ok"
        except KeyboardInterrupt:
            sgd_status = f"interrupted at step {sgd.step}"
            for f in followers:
                if f.status == "running":
                    f.status = sgd_status
            raise
        finally:
            bar.close()
            for f in followers:
                if f.status == "running":
                    f.status = "ok" if sgd_status == "ok" else f"stopped with sgd ({sgd_status})"
            flush(rows)
            flush(snaps)
            writer.set(summary())
            writer.close()
            (self.out / "summary.json").write_text(json.dumps({
                "study": study.name, "out": str(self.out), "methods": methods,
                "status": dict(zip(methods, summary()["status"].tolist())),
                "wall_seconds": dict(zip(methods, summary()["wall_seconds"].tolist())),
                "n_grad_evals": dict(zip(methods, summary()["n_grad_evals"].tolist())),
                "regenerate": f"flowlab run {study.source or '<study>'} --out {self.out}",
            }, indent=2) + "\n")
        return open_result(self.out)


def run(study: Study | str | Path, out: str | Path | None = None, *, overwrite: bool = False,
        progress: bool = False, recorders: Sequence[Recorder] = (), overrides: Sequence[str] = ()) -> xr.Dataset:
    """Run a study (a :class:`Study` or the path of its TOML file); return its Dataset."""
    from .config import load_study

    if not isinstance(study, Study):
        study = load_study(study, overrides)
    elif overrides:
        study = study.with_overrides(overrides)
    return Run(study, out, overwrite=overwrite, progress=progress, recorders=recorders).execute()
