"""The ``flowlab`` command line.

Bad input — a study key, a command-line argument, a file the user hands over — prints ONE line
(``flowlab: error: FIELD = VALUE: what is allowed``) and exits with status 2; so does a file or
folder that cannot be read or written (the path and the system's reason).  Anything else is a bug:
one line saying so, the traceback written to a file the line names, status 1.  ``flowlab --debug``
raises instead, with the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import FlowlabError, one_line
from .parts import Command, Parts, default_parts

EXIT_BAD_INPUT = 2
#: a bug (an exception that is not bad input): the status an uncaught exception gives
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own code too)
        self.exit(EXIT_BAD_INPUT, f"flowlab: error: {one_line(message)} (see {self.prog} --help)\n")


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_study
    from .preflight import check_output, preflight
    from .runner import Run, default_out

    study = load_study(args.study, args.set or (), args.parts)
    out = Path(args.out) if args.out else default_out(study)
    if args.resume and args.overwrite:
        print("flowlab: error: --resume continues the run in the output folder, --overwrite replaces it: "
              "give one", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.resume:
        out = check_output(out, args.overwrite)
    if args.check:
        print(preflight(study, out, overwrite=args.overwrite).summary())
        return 0
    runner = Run(study, out, overwrite=args.overwrite, progress=not args.quiet, resume=args.resume)
    try:
        ds = runner.execute()
    except KeyboardInterrupt as exc:
        step = getattr(exc, "step", None)
        again = " ".join(["flowlab run", args.study, "--out", str(out), *[f"--set {s}" for s in (args.set or [])],
                          "--resume"])
        if getattr(exc, "checkpointed", False):
            print(f"flowlab: stopped before update {step}; rows so far and a checkpoint are in {out}.\n"
                  f"Resume with: {again}", file=sys.stderr)
        else:
            print(f"flowlab: interrupted; what was recorded is kept in {out}"
                  + (f" (resume from the last checkpoint, if any: {again})" if (out / "checkpoint.pt").exists() else ""),
                  file=sys.stderr)
        return 130
    _print_summary(ds, out)
    return 0


def _print_summary(ds, out: Path) -> None:
    console = _console()
    _summary_table(ds, console)
    console.print(f"written to {out}/trajectory.zarr  (open with flowlab.open_result({str(out)!r}))", soft_wrap=True)


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)  # logs and pipes: no truncated labels


def _summary_table(ds, console) -> None:
    from rich.table import Table

    t_end = float(ds.time[-1]) if ds.sizes.get("time", 0) else 0.0
    table = Table(title=f"{ds.attrs.get('study_name', '')}: {ds.sizes.get('time', 0)} records, t = {t_end:.4g}")
    for col in ("dynamics", "status", "final loss", "max distance", "grad evals", "wall s"):
        table.add_column(col, justify="left" if col in ("dynamics", "status") else "right")
    for i, m in enumerate(ds.dynamics.values):
        loss = ds.loss.isel(dynamics=i).values
        dist = ds.distance.isel(dynamics=i).values
        finite = loss[~_isnan(loss)]
        table.add_row(str(m), str(ds.status.values[i]), f"{finite[-1]:.4g}" if finite.size else "–",
                      f"{_nanmax(dist):.3g}", str(int(ds.n_grad_evals.values[i])), f"{float(ds.wall_seconds.values[i]):.2f}")
    console.print(table)


def _isnan(a):
    import numpy as np

    return np.isnan(a)


def _nanmax(a) -> float:
    import numpy as np

    return float(np.nanmax(a)) if np.isfinite(a).any() else float("nan")


def _cmd_list(args: argparse.Namespace) -> int:
    for title, reg in args.parts.registries.items():
        print(f"{title}:")
        for name in reg:
            print(f"  {name:<24} {reg.doc(name)}")
    print("parts: " + ", ".join(p.name for p in args.parts))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .store import export_netcdf

    if not args.netcdf:
        raise FlowlabError("export: give --netcdf FILE")
    path = export_netcdf(args.result, args.netcdf)
    print(f"wrote {path}")
    return 0


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study's TOML file")
    p.add_argument("--out", help="output folder (default: [study] out, else runs/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a study key, e.g. optimizer.lr=0.1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (same study; [checkpoint] sets how often)")
    p.add_argument("--check", action="store_true", help="check the study without running it: build the data, model "
                   "and loss, set up every flow and part, check the output folder; write nothing (exit 0 if fine)")


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="a run's output folder")
    p.add_argument("--netcdf", metavar="FILE", help="write the Dataset to this netCDF file")


def _configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="a run's output folder (or its .zarr / netCDF file)")
    p.add_argument("--by-layer", action="store_true", help="one row per layer")
    p.add_argument("--no-figures", action="store_true", help="only the tables")


def _cmd_report(args: argparse.Namespace) -> int:
    """The run's summary, then what each part reports about it (drift, theory, ...)."""
    from .parts import ReportRequest
    from .store import open_result

    ds = open_result(args.result, load=True)
    console = _console()
    if "sweep_status" in ds:  # a sweep folder: one row per point and the figure of merit against each axis
        from .sweep.report import report_sweep

        request = ReportRequest(Path(args.result), ds, by_layer=args.by_layer, figures=not args.no_figures,
                                console=console)
        for p in report_sweep(request):
            console.print(f"wrote {p}", highlight=False)
        return 0
    ensemble = None
    if "sample" in ds.dims:  # an ensemble: the per-run tables show the mean over replicas
        ensemble, ds = ds, ds.mean("sample", keep_attrs=True)
        console.print(f"ensemble of {ensemble.sizes['sample']} replicas: the tables show means over the replicas; "
                      "the ensemble table gives mean ± standard error", highlight=False)
    if not _report_partial(ds, console):
        return 0
    request = ReportRequest(Path(args.result), ds, by_layer=args.by_layer, figures=not args.no_figures,
                            console=console, ensemble=ensemble)
    paths: list = []
    for part in args.parts:
        if part.report is not None:
            paths += part.report(request)
    for p in paths:
        console.print(f"wrote {p}", highlight=False)
    return 0


