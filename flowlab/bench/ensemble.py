"""One ensemble of K replicas ÷ K single runs, same study, same machine, same process.

    python -m flowlab.bench ensemble [--samples 32] [--steps 200] [--batch-size 32] [--repeats 3]

The study is an MLP 64-128-128-10 on sklearn digits (float32, minibatches with replacement),
recording every 10 steps (loss, distance, projections, symmetry quantities, theory, snapshots).
Two cases: SGD alone, and SGD with an ``sme`` flow (one Euler–Maruyama path per replica).  The
ensemble is one ``flowlab.run`` with ``[ensemble] size = K`` (SGD replicas and SDE paths vectorised
by ``torch.func.vmap``); the single runs are K ``flowlab.run`` calls with K seeds.  Each side is
timed around ``Run.execute`` with the problem built once (set-up of the model and data excluded,
the store's creation included on both sides).  Repeats alternate the sides; medians are compared.
Target (issue 11): ensemble ÷ singles ≤ 0.5 at K = 32.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flowlab.build import build
from flowlab.config import parse_study
from flowlab.runner import Run


def study(samples: int, steps: int, batch: int, flows: bool, seed: int = 0):
    raw = {
        "study": {"name": "bench-ensemble", "seed": seed, "dtype": "float32"},
        "model": {"name": "mlp", "widths": [128, 128], "activation": "relu"},
        "data": {"name": "digits"},
        "optimizer": {"lr": 0.05, "steps": steps, "batch_size": batch, "sampling": "with_replacement"},
        "record": {"every": 10, "projections": 4},
        "theory": {"flow_laws": False},
    }
    if samples > 1:
        raw["ensemble"] = {"size": samples}
    if flows:
        raw["flows"] = [{"name": "sme", "label": "sme"}]
    return parse_study(raw)


def _time(st, built, out: Path) -> float:
    t0 = time.perf_counter()
    Run(st, out, overwrite=True, built=built).execute().close()
    return time.perf_counter() - t0


def measure(samples: int, steps: int, batch: int, flows: bool, repeats: int) -> dict:
    ens = study(samples, steps, batch, flows)
    singles = [study(1, steps, batch, flows, seed=s) for s in range(samples)]
    built_e, built_s = build(ens), build(singles[0])
    t_ens, t_single = [], []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        _time(ens, built_e, base / "warm")  # warm-up (imports, vmap tracing caches)
        for _ in range(repeats):
            t_ens.append(_time(ens, built_e, base / "ens"))
            t0 = time.perf_counter()
            for s, st in enumerate(singles):
                from dataclasses import replace

                Run(st, base / f"s{s}", overwrite=True, built=replace(built_s, study=st)).execute().close()
            t_single.append(time.perf_counter() - t0)
    e, s = statistics.median(t_ens), statistics.median(t_single)
    return {"ensemble_s": e, "singles_s": s, "ratio": e / s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowlab.bench ensemble", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"K = {args.samples} replicas, {args.steps} steps, batch {args.batch_size}, MLP 64-128-128-10 on digits, "
          f"float32, one thread")
    for flows in (False, True):
        r = measure(args.samples, args.steps, args.batch_size, flows, args.repeats)
        case = "sgd + sme" if flows else "sgd"
        print(f"{case:<10} ensemble {r['ensemble_s']:.2f} s   {args.samples} single runs {r['singles_s']:.2f} s   "
              f"ratio {r['ratio']:.3f}  (target <= 0.5)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
