"""Running a study: the discrete run (and, with ``[[flows]]``, the continuous models in lock step
with it) recorded into one trajectory Dataset by the lock-step engine (:mod:`flowlab.engine`)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from . import __version__
from .build import Built, build
from .config import Study
from .engine import Clock, LockStep, Recording
from .errors import ConfigError, FlowlabError
from .parts import Contribution, Part, Setup
from .recording import Recorder, RunContext, Variable, core_recorders
from .seeds import derive_seed, seeded_globals
from .sgd import DiscreteSGD
from .store import STORE_NAME, TrajectoryWriter, attrs_json, open_result


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


#: the environment variable that sets the interval of the plain progress lines (seconds)
PROGRESS_ENV = "FLOWLAB_PROGRESS_SECONDS"
#: its default: one line every half minute in a log
PROGRESS_SECONDS = 30.0


def progress_seconds() -> float:
    """The interval of the plain progress lines: ``$FLOWLAB_PROGRESS_SECONDS``, else 30 s."""
    text = os.environ.get(PROGRESS_ENV)
    if text is None or not text.strip():
        return PROGRESS_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(PROGRESS_ENV, text, "expected a number of seconds > 0")
    return value


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """A run's progress on stderr: a rich bar on a terminal; elsewhere (a log file, ``nohup``, a
    batch job) one plain line every ``$FLOWLAB_PROGRESS_SECONDS`` (30 s) — step, t, loss, each
    dynamics' status, elapsed time and ETA — plus one at the start and one at the end.  Silent
    when ``enabled`` is False.  ``plain``: force (True) or refuse (False) the plain lines (None:
    plain when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool, label: str, *, plain: bool | None = None,
                 interval: float | None = None, stream: Any = None):
        self.enabled, self.total, self.label = enabled, total, label
        self.stream = stream if stream is not None else sys.stderr
        self.plain = (not _isatty(self.stream)) if plain is None else plain
        self.stride = max(1, total // 200)
        self.interval = interval if interval is not None else (progress_seconds() if enabled and self.plain else 0.0)
        self.start = time.monotonic()
        self.last_line = -math.inf
        self.engine: Any = None
        self.step = 0
        if enabled and not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                    transient=False, console=Console(file=self.stream))
            self.task = self.bar.add_task(label, total=total, loss="…")
            self.bar.start()

    def update(self, step: int, engine: Any) -> None:
        """Called by the engine after every step (``engine``: the :class:`~flowlab.engine.LockStep`)."""
        if not self.enabled:
            return
        self.engine, self.step = engine, step
        if self.plain:
            now = time.monotonic()
            if now - self.last_line >= self.interval:
                self.last_line = now
                self._line()
        elif step % self.stride == 0 or step == self.total:
            self.bar.update(self.task, completed=step, loss=self._loss(engine))

    @staticmethod
    def _loss(engine: Any) -> str:
        d = getattr(engine, "discrete", None)
        if d is None or d.loss is None:
            return "…"
        if engine.status not in ("running", "ok"):
            return f"{d.label} stopped"
        return f"{float(d.loss.mean()):.4g}"

    def _line(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.start
        step, total = self.step, self.total
        parts = [f"{self.label}: step {step}/{total} ({100.0 * step / max(total, 1):.0f}%)"]
        engine = self.engine
        if engine is not None:
            times = engine.clock.times
            parts.append(f"t = {float(times[min(step, len(times) - 1)]):.6g}")
            parts.append(f"loss {self._loss(engine)}")
            statuses = engine.statuses()
            parts.append(", ".join(f"{lab} {st if len(st) <= 80 else st[:77] + '...'}"
                                   for lab, st in zip(engine.labels, statuses)))
        parts.append(f"elapsed {_clock(elapsed)}")
        if not final and 0 < step < total:
            parts.append(f"ETA {_clock(elapsed * (total - step) / step)}")
        print("flowlab " + "; ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.plain:
            self._line(final=True)
        else:
            self.bar.stop()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Run:
    """One study run: build, record, stream to disk.  ``Run(study).execute()`` → Dataset.

    ``flows``: continuous models given as objects (:class:`flowlab.flows.Continuous`, or
    ``(flow, integrator)`` pairs) besides the study's ``[[flows]]``; ``recorders``: extra recorder
    instances; ``parts``: extra :class:`flowlab.Part` objects for this run (their sections must be
    known when the study is parsed: ``load_study(path, parts=...)``)."""

    def __init__(self, study: Study, out: str | Path | None = None, *, overwrite: bool = False,
                 progress: bool = False, recorders: Sequence[Recorder] = (), built: Built | None = None,
                 flows: Sequence[Any] = (), parts: Sequence[Part] = (), resume: bool = False):
        self.study = study
        self.resume = resume
        self.out = Path(out) if out is not None else default_out(study)
        self.overwrite = overwrite
        self.show_progress = progress
        self.parts = study.active_parts.with_parts(*parts)
        self.built = built or build(study)
        self.problem = self.built.problem
        self.extra_recorders = list(recorders)
        self.flows = tuple(flows)

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
            "tf32": int(bool(torch.backends.cuda.matmul.allow_tf32 and self.problem.device.type == "cuda")),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "device_name": (torch.cuda.get_device_name(self.problem.device) if self.problem.device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "n_examples": self.problem.n,
            "n_params": self.problem.dim,
            "chunk_size": int(self.problem.chunk_size),
            "chunk_size_rule": "auto (half the free memory)" if self.problem.chunk_auto else "study",
        }

    def _recorders(self, contribution: Contribution) -> list[Recorder]:
        return core_recorders(self.study) + contribution.recorders + self.extra_recorders

    # ------------------------------------------------------------------ run
    def execute(self) -> xr.Dataset:
        study, problem = self.study, self.problem
        opt, rec = study.optimizer, study.record
        if self.flows and "flows" not in self.parts:
            raise FlowlabError("flows given as objects need the flows part, which this flowlab does not have")
        if self.show_progress:
            progress_seconds()  # a bad $FLOWLAB_PROGRESS_SECONDS: one line before anything is written
        contribution = self.parts.contribute(Setup(study, self.built, self.flows))
        followers = contribution.dynamics
        from .stochastic.ensemble_config import ensemble_size

        samples = ensemble_size(study)
        if samples > 1:
            from .stochastic.ensemble import ReplicaSGD

            ens = study.sections["ensemble"]
            sgd = ReplicaSGD(problem, opt, self.built.lrs, study.study.seed, samples, ens.vectorise, ens.streams)
        else:
            sgd = DiscreteSGD(problem, opt, self.built.lrs, study.study.seed)
        labels = [sgd.label] + [f.label for f in followers]
        for label in labels[1:]:
            if label == sgd.label or labels.count(label) > 1:
                raise ConfigError("flows.label", label, "labels must be unique and not 'sgd' (give each flow a label)")
        clock = Clock.of_run(self.built.lrs, rec.every, rec.snapshot_every)
        ctx = RunContext(study, problem, labels, opt.steps, clock.record, clock.times[clock.record], clock.snapshot,
                         self.built.lrs, samples)
        recorders = self._recorders(contribution)
        self._seeds = run_seeds(study, sgd, followers, recorders)
        variables: list[Variable] = []
        for r in recorders:
            variables += r.variables(ctx)
        names = [v.name for v in variables]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise FlowlabError(f"two recorders declare the same variable(s): {', '.join(sorted(dupes))}")
        for r in recorders:
            r.start(ctx)

        from .checkpoint import NAME, Checkpointer, check_study, checkpoint_section, read

        ckpt_path = self.out / NAME
        payload = None
        if self.resume:
            payload = read(ckpt_path)
            check_study(ckpt_path, payload, study.to_dict())
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FlowlabError(f"--out {self.out}: cannot create the output folder ({exc.strerror or exc})") from None
        attrs = self._attrs()
        attrs["seeds"] = json.dumps(self._seeds)
        attrs["seeds_note"] = SEEDS_NOTE
        attrs["ensemble_size"] = samples
        if payload is not None:
            writer = TrajectoryWriter.reopen(self.out / STORE_NAME, variables, labels, payload["store"])
        else:
            writer = TrajectoryWriter(self.out / STORE_NAME, variables, labels, attrs, rec.chunk, self.overwrite)
            (self.out / "study.json").write_text(json.dumps(study.to_dict(), indent=2) + "\n")
        recording = Recording(variables, len(labels), rec.chunk, problem.device,
                              problem.dim * problem.theta0.element_size(), sink=writer,
                              flush_seconds=rec.flush_seconds)
        bar = Progress(opt.steps, self.show_progress, study.name)
        engine = LockStep(clock, sgd, followers, recorders, recording, progress=bar, device=problem.device)
        cp = Checkpointer(ckpt_path, checkpoint_section(study), study.to_dict(), discrete=sgd, followers=followers,
                          recorders=[r for r in recorders if not any(r is x for x in self.extra_recorders)],
                          problem=problem, writer=writer)
        engine.checkpointer = cp
        start = cp.restore(engine, payload) if payload is not None else (0, 0, 0)
        self.engine = engine
        try:
            with _stop_on_signals(engine), seeded_globals(self._seeds["global"], problem.device):
                if payload is not None:  # the global generators as they were at the checkpoint
                    cp.restore_globals(payload)
                engine.run(*start)
            cp.remove()
        finally:
            bar.close()
            writer.close()
            summary = engine.summarise().by_label()
            try:
                (self.out / "summary.json").write_text(json.dumps({
                    "study": study.name, "out": str(self.out), "dynamics": labels, **summary,
                    "regenerate": f"flowlab run {study.source or '<study>'} --out {self.out}",
                }, indent=2) + "\n")
            except OSError:
                pass  # disk full: the store's error says so; the summary is a convenience
        return open_result(self.out)


class _stop_on_signals:
    """Inside, SIGTERM and a first Ctrl-C ask the engine to stop at its next safe point (after a
    checkpoint); a second Ctrl-C stops at once.  Only in the main thread (elsewhere: nothing)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.saved: dict = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.engine.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.engine.stop_requested = True
        print(f"flowlab: {signal.Signals(signum).name}: stopping after this update (a checkpoint is written "
              "first; Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self.saved[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, old in self.saved.items():
            signal.signal(sig, old)
        return False


SEEDS_NOTE = ("every seed of the run, from study.seed (flowlab.seeds): study; model_init and data (the global "
              "generators while the model and the data are built); data_subset (the data builder's own seed option); "
              "global (the global generators during the run: a model's random layers); sgd (the batch order of each "
              "replica; sgd_streams how they are drawn); each stochastic flow's label (its Brownian path / batches); "
              "LABEL.seed (a flow's own seed option); projections, noise_split (recorders' generators)")


def run_seeds(study: Study, sgd: Any, followers: Sequence[Any], recorders: Sequence[Recorder]) -> dict[str, Any]:
    """Every seed a run uses, by name (the Dataset's ``seeds`` attribute; :data:`SEEDS_NOTE`)."""
    import inspect

    seed = study.study.seed
    out: dict[str, Any] = {"study": seed, "model_init": seed, "data": seed}
    try:
        fn = study.registry("datasets").resolve(study.data.name, "data.name")
        param = inspect.signature(fn).parameters.get("seed")
    except (FlowlabError, TypeError, ValueError):
        param = None
    if "seed" in study.data.options:
        out["data_subset"] = study.data.options["seed"]
    elif param is not None and param.default is not inspect.Parameter.empty:
        out["data_subset"] = param.default
    out["global"] = derive_seed(seed, "global")
    out["sgd"] = list(getattr(sgd, "seeds", [seed]))
    out["sgd_streams"] = getattr(sgd, "streams", "single")
    for f in followers:
        if getattr(f, "seed", None) is not None:
            out[f.label] = f.seed
        options = f.flow.options() if hasattr(getattr(f, "flow", None), "options") else {}
        if isinstance(options, dict) and isinstance(options.get("seed"), int):
            out[f"{f.label}.seed"] = options["seed"]
    for r in recorders:
        seeds = getattr(r, "seeds", None)
        if callable(seeds):
            out.update(seeds())
    return out


def run(study: Study | str | Path, out: str | Path | None = None, *, overwrite: bool = False,
        progress: bool = False, recorders: Sequence[Recorder] = (), overrides: Sequence[str] = (),
        flows: Sequence[Any] = (), parts: Sequence[Part] = (), resume: bool = False) -> xr.Dataset:
    """Run a study (a :class:`Study` or the path of its TOML file); return its Dataset.

    ``flows``: continuous models as objects, besides the study's ``[[flows]]``
    (``flowlab.flows.Continuous(GradientFlow(), integrator("torchdiffeq:dopri5", rtol=1e-8))`` or a
    ``(flow, integrator)`` pair); ``recorders``: extra :class:`Recorder` instances; ``parts``: extra
    :class:`Part` objects."""
    from .config import load_study

    if not isinstance(study, Study):
        study = load_study(study, overrides)
    elif overrides:
        study = study.with_overrides(overrides)
    return Run(study, out, overwrite=overwrite, progress=progress, recorders=recorders, flows=flows,
               parts=parts, resume=resume).execute()
