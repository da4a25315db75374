"""Memory of a long run recording every step: resident set size along the run.

    python -m flowlab.bench memory [--steps 20000]

Streaming to zarr keeps memory flat: the RSS at the end should equal the RSS after the first
chunk of rows, whatever the number of steps.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch

import flowlab
from flowlab.recording import Recorder


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _RSS(Recorder):
    def __init__(self, every: int):
        self.every, self.samples = every, []

    def after_update(self, info) -> None:
        if (info.step + 1) % self.every == 0:
            self.samples.append((info.step + 1, rss_mb()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowlab.bench memory")
    ap.add_argument("--study", default="studies/quickstart.toml")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a study key, e.g. symmetry.enabled=false for the core recorders only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    study = flowlab.load_study(args.study, [f"optimizer.steps={args.steps}", "record.every=1", "flows=[]", *args.set])
    probe = _RSS(max(1, args.steps // 10))
    with tempfile.TemporaryDirectory() as out:
        ds = flowlab.Run(study, out, overwrite=True, recorders=[probe]).execute()
        rows, size = ds.sizes["time"], sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(f"{args.steps} steps recorded every step: {rows} rows, store {size / 1e6:.1f} MB on disk")
    for step, mb in probe.samples:
        print(f"  after step {step:>7d}: RSS {mb:7.1f} MB")
    first, last = probe.samples[0][1], probe.samples[-1][1]
    peak = max(mb for _, mb in probe.samples)
    print(f"RSS growth from step {probe.samples[0][0]} to {probe.samples[-1][0]}: {last - first:+.1f} MB "
          f"(peak {peak:.1f} MB; rows in flight to the writer: at most {4 + 1} chunks of {study.record.chunk})")
    return 0
