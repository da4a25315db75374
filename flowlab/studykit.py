"""What every study script in ``studies/`` shares, and the runner behind ``make studies``.

A study script calls :func:`main` with its name and a body ``body(ctx: StudyContext)``::

    # studies/my_study.py
    from flowlab import studykit

    def body(ctx):
        study = ctx.load("my_study.toml", smoke=["optimizer.steps=20"])
        ds = ctx.run(study, "a")
        ctx.save_dataset(small, "data.nc")
        ctx.savefig(fig, "figure.png")
        ctx.write_summary("Title", found="One sentence a reader can check against the table.", body=[...])

    if __name__ == "__main__":
        studykit.main("my_study", body)

and gets one command line::

    python studies/my_study.py                 # results/my_study/ (runs under runs/my_study/)
    python studies/my_study.py --smoke         # a few steps, for the test suite (results in --results)
    python studies/my_study.py --results DIR --runs DIR

``python -m flowlab.studykit [--jobs 2] [--only NAME ...] [--smoke]`` finds every such script (a file
in ``studies/`` that calls ``studykit.main(``), runs each in its own process, ``--jobs`` at a time, and
writes ``results/STUDIES.md`` with each study's wall time and exit status (``make studies``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARK = "studykit.main("
MAX_FILE_BYTES = 3 * 2**20  # nothing under results/ larger than this


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@dataclass
class StudyContext:
    """Where a study writes, whether it is a smoke run, and the command that regenerates it."""

    name: str
    smoke: bool
    results: Path
    runs: Path
    command: str
    studies: Path
    started: float = field(default_factory=time.perf_counter)
    files: list[str] = field(default_factory=list)

    # --- studies and runs -------------------------------------------------------------------------
    def load(self, toml: str | Path, sets: Sequence[str] = (), smoke: Sequence[str] = ()):
        """``flowlab.load_study(studies/TOML, sets (+ smoke when --smoke))``."""
        import flowlab

        path = Path(toml)
        if not path.is_absolute():
            path = self.studies / path
        return flowlab.load_study(path, list(sets) + (list(smoke) if self.smoke else []))

    def parse(self, raw: dict, smoke: Sequence[str] = ()):
        """``flowlab.parse_study(raw)`` with the smoke overrides applied when --smoke."""
        import flowlab

        study = flowlab.parse_study(raw)
        return study.with_overrides(list(smoke)) if self.smoke and smoke else study

    def run(self, study, tag: str, **kwargs: Any):
        """Run ``study`` into ``runs/NAME/TAG`` (overwriting) and return its loaded Dataset."""
        import flowlab

        out = self.runs / tag
        ds = flowlab.run(study, out, overwrite=True, progress=False, **kwargs)
        return ds.load()

    # --- outputs --------------------------------------------------------------------------------
    def _target(self, filename: str) -> Path:
        self.results.mkdir(parents=True, exist_ok=True)
        if filename not in self.files:
            self.files.append(filename)
        return self.results / filename

    def save_dataset(self, ds, filename: str = "data.nc") -> Path:
        """Write ``ds`` as compressed netCDF-4 (h5netcdf); refuse a file over 3 MB (results stay small)."""
        import numpy as np

        path = self._target(filename)
        ds = ds.copy()
        for k, v in list(ds.attrs.items()):  # netCDF attributes: str / numbers only
            if isinstance(v, (dict, list, tuple)) or v is None or isinstance(v, bool):
                ds.attrs[k] = json.dumps(v, default=str)
        encoding = {n: {"zlib": True, "complevel": 4} for n, v in ds.data_vars.items()
                    if v.dtype.kind == "f" and v.size > 0}
        for n, v in ds.variables.items():
            if v.dtype.kind == "O":
                ds[n] = v.astype(str)
            elif v.dtype == np.bool_:
                ds[n] = v.astype(np.int8)
        ds.to_netcdf(path, engine="h5netcdf", encoding=encoding)
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RuntimeError(f"{path}: {size / 2**20:.1f} MB, over the {MAX_FILE_BYTES / 2**20:.0f} MB a result "
                               "file may have (keep fewer variables or rows)")
        return path

    def savefig(self, fig, filename: str, dpi: int = 110) -> Path:
        import matplotlib.pyplot as plt

        path = self._target(filename)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path

    def write_json(self, obj: Any, filename: str = "summary.json") -> Path:
        path = self._target(filename)
        path.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
        return path

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write_summary(self, title: str, found: str | Iterable[str], body: Iterable[str]) -> Path:
        """``summary.md``: the title, the command that regenerates it (and how long it took), what the
        study found (sentences a reader can check against the tables), then ``body`` (markdown lines)."""
        found = [found] if isinstance(found, str) else list(found)
        lines = [f"# {title}", ""]
        if self.smoke:
            lines += ["**Smoke run (a few steps): not a result.**", ""]
        lines += [f"Regenerate: `{self.command}` — {self.elapsed():.0f} s on {_machine()}, "
                  f"{_dt.date.today().isoformat()}.", "", "**Found.** " + " ".join(found), "", *body]
        others = [f for f in self.files if f != "summary.md"]
        if others:
            lines += ["", "Files: " + ", ".join(f"[`{f}`]({f})" for f in others) + "."]
        path = self._target("summary.md")
        path.write_text("\n".join(lines).rstrip() + "\n")
        return path


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores"


def figure_style() -> None:
    """Matplotlib without a display, readable defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
                         "axes.titlesize": 10, "axes.labelsize": 9})


