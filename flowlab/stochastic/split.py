"""SGD's symmetry breaking split into its finite-step and noise parts (docs/theory.md#symmetry-under-noise).

For plain SGD the scale / rescale quantities move by Q_{k+1} = (1 − ηλ)²Q_k + η²|ĝ_A,k|² (rescale:
A1 − A2), so per unit time t = Σ η the forcing is η|ĝ_A|².  Over the batch draw,

    E |ĝ_A|² = |g_A|² + tr Σ_{B,A}        (g the full-batch gradient)

— a finite-step part η|g_A|² (what IGR and SME-2's drift reproduce) and a noise part η·tr Σ_{B,A}
(what only the SDEs reproduce).  :class:`NoiseSplitRecorder` records both at every recording time of
the discrete run (of every replica), beside the measured ``grad_term`` = |ĝ_A|²:

- ``grad_term_full`` ((sample,) time, symmetry_group): |g_A|² (rescale |g_A1|² − |g_A2|²);
- ``grad_term_noise`` ((sample,) time, symmetry_group): tr Σ_{B,A} under the run's sampling scheme
  (exact, from per-example gradients; for models whose examples are coupled, the unbiased estimate
  from ``split_batches`` sampled batch gradients).

Cost per recording time: one full gradient and N per-example gradients (per replica).  The
stochastic part adds it to runs with a stochastic flow and minibatches.
"""

from __future__ import annotations

from typing import Any

import torch

from ..recording import Point, Recorder, Rows, RunContext
from .laws import per_example_quads
from .noise import coupled, noise_constant

SPLIT_BATCHES = 8


class NoiseSplitRecorder(Recorder):
    """``grad_term_full`` and ``grad_term_noise`` of the discrete run (module docstring)."""

    def __init__(self, symmetry: Any, seed: int = 0):
        self.sym = symmetry
        self.seed = seed

    def seeds(self) -> dict[str, int]:
        return {"noise_split": self.seed}

    def variables(self, ctx: RunContext):
        G = len(self.sym.groups)
        tg = ("time", "symmetry_group")
        return [
            ctx.per_path("grad_term_full", tg, shape=(G,), attrs={
                "long_name": "|g_A|^2 of the full-batch gradient at the discrete run's theta (rescale: A1 - A2)"}),
            ctx.per_path("grad_term_noise", tg, shape=(G,), attrs={
                "long_name": "tr Sigma_{B,A}: the batch-gradient noise in group A (rescale: A1 - A2)",
                "identity": "E grad_term = grad_term_full + grad_term_noise over the batch draw",
                "method": "exact per-example gradients" if coupled(ctx.problem) is None else
                          f"unbiased estimate from {SPLIT_BATCHES} sampled batch gradients (coupled examples)"}),
        ]

    def start(self, ctx: RunContext) -> None:
        self.problem = ctx.problem
        opt = ctx.study.optimizer
        n = ctx.problem.n
        self.B = n if opt.batch_size in (None, "full") else int(opt.batch_size)
        scheme = opt.sampling if opt.sampling != "reshuffle" else "without_replacement"
        self.scheme = scheme
        self.c = noise_constant(scheme, self.B, n)
        self.coupled = coupled(ctx.problem) is not None
        self.generator = torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        from ..checkpoint import pack

        return {"generator": pack(self.generator)}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import unpack

        unpack(state["generator"], self.generator)

    def _one(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p, proj = self.problem, self.sym.projector
        g = p.full_grad(theta).clone()
        full = proj.quad(g)
        if not self.coupled:
            noise = (self.c / (self.B * p.n)) * per_example_quads(p, theta, proj)
        else:
            grads = []
            for _ in range(SPLIT_BATCHES):
                if self.scheme == "with_replacement":
                    idx = torch.randint(p.n, (self.B,), generator=self.generator)
                else:
                    idx = torch.randperm(p.n, generator=self.generator)[: self.B]
                grads.append(p.grad(theta, p.batch(idx.to(p.device))))
            d = torch.stack(grads)
            d = d - d.mean(0)
            noise = proj.quad(d).sum(0) / (SPLIT_BATCHES - 1)
        return full, noise

    def record(self, rows: Rows, point: Point) -> None:
        if point.index != 0 or point.label != "sgd":
            return
        theta = point.theta
        if theta.dim() == 1:
            full, noise = self._one(theta)
        else:
            pairs = [self._one(t) for t in theta]
            full, noise = torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        rows.put("grad_term_full", None, full)
        rows.put("grad_term_noise", None, noise)
