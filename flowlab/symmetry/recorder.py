"""Recording the symmetry quantities of every method, and the discrete run's gradient terms.

Variables (a contract; ``symmetry_group`` dim with coordinates ``group_kind``, ``group_layer``,
``group_size``, plus ``group_unit`` (channel / column, −1 for a bias vector or whole layer) and
``group_scale`` (the quantity's natural size at θ0: Σ_A|θ_i| for translation, |θ_A|² or
|θ_A1|² + |θ_A2|²)):

- ``quantity`` (dynamics, time, symmetry_group): ⟨θ_A,1⟩ | |θ_A|² | |θ_A1|² − |θ_A2|² at θ(t).
- ``drift`` (dynamics, time, symmetry_group): Q(t) − Q(0).

For the discrete run (no dynamics dim), row k (θ_k before update k; ĝ_k the batch gradient update k
applies, without weight decay; η_k, λ):

- ``grad_term`` (time, symmetry_group): G_k = 0 | |ĝ_A,k|² | |ĝ_A1,k|² − |ĝ_A2,k|².
- ``grad_term_acc`` (time, symmetry_group): A_k, with A_0 = 0 and A_{k+1} = (1 − η_kλ)² A_k + η_k² G_k,
  updated at EVERY step (so a coarse ``record.every`` loses nothing).  For plain SGD with coupled
  L2 the exact discrete identity (docs/theory.md#plain-sgd) is, for scale and rescale groups,
  Q_k = c_k² Q_0 + A_k, and for translation Q_k = c_k Q_0, with
- ``weight_decay_factor`` (time): c_k = Π_{j<k} (1 − η_jλ).

With momentum (``optimizer.momentum > 0``), from the buffer v_k at row k (v_0 = 0):

- ``momentum_P`` (time, symmetry_group): ⟨θ_A, v_A⟩ (rescale: ⟨θ_A1, v_A1⟩ − ⟨θ_A2, v_A2⟩); NaN for translation.
- ``momentum_V`` (time, symmetry_group): |v_A|² (rescale: |v_A1|² − |v_A2|²); NaN for translation.
- ``momentum_U`` (time, symmetry_group): ⟨v_A, 1⟩ for translation; NaN elsewhere.

For heavy ball without dampening (docs/theory.md#heavy-ball):
Q_{k+1} = (1−2ηλ)Q_k − 2ηβP_k + η²V_{k+1},  P_{k+1} = βP_k + λQ_k − ηV_{k+1};
S_{k+1} = S_k − ηU_{k+1},  U_{k+1} = βU_k + λS_k.

The symmetry part provides this recorder as the service ``symmetry``: its ``groups``, ``projector``
(a :class:`~flowlab.symmetry.quantities.SymmetryProjector`), ``G`` (the gradient terms of the update
being taken, set in ``before_update``) and ``A`` (the accumulator) are there for the recorders that
are given it (the theory's) to reuse.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from flowlab.recording import Point, Recorder, Rows, RunContext, StepInfo, Variable

from .groups import Groups
from .quantities import SymmetryProjector


class SymmetryRecorder(Recorder):
    """Quantities of every method at each record; gradient terms of the discrete run at every step."""

    def __init__(self, groups: Groups, projector: SymmetryProjector):
        self.groups = groups
        self.projector = projector
        self.G: torch.Tensor | None = None
        self.A: torch.Tensor | None = None

    def _coords(self, ctx: RunContext) -> dict:
        coords = self.groups.coords()
        scale = self.projector.scales(ctx.problem.theta0).cpu().numpy()
        coords["group_scale"] = ("symmetry_group", scale)
        return coords

    def variables(self, ctx: RunContext) -> list[Variable]:
        G = len(self.groups)
        self.momentum = ctx.study.optimizer.momentum > 0
        skipped = json.dumps([{"layer": s.layer, "kind": s.kind, "reason": s.reason} for s in self.groups.skipped])
        tg = ("time", "symmetry_group")
        out = [
            ctx.per_path("quantity", ("dynamics", *tg), shape=(G,), coords={"symmetry_group": np.arange(G)},
                     dim_coords=self._coords(ctx),
                     attrs={"long_name": "conserved quantity per symmetry group",
                            "formula": "translation <θ_A,1>; scale |θ_A|^2; rescale |θ_A1|^2 - |θ_A2|^2 (A1 incoming)",
                            "skipped": skipped}),
            ctx.per_path("drift", ("dynamics", *tg), shape=(G,), attrs={"long_name": "Q(t) - Q(0)"}),
            ctx.per_path("grad_term", tg, shape=(G,),
                     attrs={"long_name": "gradient term of the update taken at this row",
                            "formula": "0 | |g_A|^2 | |g_A1|^2 - |g_A2|^2 (applied batch gradient, no weight decay)"}),
            ctx.per_path("grad_term_acc", tg, shape=(G,),
                     attrs={"long_name": "accumulated gradient term before this row's update",
                            "formula": "A_0 = 0; A_{k+1} = (1 - lr_k wd)^2 A_k + lr_k^2 grad_term_k (every step)"}),
            Variable("weight_decay_factor", ("time",),
                     attrs={"long_name": "prod_{j<k} (1 - lr_j wd)",
                            "identity": "plain SGD: Q_k = c_k^2 Q_0 + A_k (scale, rescale); Q_k = c_k Q_0 (translation)"}),
        ]
        if self.momentum:
            out += [
                ctx.per_path("momentum_P", tg, shape=(G,), attrs={"long_name": "<θ_A, v_A> (rescale: A1 - A2); NaN for translation"}),
                ctx.per_path("momentum_V", tg, shape=(G,), attrs={"long_name": "|v_A|^2 (rescale: A1 - A2); NaN for translation"}),
                ctx.per_path("momentum_U", tg, shape=(G,), attrs={"long_name": "<v_A, 1> for translation; NaN elsewhere"}),
            ]
        return out

    def start(self, ctx: RunContext) -> None:
        dev = self.projector.device
        self.wd = float(ctx.study.optimizer.weight_decay)
        lead = (ctx.samples,) if ctx.samples > 1 else ()
        self.A = torch.zeros(*lead, len(self.groups), dtype=torch.float64, device=dev)
        self.decay = 1.0
        self.Q0: dict[int, torch.Tensor] = {}
        self._cached: tuple[int, torch.Tensor] | None = None
        t = self.projector.is_translation
        nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        self._nan_on_translation = torch.where(t, nan, zero)
        self._nan_off_translation = torch.where(t, zero, nan)
        self._zeros = torch.zeros(*lead, self.projector.m, dtype=torch.float64, device=dev)

    def record(self, rows: Rows, point: Point) -> None:
        proj = self.projector
        Q = proj.quantities(point.theta)
        rows.put("quantity", point.index, Q)
        Q0 = self.Q0.get(point.index)
        if Q0 is None:
            Q0 = self.Q0[point.index] = Q.clone()
        rows.put("drift", point.index, Q - Q0)
        if point.index != 0 or point.label != "sgd":
            return
        if point.grad is not None:
            G = proj.grad_terms(point.grad)
            self._cached = (point.step, G)
            rows.put("grad_term", None, G)
        rows.put("grad_term_acc", None, self.A)
        rows.put("weight_decay_factor", None, self.decay)
        if self.momentum:
            v = point.buf if point.buf is not None else self._zeros
            P, V, U = proj.momentum_terms(point.theta, v)
            rows.put("momentum_P", None, P + self._nan_on_translation)
            rows.put("momentum_V", None, V + self._nan_on_translation)
            rows.put("momentum_U", None, U + self._nan_off_translation)

    def before_update(self, info: StepInfo) -> None:
        if self._cached is not None and self._cached[0] == info.step:
            G = self._cached[1]
        else:
            G = self.projector.grad_terms(info.grad)
        self._cached = None
        self.G = G
        c = 1.0 - info.lr * self.wd
        self.A.mul_(c * c).add_(G, alpha=info.lr * info.lr)
        self.decay *= c