def main(name: str, body: Callable[[StudyContext], Any], argv: Sequence[str] | None = None) -> int:
    """The command line of one study script (see the module docstring); returns the exit code."""
    ap = argparse.ArgumentParser(prog=f"studies/{name}.py", description=f"Run the study {name!r} and write "
                                 f"results/{name}/.")
    ap.add_argument("--smoke", action="store_true", help="a few steps (the test suite runs this)")
    ap.add_argument("--results", default=None, help=f"where the results go (default results/{name})")
    ap.add_argument("--runs", default=None, help=f"where the runs go (default runs/{name})")
    args = ap.parse_args(argv)
    root = repo_root()
    results = Path(args.results) if args.results else root / "results" / name
    runs = Path(args.runs) if args.runs else root / "runs" / name
    command = f"python studies/{name}.py" + (" --smoke" if args.smoke else "")
    if (results / "summary.md").is_file():  # a study's earlier results: regenerate from scratch
        import shutil

        shutil.rmtree(results)
    import torch

    torch.set_num_threads(1)
    figure_style()
    ctx = StudyContext(name=name, smoke=args.smoke, results=results, runs=runs, command=command,
                       studies=root / "studies")
    rc = int(body(ctx) or 0)  # a body may return a nonzero code (a bound it checks was missed)
    summary = results / "summary.md"
    if summary.exists():
        print(summary.read_text())
    big = [p for p in results.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES]
    if big:
        print(f"{name}: files over 3 MB: {', '.join(map(str, big))}", file=sys.stderr)
        return 1
    return rc


# --- make studies -------------------------------------------------------------------------------------
def discover(studies: Path) -> list[str]:
    """The study scripts in ``studies`` (files that call ``studykit.main(``), by name."""
    return sorted(p.stem for p in studies.glob("*.py") if not p.name.startswith("_") and MARK in p.read_text())


def longest_first(names: list[str], table: Path) -> list[str]:
    """``names`` ordered by the wall seconds of the last ``make studies`` (``table``), longest first, so
    that two at a time finish together; studies not in it go first (their time is unknown)."""
    import re

    seconds = {}
    if table.is_file():
        for m in re.finditer(r"^\| (\w+) \| (\d+) \|", table.read_text(), re.M):
            seconds[m.group(1)] = int(m.group(2))
    return sorted(names, key=lambda n: -seconds.get(n, 10**9))


def run_all(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowlab.studykit", description="Run every study in studies/ "
                                 "and write results/STUDIES.md (make studies).")
    ap.add_argument("--jobs", type=int, default=2, help="studies run at once (default 2)")
    ap.add_argument("--only", nargs="*", default=None, help="these studies only")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--studies", default=None, help="the folder of study scripts (default: the repo's)")
    args = ap.parse_args(argv)
    root = repo_root()
    studies = Path(args.studies) if args.studies else root / "studies"
    names = discover(studies)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"--only: unknown stud{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
                  f"(known: {', '.join(names)})", file=sys.stderr)
            return 2
        names = [n for n in names if n in args.only]
    names = longest_first(names, root / "results" / "STUDIES.md")
    logs = root / "runs" / "studies_logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "FLOWLAB_PROGRESS_SECONDS": "60"}
    pending, running, done = list(names), {}, {}
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name = pending.pop(0)
            cmd = [sys.executable, str(studies / f"{name}.py")] + (["--smoke"] if args.smoke else [])
            log = open(logs / f"{name}.log", "w")
            print(f"[{time.perf_counter() - t0:6.0f} s] start {name}", flush=True)
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root),
                             time.perf_counter(), log)
        time.sleep(0.5)
        for name, (proc, start, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                done[name] = (proc.returncode, time.perf_counter() - start)
                del running[name]
                print(f"[{time.perf_counter() - t0:6.0f} s] {name}: exit {proc.returncode} after "
                      f"{done[name][1]:.0f} s (log: {logs / (name + '.log')})", flush=True)
    total = time.perf_counter() - t0
    lines = ["# Studies: how long `make studies` took", "",
             f"`python -m flowlab.studykit --jobs {args.jobs}`" + (" --smoke" if args.smoke else "")
             + f" on {_machine()}, {_dt.date.today().isoformat()}: **{total / 60:.1f} min** in all.", "",
             "| study | wall seconds | exit | summary |", "|---|---|---|---|"]
    for name in sorted(names):
        rc, sec = done[name]
        lines.append(f"| {name} | {sec:.0f} | {rc} | [results/{name}/summary.md]({name}/summary.md) |")
    if not args.smoke and not args.only:
        (root / "results" / "STUDIES.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(rc == 0 for rc, _ in done.values()) else 1


if __name__ == "__main__":
    sys.exit(run_all())

__all__ = ["StudyContext", "discover", "figure_style", "main", "repo_root", "run_all"]
