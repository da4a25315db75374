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
        problem._theta.copy_(problem.theta0)
    opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=opt_cfg.momentum,
                          weight_decay=opt_cfg.weight_decay, dampening=opt_cfg.dampening, nesterov=opt_cfg.nesterov)
    sampler = flowlab.BatchSampler(problem.n, opt_cfg.batch_size, study.study.seed, opt_cfg.drop_last, problem.device)
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = [f"optimizer.steps={args.steps}", f"study.dtype=\"{args.dtype}\"", "study.device=\"cpu\"",
            "record.every=1", "flows=[]"]
    if args.batch_size:
        sets.append(f"optimizer.batch_size={args.batch_size}")
    study = flowlab.load_study(args.study, sets)
    built = flowlab.build(study)
    raw_loop(built, 50)  # warm-up
    flowlab_run(study, 50)
    raws, flows = [], []
    for _ in range(args.repeats):
        raws.append(raw_loop(built, args.steps))
        flows.append(flowlab_run(study, args.steps))
    r, f = statistics.median(raws), statistics.median(flows)
    opt = study.optimizer
    print(f"model {study.model.name} on {study.data.name}: {built.problem.dim} parameters, batch {opt.batch_size}, "
          f"{args.dtype}, {args.threads} thread(s), {args.steps} steps, median of {args.repeats}")
    print(f"raw torch.optim.SGD loop     : {r / args.steps * 1e6:8.1f} us/step")
    print(f"flowlab run, record each step: {f / args.steps * 1e6:8.1f} us/step "
          f"(loss, distance, {study.record.projections} projections, snapshots, zarr)")
    print(f"ratio flowlab / raw = {f / r:.3f}  (target <= 1.10)")
    return 0
