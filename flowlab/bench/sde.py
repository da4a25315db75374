"""One Euler–Maruyama step of ``sme`` against one full-batch gradient, torch and JAX, in one process.

    python -m flowlab.bench sde [--repeats 15] [--clock cpu|wall] [--activation relu]

The MLP 64-128-128-10 on the whole digits set (1797 examples, float32, one thread for torch and
for XLA); ``sme`` with per-example diffusion (noise dimension N = 1797) modelling batches of 32
drawn with replacement, η = 0.1.  Printed, each as a ratio of medians over alternating repeats
(with the spread of the per-repeat ratios):

- torch: ``SME.step`` with :class:`~flowlab.flows.TorchOps` (draw ΔW ∈ R^N, one weighted backward
  pass) ÷ ``problem.full_loss_and_grad``;
- JAX: one jitted ``diffrax:Euler`` step of the SDE (the compiled interval of a session,
  :class:`flowlab.jaxbackend.sde.SDEKernel`, with one step: diffrax's Brownian increment, the
  fused term's weighted backward pass, the finiteness check) ÷ one jitted full-batch gradient of
  the twin (``JaxOps.grad``); also per step of a 20-step interval, and with ``fuse = false``
  (drift and lineax diffusion operator evaluated apart: two backward passes).

Target: ≤ 1.3 for the fused steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

from .jax import _single_thread

CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = time.process_time
UNIT_MS: list[float] = []  # the median gradient time of each measurement (ms)


def _time(fn) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


def _ratio(fn, unit, repeats: int, per: int = 1) -> tuple[float, float, float]:
    """median(fn) ÷ (per × median(unit)), alternating unit, fn, unit; and the per-repeat spread."""
    for _ in range(2):  # warm
        fn()
        unit()
    a, b = [], []
    for _ in range(repeats):
        b.append(_time(unit))
        a.append(_time(fn))
        b.append(_time(unit))
    per_rep = [a[i] / (per * (b[2 * i] + b[2 * i + 1]) / 2) for i in range(repeats)]
    UNIT_MS.append(statistics.median(b) * 1e3)
    return statistics.median(a) / (per * statistics.median(b)), min(per_rep), max(per_rep)


def _problem(activation: str):
    import flowlab

    raw = {
        "study": {"name": "bench_sde", "dtype": "float32", "device": "cpu", "seed": 0},
        "model": {"name": "mlp", "widths": [128, 128], "activation": activation},
        "data": {"name": "digits"},
        "optimizer": {"lr": 0.1, "steps": 1, "batch_size": 32, "sampling": "with_replacement"},
    }
    return flowlab.build(flowlab.parse_study(raw)).problem


def bench_torch(problem, hp, repeats: int) -> list[tuple[str, float, float, float]]:
    import torch

    from flowlab.flows import TorchOps, make_flow
    from flowlab.stochastic.noise import NoiseSource

    flow = make_flow("sme")
    ops = TorchOps(problem)
    noise = NoiseSource(0, dtype=torch.float32)
    theta = problem.theta0.clone()

    def step():
        with torch.no_grad():
            flow.step(0.0, (theta,), ops, hp, hp.lr, noise)

    def grad():
        problem.full_loss_and_grad(theta)

    return [("torch: SME.step (TorchOps) ÷ problem.full_loss_and_grad", *_ratio(step, grad, repeats))]


def bench_jax(problem, hp, repeats: int) -> list[tuple[str, float, float, float]]:
    import jax

    from flowlab.flows import make_flow
    from flowlab.jaxbackend.problem import jax_problem
    from flowlab.jaxbackend.sde import brownian, sde_kernel

    flow = make_flow("sme")
    ops = jax_problem(problem).ops
    theta = jax.numpy.asarray(problem.theta0.numpy(), dtype=ops.dtype)
    y0 = (theta,)

    def grad():
        jax.block_until_ready(ops.grad(theta))

    rows = []
    for fuse in (True, False):
        kernel = sde_kernel(flow, ops, hp, y0, fuse)
        path = brownian(0, kernel.noise_dim, ops.dtype)
        tag = "fused" if fuse else "fuse = false: drift + lineax diffusion"
        for n in (1, 20):
            def run(n=n, kernel=kernel, path=path):
                jax.block_until_ready(kernel.advance(y0, path, 0.0, n * hp.lr, n))

            what = "one jitted diffrax:Euler step" if n == 1 else f"per step of a {n}-step interval"
            rows.append((f"JAX: {what} ({tag}) ÷ jitted grad", *_ratio(run, grad, repeats, per=n)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowlab.bench sde", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--clock", choices=tuple(CLOCK), default="cpu")
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--part", choices=("torch", "jax", "all"), default="all")
    args = ap.parse_args(argv)
    _single_thread()  # before JAX is imported
    global _clock
    _clock = CLOCK[args.clock]
    import torch

    from flowlab.flows import Hyper

    problem = _problem(args.activation)
    hp = Hyper(lr=0.1, batch_size=32, sampling="with_replacement")
    print(f"# flowlab.bench sde — MLP 64-128-128-10 {args.activation}, digits ({problem.n} examples, "
          f"{problem.dim} parameters), float32, one thread; sme per_example (N = {problem.n}), batch 32 with "
          f"replacement, η = {hp.lr:g}; torch {torch.__version__}; clock: {args.clock}")
    rows = []
    if args.part in ("torch", "all"):
        rows += bench_torch(problem, hp, args.repeats)
    if args.part in ("jax", "all"):
        import jax

        print(f"# jax {jax.__version__}")
        rows += bench_jax(problem, hp, args.repeats)
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  ratio   (spread over {args.repeats} repeats)  grad ms")
    for (name, r, lo, hi), unit_ms in zip(rows, UNIT_MS):
        print(f"{name:<{width}}  {r:5.2f}   ({lo:.2f}..{hi:.2f})  {unit_ms:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