def _report_partial(ds, console) -> bool:
    """Say what a partial result is (a run still going, or stopped; a store cut to its whole rows);
    with no rows yet, print the summary and return False: nothing more to report."""
    if "store_repaired" in ds.attrs:
        console.print(f"note: {ds.attrs['store_repaired']}", highlight=False)
    running = sum(str(s) == "running" for s in ds.status.values.ravel())
    if running:
        console.print(f"partial result: {running} dynamics still 'running' (the run is going on, or was stopped); "
                      f"reporting the {ds.sizes.get('time', 0)} records written so far", highlight=False)
    if ds.sizes.get("time", 0) == 0:
        _summary_table(ds, console)
        console.print("no records yet: nothing more to report", highlight=False)
        return False
    return True


def report_summary(request) -> list:
    """The core part of ``flowlab report``: status, final loss, distance from sgd per dynamics, and
    ``loss.png`` (:func:`flowlab.figures.loss_figure`)."""
    _summary_table(request.dataset, request.console)
    if not request.figures:
        return []
    from .figures import loss_figure

    path = loss_figure(request.ensemble if request.ensemble is not None else request.dataset, request.folder)
    return [path] if path is not None else []


RUN = Command("run", "run a study: SGD (and its flows), recorded into OUT/trajectory.zarr", _configure_run, _cmd_run)
LIST = Command("list", "list the registered models, datasets, losses, schedules, flows, integrators and parts",
               lambda p: None, _cmd_list)
EXPORT = Command("export", "export a result to netCDF", _configure_export, _cmd_export)
def _configure_bench(p: argparse.ArgumentParser) -> None:
    from .bench.all import SECTIONS

    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--out", default="results/bench/bench.md", help="the table's file (default results/bench/bench.md)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.all import main as bench_main

    argv = ["--out", args.out] + (["--only", args.only] if args.only is not None else [])
    return bench_main(argv)


BENCH = Command("bench", "every performance figure as a ratio against the raw baseline, with its target "
                "(writes results/bench/bench.md)", _configure_bench, _cmd_bench)
REPORT = Command("report", "report a result: per dynamics its status and loss, its drift from each conservation "
                 "law per symmetry kind (× layer), the theory's error, with figures", _configure_report, _cmd_report)


def make_parser(parts: Parts) -> argparse.ArgumentParser:
    """The ``flowlab`` parser with one sub-command per command of ``parts``."""
    parser = _Parser(prog="flowlab", description="Discrete SGD and continuous models of SGD on the same network.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = {}
    for name, cmd in parts.commands.items():
        p = parser.commands[name] = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
    return parser


def main(argv: Sequence[str] | None = None, parts: Parts | None = None) -> int:
    """``flowlab ...``: the commands of ``parts`` (default: this installation's parts).  Handlers
    find the parts in ``args.parts``."""
    debug = "--debug" in (sys.argv[1:] if argv is None else list(argv))
    try:
        parts = parts if parts is not None else default_parts()
    except FlowlabError as exc:  # a broken third-party part: one line
        if debug:
            raise
        _say(f"flowlab: error: {exc}")
        return EXIT_BAD_INPUT
    if not debug:  # zarr's event loop, left with pending reads by a damaged store, logs them at exit
        import logging
        import warnings

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        # ... and may leave a coroutine unawaited, which Python reports while the process exits
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
    parser = make_parser(parts)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # after the command: its parser reports them, so the hint names its --help
            given = list(sys.argv[1:] if argv is None else argv)
            after = args.command in given and given.index(args.command) < given.index(extra[0])
            (parser.commands[args.command] if after else parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # usage errors (2) and --help (0) end here, as a status
        return int(exc.code or 0)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    args.parts = parts
    handler = parts.commands[args.command].handler
    try:
        return handler(args)
    except FlowlabError as exc:
        if args.debug:
            raise
        _say(f"flowlab: error: {exc}")
        return EXIT_BAD_INPUT
    except OSError as exc:  # a path that cannot be read or written (missing, not a folder, no permission, disk full)
        if args.debug:
            raise
        _say(f"flowlab: error: {_os_error(exc)}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if args.debug:
            raise
        _say("flowlab: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug: one line here, the traceback in a file
        if args.debug:
            raise
        where = _save_traceback(exc)
        _say(f"flowlab: internal error: {type(exc).__name__}: {one_line(exc)[:300]} (a bug, not your input; "
             f"traceback in {where}; `flowlab --debug ...` raises it)")
        return EXIT_INTERNAL


def _say(line: str) -> None:
    print(one_line(line), file=sys.stderr)


def _os_error(exc: OSError) -> str:
    """An OSError as ``PATH: reason`` (``runs/x: Permission denied``, ``…: No space left on device``)."""
    path = exc.filename if exc.filename is not None else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {reason}" if path else reason


def _save_traceback(exc: BaseException) -> str:
    """Write ``exc``'s traceback to a file in the temporary folder; its path (or where it went)."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        fd, path = tempfile.mkstemp(prefix="flowlab-traceback-", suffix=".txt")
        with open(fd, "w") as f:
            f.write(f"flowlab {' '.join(sys.argv[1:])}\n{text}")
        return path
    except OSError:
        return "(could not be written)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
