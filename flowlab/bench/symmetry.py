"""Benchmark of the symmetry projector (prints ratios; not a timed test).

1. SGD step time on the narrow VGG-16 (``vgg16_narrow``, 3×32×32 inputs, BatchNorm) with every
   symmetry group recorded at every step (``record.every = 1``: quantity, drift, gradient terms
   and their accumulator) ÷ the same run with ``[symmetry] enabled = false``.  Target ≤ 1.10.
   The time is taken inside the run loop (from the first update to the last record), so the
   one-off model build and group detection are not in it; runs alternate, and the ratio of the
   fastest runs is reported (on a shared machine the minimum filters out interference), with the
   medians beside it and the recorder's own per-step cost timed alone.
2. Group detection of VGG-16 with the Tiny-ImageNet shapes (``flowlab.models.vgg16()``:
   3×64×64, 200 classes) on the CPU: trace + analysis, and building the CSR projector.
   Target < 10 s.

``python -m flowlab.bench symmetry [--steps N] [--batch S] [--dtype float32|float64] [--device D]
[--repeats R] [--skip-vgg16]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from flowlab.recording import Point, Recorder, Rows, StepInfo


def random_images(n: int = 512, seed: int = 0):
    """3×32×32 Gaussian images with 10 classes (a CIFAR-shaped stand-in; nothing is downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


class _Clock(Recorder):
    """Wall time from the first update to the last record (the steady part of the loop)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = self.t1 = None
        self.steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_update(self, info: StepInfo) -> None:
        if self.t0 is None:
            self._sync()
            self.t0 = time.perf_counter()
        self.steps += 1

    def record(self, rows: Rows, point: Point) -> None:
        if self.t0 is not None:
            self._sync()
            self.t1 = time.perf_counter()


def _study(steps: int, batch: int, dtype: str, device: str, enabled: bool):
    import flowlab

    return flowlab.parse_study({
        "study": {"name": f"bench-symmetry-{'on' if enabled else 'off'}", "dtype": dtype, "device": device},
        "model": {"name": "vgg16_narrow"},
        "data": {"name": "flowlab.bench.symmetry:random_images"},
        "optimizer": {"lr": 0.01, "steps": steps, "batch_size": batch, "weight_decay": 5e-4},
        "record": {"every": 1, "snapshot_every": "ends"},
        "symmetry": {"enabled": enabled},
    })


def _step_time(steps: int, batch: int, dtype: str, device: str, enabled: bool) -> tuple[float, int]:
    from flowlab.runner import Run

    study = _study(steps, batch, dtype, device, enabled)
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(study, tmp, overwrite=True)
        clock = _Clock(run.problem.device)
        run.extra_recorders.append(clock)
        ds = run.execute()
        groups = ds.sizes.get("symmetry_group", 0)
        ds.close()
    return (clock.t1 - clock.t0) / clock.steps, groups


def bench_step_ratio(steps: int, batch: int, dtype: str, device: str, repeats: int) -> tuple[float, float]:
    """Alternate runs without / with recording; (min ratio, median step time without)."""
    off, on, groups = [], [], 0
    _step_time(3, batch, dtype, device, True)  # warm-up (allocator, caches)
    for _ in range(repeats):
        off.append(_step_time(steps, batch, dtype, device, False)[0])
        t, groups = _step_time(steps, batch, dtype, device, True)
        on.append(t)
    r_min = min(on) / min(off)
    r_med = statistics.median(on) / statistics.median(off)

    def runs(ts: list[float]) -> str:
        return ", ".join(f"{t * 1e3:.1f}" for t in ts)

    print(f"narrow VGG-16, batch {batch}, {dtype}, {device}: {groups} groups recorded every step, {steps} steps per run")
    print(f"  SGD step without symmetry recording: min {min(off) * 1e3:7.2f} ms, median {statistics.median(off) * 1e3:7.2f}"
          f"  (runs: {runs(off)})")
    print(f"  SGD step with all groups every step: min {min(on) * 1e3:7.2f} ms, median {statistics.median(on) * 1e3:7.2f}"
          f"  (runs: {runs(on)})")
    print(f"  ratio with / without: {r_min:.3f} (min over runs), {r_med:.3f} (median)   (target <= 1.10)")
    return r_min, statistics.median(off)


def bench_hooks(dtype: str, device: str, step_time: float) -> float:
    """The recorder's own work per step (record + before_update on real θ and ĝ), timed alone."""
    from flowlab.build import build
    from flowlab.recording import RunContext
    from flowlab.symmetry import SymmetryRecorder, study_groups

    study = _study(4, 32, dtype, device, True)
    built = build(study)
    p = built.problem
    groups = study_groups(study, p)
    proj = groups.projector(p.device)
    ctx = RunContext(study, p, ["sgd"], 4, np.arange(5), np.arange(5.0), np.array([0, 4]), built.lrs)
    rec = SymmetryRecorder(groups, proj)
    rows = Rows("time", rec.variables(ctx), 1, 64, p.device)
    rec.start(ctx)
    theta = p.theta0.clone()
    grad = p.grad(theta, p.batch(slice(0, 32)))

    def one() -> None:
        rows.n = 0
        rows.begin(0, 0.0)
        rec.record(rows, Point("sgd", 0, 0, 0.0, theta, None, grad, None))
        rec.before_update(StepInfo(0, 0.0, 0.01, theta, grad, None, None))
        rec.before_flush(rows)  # the staged block is computed here (every step: the dearest case)

    def timed(fn, n=50) -> float:
        fn()
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    t_hooks = timed(one)
    t_q, t_g = timed(lambda: proj.quantities(theta)), timed(lambda: proj.grad_terms(grad))
    nnz = groups.csr("quad").nnz + groups.csr("lin").nnz
    print(f"  projector: {len(groups)} groups over {p.dim} parameters, CSR nnz {nnz:,};"
          f" quantities(θ) {t_q * 1e3:.3f} ms, grad_terms(ĝ) {t_g * 1e3:.3f} ms")
    print(f"  recorder hooks per recorded step, timed alone: {t_hooks * 1e3:.3f} ms = {t_hooks / step_time:.1%} of the "
          f"step (the direct cost; the ratio above adds cache effects and this machine's noise)")
    return t_hooks


def bench_vgg16_detection() -> float:
    import torch.nn.functional as F

    from flowlab.models import vgg16
    from flowlab.symmetry import detect

    torch.manual_seed(0)
    t = time.perf_counter()
    model = vgg16()
    t_build = time.perf_counter() - t
    X = torch.randn(5, 3, 64, 64)
    y = torch.randint(0, 200, (5,))
    t = time.perf_counter()
    det = detect(model, X, F.cross_entropy, y)
    t_detect = time.perf_counter() - t
    t = time.perf_counter()
    proj = det.groups.projector("cpu")
    t_proj = time.perf_counter() - t
    g = det.groups
    counts = ", ".join(f"{int((g.kinds == k).sum())} {k}" for k in ("translation", "scale", "rescale"))
    n_params = g.layout.size
    print(f"VGG-16 (Tiny-ImageNet shapes, {n_params / 1e6:.1f} M parameters; model built in {t_build:.2f} s):")
    print(f"  detection (trace of 5 examples + analysis + index sets): {t_detect:.2f} s   (target < 10 s)")
    print(f"  groups: {counts}; skipped: {len(det.skipped)}")
    print(f"  CSR projector build: {t_proj:.2f} s (nnz {g.csr('quad').nnz + g.csr('lin').nnz:,}); "
          f"detection + projector {t_detect + t_proj:.2f} s")
    del proj
    return t_detect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowlab.bench symmetry", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--skip-vgg16", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.set_printoptions(precision=3)
    ratio, t_step = bench_step_ratio(args.steps, args.batch, args.dtype, args.device, args.repeats)
    bench_hooks(args.dtype, args.device, t_step)
    t_detect = None if args.skip_vgg16 else bench_vgg16_detection()
    print(f"RESULT step-time ratio {ratio:.3f} (target <= 1.10)"
          + ("" if t_detect is None else f"; VGG-16 detection {t_detect:.2f} s (target < 10 s)"))
    return 0
