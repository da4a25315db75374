"""What a run with a central flow records beside the usual variables.

Per dynamics (NaN for the dynamics that are not central flows):

- ``critical_directions`` (dynamics, time): the rank of X — directions held at the edge 2/η;
- ``sigma_trace`` (dynamics, time): tr Σ, the variance of GD's oscillation the flow predicts;
- ``predicted_loss`` (dynamics, time): L(θ) + tr(Σ)/η, GD's time-averaged loss as predicted;
- ``distance_midpoint`` (dynamics, time): |θ(t_k) − θ*_k|, θ*_k = (θ_{k−1} + 2θ_k + θ_{k+1})/4 the
  discrete run's "second-order midpoint" (Cohen et al. 2025: GD's iterates averaged over its period-2
  oscillation; needs plain GD, NaN with momentum, at the first and the last row, and in ensembles).

Of the discrete run:

- ``loss_window_mean`` (time): its loss averaged over the W = ``window`` steps k − W + 1 … k (a
  trailing window: compare it with the flows at step k − (W − 1)/2); NaN for k < W − 1.

With symmetry groups (the symmetry part's service), per central flow and group (docs/theory.md,
"The central flow" — symmetry):

- ``central_term`` (dynamics, time, symmetry_group): the extra term's part of dQ/dt, measured from
  the field: −½⟨1_A, ∇⟨H, Σ⟩⟩ (translation), −⟨θ_A, ∇⟨H, Σ⟩⟩ (scale; rescale: A1 part − A2 part);
- ``central_law`` (dynamics, time, symmetry_group): the same term as the law derived there predicts
  it: 0 (translation), 2 tr(Π_A H Σ) = 2 Σ_ij X_ij ⟨u_j, (H u_i)⟩_A (scale; rescale: A1 − A2).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
import torch

from ..recording import Point, Recorder, Rows, RunContext, StepInfo, Variable


class CentralFlowRecorder(Recorder):
    """The central flow's extras and GD's window averages (module docstring)."""

    def __init__(self, window: int = 11, symmetry: Any = None):
        self.window = int(window)
        self.symmetry = symmetry

    def variables(self, ctx: RunContext) -> list[Variable]:
        dt = ("dynamics", "time")
        W = self.window
        out = [
            Variable("critical_directions", dt, attrs={
                "long_name": "central flow: directions held at the edge of stability (rank of X, Σ = U X Uᵀ)"}),
            Variable("sigma_trace", dt, attrs={"long_name": "central flow: tr Σ, the covariance of GD's oscillation "
                                                            "it predicts"}),
            Variable("predicted_loss", dt, attrs={"long_name": "central flow: L(θ) + tr(Σ)/η, GD's time-averaged loss "
                                                               "as predicted (Cohen et al. 2025)"}),
            Variable("distance_midpoint", dt, attrs={
                "long_name": "|θ(t_k) − θ*_k|, θ*_k = (θ_{k−1} + 2θ_k + θ_{k+1})/4 of the discrete run",
                "note": "plain GD only (NaN with momentum, at the first and last rows, in ensembles)"}),
            Variable("loss_window_mean", ("time",), attrs={
                "long_name": f"the discrete run's loss averaged over the {W} steps k−{W - 1}…k",
                "window": W, "centre": f"step k − {(W - 1) / 2:g}: compare with the flows there",
                "note": "NaN for k < window − 1"}),
        ]
        if self.symmetry is not None:
            tg = ("dynamics", "time", "symmetry_group")
            G = len(self.symmetry.groups)
            out += [
                Variable("central_term", tg, shape=(G,), attrs={
                    "long_name": "central flow: its extra term's part of dQ/dt, measured from the field",
                    "formula": "translation -<1_A, grad<H,Σ>>/2; scale -<θ_A, grad<H,Σ>>; rescale A1 - A2"}),
                Variable("central_law", tg, shape=(G,), attrs={
                    "long_name": "central flow: the same term by the symmetry law (docs/theory.md)",
                    "formula": "translation 0; scale 2 tr(P_A H Σ); rescale 2 tr(P_A1 H Σ) - 2 tr(P_A2 H Σ)"}),
            ]
        return out

    def start(self, ctx: RunContext) -> None:
        self.lrs = np.asarray(ctx.lrs, dtype=np.float64)
        self.wd = float(ctx.study.optimizer.weight_decay)
        self.plain = ctx.study.optimizer.momentum == 0 and ctx.samples <= 1
        self.single = ctx.samples <= 1
        self.losses: deque = deque(maxlen=max(self.window - 1, 1))
        self.prev: torch.Tensor | None = None
        self.mid: torch.Tensor | None = None
        self.mid_step = -1

    def state_dict(self) -> dict:
        from ..checkpoint import pack

        return {"losses": pack(list(self.losses)), "prev": pack(self.prev)}

    def load_state_dict(self, state: dict) -> None:
        from ..checkpoint import unpack

        self.losses.clear()
        self.losses.extend(unpack(state["losses"]))
        self.prev = unpack(state["prev"])

    def before_update(self, info: StepInfo) -> None:
        if not self.single:
            return
        if self.prev is None:
            self.prev = info.theta.detach().clone()
        else:
            self.prev.copy_(info.theta)
        if self.window > 1:
            self.losses.append(info.loss.detach().clone())

    def _discrete(self, rows: Rows, point: Point) -> None:
        self.mid, self.mid_step = None, point.step
        if not self.single or point.loss is None:
            return
        if self.window == 1:
            rows.put("loss_window_mean", None, point.loss)
        elif len(self.losses) == self.window - 1:
            rows.put("loss_window_mean", None, (sum(self.losses) + point.loss) / self.window)
        k = point.step
        if not self.plain or self.prev is None or k >= len(self.lrs) or point.grad is None or k == 0:
            return
        th = point.theta
        d = point.grad + self.wd * th if self.wd else point.grad
        nxt = th - float(self.lrs[k]) * d
        self.mid = 0.25 * (self.prev + 2.0 * th + nxt)
        rows.put("distance_midpoint", point.index, torch.linalg.vector_norm(th - self.mid))

    def record(self, rows: Rows, point: Point) -> None:
        if point.index == 0 and point.label == "sgd":
            self._discrete(rows, point)
            return
        if self.mid is not None and self.mid_step == point.step and point.theta.dim() == 1:
            rows.put("distance_midpoint", point.index, torch.linalg.vector_norm(point.theta - self.mid))
        ev = point.extras.get("central") if point.extras else None
        if ev is None or ev.failure:
            return
        rows.put("critical_directions", point.index, float(ev.critical_directions))
        rows.put("sigma_trace", point.index, ev.sigma_trace)
        rows.put("predicted_loss", point.index, ev.predicted_loss)
        if self.symmetry is not None:
            term, law = symmetry_terms(self.symmetry.projector, point.theta, ev)
            rows.put("central_term", point.index, term)
            rows.put("central_law", point.index, law)


def symmetry_terms(proj: Any, theta: torch.Tensor, ev: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(measured, law) per group: the central term's part of dQ/dt from the field, and as the law
    predicts it (module docstring); both float64 (G,)."""
    c = ev.c
    is_t = proj.is_translation
    measured = torch.where(is_t, -0.5 * proj.lin(c), -proj.quad(theta, c))
    law = torch.zeros(proj.G, dtype=torch.float64, device=proj.device)
    X = ev.X
    for i in range(ev.k):
        for j in range(ev.k):
            if X[i, j] != 0.0 and math.isfinite(X[i, j]):
                law = law + (2.0 * float(X[i, j])) * proj.quad(ev.HU[:, i], ev.U[:, j])
    law = torch.where(is_t, torch.zeros_like(law), law)
    return measured, law


__all__ = ["CentralFlowRecorder", "symmetry_terms"]
