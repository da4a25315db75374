"""Every performance figure the issues ask for, in one run: ``flowlab bench`` (or
``python -m flowlab.bench all``) prints each as a ratio against the raw PyTorch / JAX baseline
measured in the same run, with its target and whether it is met, and writes them to
``results/bench/bench.md``.  Sizes are chosen so the whole run takes a few minutes on a 2-core CPU;
each figure's own ``python -m flowlab.bench NAME`` measures it at full size with more repeats.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Figure:
    name: str
    value: float
    target: str
    met: bool | None
    unit: str = "×"
    note: str = ""


def _le(x: float, bound: float) -> bool:
    return x <= bound


def sgd_figures(steps: int = 1000, repeats: int = 5) -> list[Figure]:
    import flowlab
    from flowlab.bench.sgd import flowlab_run, raw_loop

    sets = [f"optimizer.steps={steps}", "study.dtype=\"float32\"", "study.device=\"cpu\"", "record.every=1", "flows=[]"]
    core = flowlab.load_study("studies/quickstart.toml", sets + ["symmetry.enabled=false", "theory.enabled=false"])
    full = flowlab.load_study("studies/quickstart.toml", sets)
    coarse = flowlab.load_study("studies/quickstart.toml", sets + ["record.every=10"])
    built = flowlab.build(core)
    raw_loop(built, 50)
    flowlab_run(core, 50)
    flowlab_run(full, 50)
    flowlab_run(coarse, 50)
    r, c, f, f10 = [], [], [], []
    for _ in range(repeats):
        r.append(raw_loop(built, steps))
        c.append(flowlab_run(core, steps))
        f.append(flowlab_run(full, steps))
        f10.append(flowlab_run(coarse, steps))
    r, c, f, f10 = (statistics.median(x) for x in (r, c, f, f10))
    return [Figure("SGD + core recording every step ÷ raw torch.optim.SGD loop (quick-start MLP)", c / r, "≤ 1.10",
                   _le(c / r, 1.10)),
            Figure("SGD + symmetry + theory every step ÷ raw loop (quick-start MLP)", f / r, "≤ 1.20 (issue 12 item 6)",
                   _le(f / r, 1.20)),
            Figure("SGD + symmetry + theory, rows every 10 steps (grad terms and theory still every step) ÷ raw loop",
                   f10 / r, "≤ 1.20", _le(f10 / r, 1.20))]


def symmetry_figures() -> list[Figure]:
    from flowlab.bench.symmetry import bench_step_ratio, bench_vgg16_detection

    ratio, _ = bench_step_ratio(20, 32, "float32", "cpu", 3)
    t = bench_vgg16_detection()
    return [Figure("narrow VGG: recording every group every step ÷ not", ratio, "≤ 1.10", _le(ratio, 1.10)),
            Figure("VGG-16 symmetry detection", t, "< 10 s", t < 10, unit="s")]


def flows_figures() -> list[Figure]:
    from flowlab.bench.flows import bench_central, bench_gf, bench_hvp

    out = []
    for name, r, _lo, _hi in bench_gf(2):
        out.append(Figure(f"flow wall ÷ (nfe × raw gradient): {name}", r, "≤ 1.05", _le(r, 1.05)))
    for name, r, _lo, _hi in bench_hvp(2):
        if any(k in name for k in ("HVP double backward", "forward-over-reverse", "graph kept")):
            out.append(Figure(f"HVP ÷ gradient (torch): {name}", r, "(baseline: raw autograd)", None))
        elif "engine gradient" in name:
            out.append(Figure(f"gradient ÷ raw gradient (torch): {name}", r, "≤ 1.10", _le(r, 1.10)))
        elif "at the θ of" in name:
            out.append(Figure(f"HVP ÷ gradient (torch): {name}", r, "≤ 2.0", _le(r, 2.0)))
        elif "IGR field" in name and "graph reuse" in name:
            out.append(Figure(f"HVP ÷ gradient (torch): {name}", r, "(fallback path)", None,
                              note="models the R-op engine does not take"))
        elif "IGR field" in name:
            out.append(Figure(f"HVP ÷ gradient (torch): {name}", r, "≤ 3.0 (gradient + HVP)", _le(r, 3.0)))
        else:
            out.append(Figure(f"HVP ÷ gradient (torch): {name}", r, "< 2.8 (beats double backward)", _le(r, 2.8)))
    for name, r, _lo, _hi in bench_central(1, 3):
        out.append(Figure(f"cost per unit t: {name}", r, "(reported, issue 14)", None))
    return out


def jax_figures() -> list[Figure]:
    from flowlab.bench.jax import bench_model

    row = bench_model("mlp", "gradient_flow", 1e-6, "float64", 10, 0.05, 2, log=lambda m: None)
    return [Figure("diffrax flow wall ÷ (nfe × jit JAX gradient), MLP", row["ratio"], "≤ 1.10", _le(row["ratio"], 1.10)),
            Figure("diffrax ÷ torchdiffeq wall, same flow, MLP", row["diffrax_over_torchdiffeq"], "≤ 1.0",
                   _le(row["diffrax_over_torchdiffeq"], 1.0))]


def sde_figures() -> list[Figure]:
    from flowlab.bench import sde
    from flowlab.flows import Hyper

    problem = sde._problem("relu")
    hp = Hyper(lr=0.1, batch_size=32, sampling="with_replacement")
    rows = sde.bench_torch(problem, hp, 7) + sde.bench_jax(problem, hp, 7)
    out = []
    for name, r, _lo, _hi in rows:
        if "fuse = false" in name:
            out.append(Figure(f"SDE step ÷ gradient: {name}", r, "(reference)", None,
                              note="drift and lineax diffusion need two backward passes"))
        else:
            out.append(Figure(f"SDE step ÷ gradient: {name}", r, "≤ 1.3", _le(r, 1.3)))
    return out


def ensemble_figures() -> list[Figure]:
    from flowlab.bench.ensemble import measure

    sgd = measure(32, 100, 32, False, 1)
    return [Figure("ensemble K = 32 ÷ 32 single runs (SGD, MLP 64-128-128-10 on digits)", sgd["ratio"], "≤ 0.5",
                   _le(sgd["ratio"], 0.5),
                   note="with an sme flow every path costs a full-batch pass: ≈ 1.1 (python -m flowlab.bench ensemble)")]


def memory_figures(steps: int = 10000) -> list[Figure]:
    import flowlab
    from flowlab.bench.memory import _RSS

    study = flowlab.load_study("studies/quickstart.toml", [f"optimizer.steps={steps}", "record.every=1", "flows=[]"])
    probe = _RSS(max(1, steps // 10))
    with tempfile.TemporaryDirectory() as out:
        flowlab.Run(study, out, overwrite=True, recorders=[probe]).execute()
    growth = probe.samples[-1][1] - probe.samples[0][1]
    per = growth / (probe.samples[-1][0] - probe.samples[0][0]) * 1e4
    return [Figure("memory growth per 10⁴ recorded steps (RSS)", per, "≤ 10 MB", per <= 10, unit="MB")]


def sweep_figures(points: int = 12) -> list[Figure]:
    from distributed import Client, LocalCluster

    import flowlab
    from flowlab.config import parse_study
    from flowlab.runner import Run
    from flowlab.sweep.config import point_study
    from flowlab.sweep.runner import run_sweep

    raw = {"study": {"name": "bench-sweep", "dtype": "float32"}, "model": {"name": "mlp", "widths": [16]},
           "data": {"name": "digits", "n": 256}, "optimizer": {"lr": 0.1, "steps": 400, "batch_size": 32},
           "record": {"every": 10}, "sweep": {"optimizer.lr": [0.2, 0.1, 0.05, 0.025], "study.seed": [0, 1, 2]}}
    study = parse_study(raw)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for i, (_, setting) in enumerate(study.section("sweep").points()[:points]):
            Run(point_study(study, setting), Path(tmp) / f"s{i}", overwrite=True).execute().close()
        serial = time.perf_counter() - t0
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            warm = raw | {"sweep": {"optimizer.lr": [0.3, 0.4]}, "optimizer": {**raw["optimizer"], "steps": 5}}
            run_sweep(parse_study(warm), Path(tmp) / "warm", client=client, log=lambda m: None)  # imports, caches
            t0 = time.perf_counter()
            run_sweep(study, Path(tmp) / "sweep", client=client, log=lambda m: None)
            swept = time.perf_counter() - t0
    del flowlab
    return [Figure("12-point sweep on a 2-worker LocalCluster ÷ the points run serially in one process", swept / serial,
                   "≤ 0.75 on 2 cores", swept / serial <= 0.75)]


SECTIONS = {"sgd": sgd_figures, "symmetry": symmetry_figures, "flows": flows_figures, "jax": jax_figures,
            "sde": sde_figures, "ensemble": ensemble_figures, "memory": memory_figures, "sweep": sweep_figures}


def run(only: list[str] | None = None, log=print) -> list[Figure]:
    import torch

    torch.set_num_threads(1)
    figures: list[Figure] = []
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as exc:  # noqa: BLE001 - one failed measurement does not hide the others
            got = [Figure(f"{name}: not measured", float("nan"), "", False, note=f"{type(exc).__name__}: {exc}")]
            traceback.print_exc(file=sys.stderr)
        for f in got:
            log(_line(f))
        log(f"  ({name}: {time.perf_counter() - t0:.0f} s)")
        figures += got
    return figures


def _line(f: Figure) -> str:
    mark = {True: "met", False: "MISSED", None: "—"}[f.met]
    value = f"{f.value:.3f}{f.unit if f.unit != '×' else ''}"
    return f"{value:>9}  {f.target:<26} {mark:<7} {f.name}" + (f"  [{f.note}]" if f.note else "")


def write(figures: list[Figure], path: Path, seconds: float) -> Path:
    import torch

    lines = ["# flowlab bench", "",
             f"Regenerate: `flowlab bench` ({seconds:.0f} s here; "
             f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}, one thread, "
             f"{_dt.date.today().isoformat()}). Each figure is a ratio measured in this run against the raw "
             "baseline (or a time where the target is one).", "",
             "| value | target | met | figure | note |", "|---:|---|---|---|---|"]
    for f in figures:
        mark = {True: "met", False: "**missed**", None: "—"}[f.met]
        value = f"{f.value:.3f}" + ("" if f.unit == "×" else f" {f.unit}")
        lines.append(f"| {value} | {f.target} | {mark} | {f.name} | {f.note} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flowlab bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    ap.add_argument("--out", default="results/bench/bench.md")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only is not None else None
    if only is not None:
        from ..errors import ConfigError, did_you_mean

        unknown = [s for s in only if s not in SECTIONS] or ([] if only else [args.only])
        if unknown:
            raise ConfigError("--only", unknown[0], f"allowed: {', '.join(SECTIONS)} (comma-separated)",
                              did_you_mean(unknown[0], SECTIONS))
    t0 = time.perf_counter()
    figures = run(only)
    path = write(figures, Path(args.out), time.perf_counter() - t0)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
