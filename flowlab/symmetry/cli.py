"""Commands ``flowlab symmetries STUDY`` and ``flowlab check STUDY``, and the symmetry part of
``flowlab report RESULT`` (:func:`report_drift`)."""

from __future__ import annotations

import argparse
import math
import time

from flowlab.parts import Command, ReportRequest


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="the study's TOML file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a study key, e.g. model.width=0.5")


def _build(args: argparse.Namespace, overrides: tuple[str, ...] = ()):
    from flowlab.build import build
    from flowlab.config import load_study

    study = load_study(args.study, [*(args.set or ()), *overrides], getattr(args, "parts", None))
    return study, build(study)


def _console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


# ------------------------------------------------------------------ symmetries
def _configure_symmetries(p: argparse.ArgumentParser) -> None:
    _study_args(p)


def _cmd_symmetries(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .build import study_groups

    study, built = _build(args)
    t0 = time.perf_counter()
    groups = study_groups(study, built.problem)
    dt = time.perf_counter() - t0
    console = _console()
    table = Table(title=f"{study.name}: {len(groups)} symmetry groups ({built.problem.dim} parameters, found in {dt:.2f} s)")
    for col in ("kind", "layer", "groups", "size", "members", "origin"):
        table.add_column(col, justify="right" if col in ("groups", "size") else "left")
    for r in groups.summary():
        size = str(r["min_size"]) if r["min_size"] == r["max_size"] else f"{r['min_size']}–{r['max_size']}"
        note = "; ".join(dict.fromkeys(r["notes"]))
        if r["eps"] > 0:
            note += f"  [ε = {r['eps']:g}: approximate]"
        table.add_row(r["kind"], escape(r["layer"]), str(r["count"]), size, escape(note), r["origin"])
    console.print(table)
    if groups.skipped:
        console.print("[bold]skipped[/bold] (no group, and why):")
        for s in groups.skipped:
            console.print(f"  {s}", highlight=False, markup=False)
    counts = {k: int((groups.kinds == k).sum()) for k in ("translation", "scale", "rescale")}
    console.print("total: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


# ----------------------------------------------------------------------- check
def _configure_check(p: argparse.ArgumentParser) -> None:
    _study_args(p)
    p.add_argument("--hessian", type=int, default=4, metavar="N",
                   help="Hessian identities for N groups per kind and layer (0: every group; default 4)")
    p.add_argument("--as-is", action="store_true",
                   help="check in the study's dtype (default: float64, where round-off is far below a wrong group's "
                        "residual; the groups do not depend on the dtype)")
    p.add_argument("--keep-eps", action="store_true",
                   help="check with the normalisations' own ε (> 0 makes scale groups only approximately invariant)")
    p.add_argument("--full-batch", action="store_true", help="use the whole dataset instead of the first SGD batch")
    p.add_argument("--tolerance", type=float, help="flag relative residuals above this (default: [symmetry] tolerance, "
                                                   "else √ε of the dtype: 1.5e-8 in float64)")


def _cmd_check(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from flowlab.errors import ConfigError
    from flowlab.sgd import BatchSampler

    from .build import study_groups
    from .checks import check_constraints

    study, built = _build(args, () if args.as_is else ("study.dtype=float64",))
    problem = built.problem
    groups = study_groups(study, problem)
    if len(groups) == 0:
        print("no symmetry groups: nothing to check (see flowlab symmetries)")
        return 0
    if args.hessian < 0:
        raise ConfigError("--hessian", args.hessian, "expected 0 (all groups) or a positive number per layer")
    tol = args.tolerance
    if tol is None:
        st = study.section("symmetry").tolerance
        tol = None if st == "auto" else float(st)
    if tol is not None and not tol > 0:
        raise ConfigError("--tolerance", tol, "expected a positive number")
    if args.full_batch:
        batch, where = problem.batch(), f"the full dataset ({problem.n} examples)"
    else:
        opt = study.optimizer
        idx = BatchSampler(problem.n, opt.batch_size, study.study.seed, opt.drop_last, problem.device, opt.sampling).next()
        batch = problem.batch(idx)
        where = f"the first SGD batch ({problem.n if idx is None else len(idx)} examples)"
    t0 = time.perf_counter()
    res = check_constraints(problem, groups, problem.theta0, batch, hessian_per_layer=args.hessian, tolerance=tol,
                            exact=not args.keep_eps, seed=study.study.seed)
    console = _console()
    dtype = str(problem.dtype).replace("torch.", "")
    table = Table(title=f"{study.name}: constraint residuals at θ0 on {where}, {dtype} (relative; flag > {res.tolerance:.1e})")
    for col in ("kind", "layer", "groups", "max |⟨g,s_A⟩|", "max |H s_A + r_A|", "hessian checked", "status"):
        table.add_column(col, justify="left" if col in ("kind", "layer", "status") else "right")
    for r in res.by_layer():
        status = "ok" if not r["flagged"] else f"FLAGGED units {r['flagged'][:8]}" + ("…" if len(r["flagged"]) > 8 else "")
        table.add_row(r["kind"], escape(r["layer"]), str(r["groups"]), _fmt(r["grad_max"]), _fmt(r["hess_max"]),
                      f"{r['hess_checked']}/{r['groups']}", escape(status))
    console.print(table)
    console.print("s_A = 1_A (translation), θ_A (scale), θ_A1 − θ_A2 (rescale); r_A = 0 or g_A1 − g_A2; "
                  f"h = |Hξ|/|ξ| = {res.h:.3g}; {time.perf_counter() - t0:.1f} s", highlight=False)
    for note in res.notes:
        console.print(f"note: {note}", highlight=False)
    n_flag = int(res.flagged.sum())
    if n_flag:
        console.print(f"[bold red]{n_flag} group(s) FLAGGED[/bold red]: residual above round-off — not a symmetry of "
                      "this model/loss (wrong group?)")
        return 1
    if args.tolerance is None and tol is None:
        console.print("all groups at round-off")
    else:
        console.print(f"no group above the tolerance {res.tolerance:.1e}")
    return 0


# ---------------------------------------------------------------------- report
def report_drift(request: ReportRequest) -> list:
    """The drift table (max |Q(t) − Q(0)| / scale per dynamics × kind (× layer)) and its figures;
    nothing for a result without symmetry variables."""
    from rich.markup import escape
    from rich.table import Table

    from .report import report

    if "drift" not in request.dataset:
        return []
    rows, paths = report(request.dataset, request.folder, by_layer=request.by_layer, figures=request.figures)
    table = Table(title=f"{request.result.name}: max |Q(t) − Q(0)| / scale")
    cols = ["dynamics", "kind"] + (["layer"] if request.by_layer else []) + ["groups", "max rel. drift", "at t"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("dynamics", "kind", "layer") else "right")
    for r in rows:
        vals = [escape(r["dynamics"]), r["kind"]] + ([escape(r["layer"])] if request.by_layer else []) + [
            str(r["groups"]), _fmt(r["max_rel_drift"]), "–" if math.isnan(r["at_time"]) else f"{r['at_time']:.4g}"]
        table.add_row(*vals)
    request.console.print(table)
    return list(paths)


COMMANDS = (
    Command("symmetries", "list the symmetry groups found in a study's model (and what was skipped, why)",
            _configure_symmetries, _cmd_symmetries),
    Command("check", "check the gradient and Hessian constraints of every symmetry group at θ0",
            _configure_check, _cmd_check),
)
