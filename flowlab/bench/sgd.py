"""flowlab SGD with recording every step ÷ a raw ``torch.optim.SGD`` loop, same model, same run.

    python -m flowlab.bench sgd [--steps N] [--batch-size S] [--repeats R] [--dtype float32]

Both sides train the same model (the quick-start MLP on digits unless ``--study`` is given) from
the same θ0 on the same batches; the raw loop is the loop a user would write (zero_grad, forward,
loss, backward, step) with nothing recorded.  flowlab's side is a whole ``flowlab.run`` recording
every step (loss, distance, projections, snapshots, streamed to zarr), timed from the first update
to the last one, set-up excluded.  Repeats alternate the two sides; the ratio of medians is printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import flowlab
from flowlab.recording import Recorder


class _Clock(Recorder):
    """Marks the first and last update (so build/compile/store set-up stay out of the timing)."""

    def __init__(self) -> None:
        self.t_first = self.t_last = None

    def before_update(self, info) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def after_update(self, info) -> None:
        self.t_last = time.perf_counter()


def raw_loop(built: flowlab.Built, steps: int) -> float:
    study, problem = built.study, built.problem
    opt_cfg = study.optimizer
    model = problem.module
    with torch.no_grad():
        problem.load(problem.theta0)
    opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                          weight_decay=opt_cfg.weight_decay, dampening=opt_cfg.dampening, nesterov=opt_cfg.nesterov)
    sampler = flowlab.BatchSampler(problem.n, opt_cfg.batch_size, study.study.seed, opt_cfg.drop_last, problem.device,
                                      opt_cfg.sampling)
    X, y, loss_fn = problem.X, problem.y, problem.loss_fn
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = sampler.next()
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
    return time.perf_counter() - t0


def flowlab_run(study: flowlab.Study, steps: int) -> float:
    clock = _Clock()
    study = flowlab.parse_study(study.to_dict())
    with tempfile.TemporaryDirectory() as out:
        flowlab.Run(study, out, overwrite=True, recorders=[clock]).execute()
    return clock.t_last - clock.t_first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowlab.bench sgd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", default="studies/quickstart.toml")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study key")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = [f"optimizer.steps={args.steps}", f"study.dtype=\"{args.dtype}\"", "study.device=\"cpu\"",
            "record.every=1", "flows=[]"]
    if args.batch_size:
        sets.append(f"optimizer.batch_size={args.batch_size}")
    sets += args.set
    core = flowlab.load_study(args.study, sets + ["symmetry.enabled=false", "theory.enabled=false"])
    full = flowlab.load_study(args.study, sets)
    built = flowlab.build(core)
    raw_loop(built, 50)  # warm-up
    flowlab_run(core, 50)
    flowlab_run(full, 50)
    raws, cores, fulls = [], [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit all three alike
        raws.append(raw_loop(built, args.steps))
        cores.append(flowlab_run(core, args.steps))
        fulls.append(flowlab_run(full, args.steps))
    r, c, f = statistics.median(raws), statistics.median(cores), statistics.median(fulls)
    opt = core.optimizer
    us = lambda x: f"{x / args.steps * 1e6:8.1f} us/step"  # noqa: E731
    print(f"model {core.model.name} on {core.data.name}: {built.problem.dim} parameters, batch {opt.batch_size}, "
          f"momentum {opt.momentum}, {args.dtype}, {args.threads} thread(s), {args.steps} steps, median of {args.repeats}")
    print(f"raw torch.optim.SGD loop                      : {us(r)}")
    print(f"flowlab run, core recording every step        : {us(c)}  (loss, distance, "
          f"{core.record.projections} projections, snapshots, zarr)")
    print(f"flowlab run, + symmetry and theory every step : {us(f)}  (quantities, grad terms, momentum terms, "
          f"theory variants of every group)")
    print(f"ratio core / raw = {c / r:.3f}  (target <= 1.10)")
    print(f"ratio full / raw = {f / r:.3f}  (symmetry + theory on a model this small; see bench symmetry for the narrow VGG)")
    return 0
