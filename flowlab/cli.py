"""The ``flowlab`` command line.  Bad input prints one line and exits with status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import FlowlabError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own code too)
        self.exit(EXIT_BAD_INPUT, f"flowlab: error: {message} (see flowlab {self.prog.split()[-1]} --help)\n")


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_study
    from .runner import Run, default_out

    study = load_study(args.study, args.set or ())
    out = Path(args.out) if args.out else default_out(study)
    runner = Run(study, out, overwrite=args.overwrite, progress=not args.quiet)
    try:
        ds = runner.execute()
    except KeyboardInterrupt:
        print(f"flowlab: interrupted; what was recorded is kept in {out}", file=sys.stderr)
        return 130
    _print_summary(ds, out)
    return 0


def _print_summary(ds, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{ds.attrs.get('study_name', '')}: {ds.sizes['time']} records, t = {float(ds.time[-1]):.4g}")
    for col in ("method", "status", "final loss", "max distance", "grad evals", "wall s"):
        table.add_column(col, justify="left" if col in ("method", "status") else "right")
    for i, m in enumerate(ds.method.values):
        loss = ds.loss.isel(method=i).values
        dist = ds.distance.isel(method=i).values
        finite = loss[~_isnan(loss)]
        table.add_row(str(m), str(ds.status.values[i]), f"{finite[-1]:.4g}" if finite.size else "–",
                      f"{_nanmax(dist):.3g}", str(int(ds.n_grad_evals.values[i])), f"{float(ds.wall_seconds.values[i]):.2f}")
    console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and pipes: no truncated labels
    console.print(table)
    console.print(f"written to {out}/trajectory.zarr  (open with flowlab.open_result({str(out)!r}))", soft_wrap=True)


def _isnan(a):
    import numpy as np

    return np.isnan(a)


def _nanmax(a) -> float:
    import numpy as np

    return float(np.nanmax(a)) if np.isfinite(a).any() else float("nan")


def _cmd_list(args: argparse.Namespace) -> int:
    from . import registries

    for title, reg in registries().items():
        print(f"{title}:")
        for name in reg:
            print(f"  {name:<24} {reg.doc(name)}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .store import export_netcdf

    if not args.netcdf:
        raise FlowlabError("export: give --netcdf FILE")
    path = export_netcdf(args.result, args.netcdf)
    print(f"wrote {path}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def register_command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None],
                     handler: Callable[[argparse.Namespace], int]) -> None:
    COMMANDS[name] = (help, handler)
    _CONFIGURE[name] = configure


_CONFIGURE: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def _configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study's TOML file")
    p.add_argument("--out", help="output folder (default: [study] out, else runs/<name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a study key, e.g. optimizer.lr=0.1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="a run's output folder")
    p.add_argument("--netcdf", metavar="FILE", help="write the Dataset to this netCDF file")


register_command("run", "run a study: SGD (and its flows), recorded into OUT/trajectory.zarr", _configure_run, _cmd_run)
register_command("list", "list the registered models, datasets, losses, schedules, ...", lambda p: None, _cmd_list)
register_command("export", "export a result to netCDF", _configure_export, _cmd_export)


def make_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = _Parser(prog="flowlab", description="Discrete SGD and continuous models of SGD on the same network.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _CONFIGURE[name](p)
    return parser


def _load_plugins() -> None:
    """Import the optional parts; each registers its commands with :func:`register_command`."""
    from .plugins import load_plugins

    load_plugins()


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    handler = COMMANDS[args.command][1]
    try:
        return handler(args)
    except FlowlabError as exc:
        if args.debug:
            raise
        print(f"flowlab: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
