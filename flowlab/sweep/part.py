"""The sweep part: the ``[sweep]`` section and ``flowlab sweep`` (runs on dask.distributed)."""

from __future__ import annotations

import argparse

from ..parts import Command, Part, Section
from .config import parse_sweep


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study's TOML file, with a [sweep] section")
    p.add_argument("--out", help="the sweep folder (default runs/<study>-sweep)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--scheduler-file", help="a dask scheduler file (dask scheduler --scheduler-file F)")
    p.add_argument("--workers", type=int, help="worker processes of the embedded LocalCluster (default: the CPUs)")
    p.add_argument("--resume", action="store_true", help="run only the points that are missing or failed")
    p.add_argument("--overwrite", action="store_true", help="start the sweep folder again")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a study key")


def _handler(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import load_study
    from ..errors import ConfigError
    from .runner import run_sweep

    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", args.workers, "expected an integer >= 1")
    study = load_study(args.study, args.set or ())
    out = Path(args.out) if args.out else Path("runs") / f"{study.name}-sweep"
    ds = run_sweep(study, out, scheduler=args.scheduler, scheduler_file=args.scheduler_file, workers=args.workers,
                   resume=args.resume, overwrite=args.overwrite)
    status = ds["sweep_status"].values.ravel()
    ok = int((status == "ok").sum())
    print(f"{ok}/{status.size} points ok; open with flowlab.open_result({str(out)!r}) "
          f"(dims {', '.join(ds.sweep_status.dims)})")
    return 0 if ok == status.size else 1


PART = Part(
    name="sweep",
    sections=(Section("sweep", parse_sweep, default=None),),
    commands=(Command("sweep", "run every point of the study's [sweep] on dask.distributed", _configure, _handler),),
    doc="sweeps over study keys, one dask.distributed task per point, read back as one Dataset",
)
