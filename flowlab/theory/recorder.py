"""Recording the theory's predictions beside the measured quantities.

``theory`` (variant, time, symmetry_group): the predicted quantity Q_pred(t_k) of every symmetry
group under each variant of :mod:`flowlab.theory.predict` (coordinate ``variant``), at the same rows
as ``quantity``.  The predictions are driven by the gradient terms of EVERY update (taken from the
symmetry recorder it is given, which runs before it, so nothing is computed twice) and, with momentum, by
the buffer's V_{k+1} = |v_{A,k+1}|² (rescale: A1 − A2).  Updates between two rows are buffered on the
device and applied when a chunk of rows is flushed (one host transfer; runs of equal η by matrix
powers), so the per-step cost is two small copies.

``flow_law`` (dynamics, time, symmetry_group): for each integrated flow with a law
(:mod:`flowlab.theory.flowlaws`), the quantity that law predicts along the flow's own trajectory,
integrated with the flow (NaN for ``sgd`` and flows without a law): :class:`FlowLawRecorder`.
"""

from __future__ import annotations

import numpy as np
import torch

from flowlab.recording import Point, Recorder, Rows, RunContext, StepInfo, Variable
from flowlab.symmetry.recorder import SymmetryRecorder

from .flowlaws import FlowLaws
from .predict import Predictor, variants_for


class TheoryRecorder(Recorder):
    """``theory`` of the discrete run, driven by ``symmetry``'s per-step gradient terms."""

    def __init__(self, symmetry: SymmetryRecorder, variants: tuple[str, ...] = (), capacity: int = 1024):
        self.sym = symmetry
        self.requested = variants
        self.capacity = capacity

    def variables(self, ctx: RunContext) -> list[Variable]:
        opt = ctx.study.optimizer
        self.variants = self.requested or variants_for(opt.momentum)
        self.momentum = opt.momentum > 0
        G = len(self.sym.groups)
        notes = {
            "long_name": "predicted quantity per symmetry group (Kunin et al. 2021)",
            "variants": "see flowlab.theory.predict",
        }
        if opt.nesterov:
            notes["exact_discrete"] = "NaN: Nesterov momentum has no closed two-scalar recursion"
        if opt.momentum > 0 and opt.dampening > 0:
            notes["oscillator"] = "assumes dampening 0 (the official code's model)"
        return [ctx.per_path("theory", ("variant", "time", "symmetry_group"), shape=(len(self.variants), G),
                             coords={"variant": np.array(self.variants, dtype=object)}, attrs=notes)]

    def start(self, ctx: RunContext) -> None:
        opt = ctx.study.optimizer
        proj = self.sym.projector
        q0 = proj.quantities(ctx.problem.theta0)
        kinds = proj.is_translation.logical_not().to(torch.int64)  # 0 translation, 1 otherwise
        self.samples = ctx.samples
        self.predictors = [Predictor(kinds, q0, opt.weight_decay, opt.momentum, opt.dampening, opt.nesterov,
                                     self.variants) for _ in range(self.samples)]
        n = len(self.sym.groups)
        lead = (self.samples,) if self.samples > 1 else ()
        self.G = torch.zeros(self.capacity, *lead, n, dtype=torch.float64, device=proj.device)
        self.W = torch.zeros_like(self.G) if self.momentum else None
        self.etas: list[float] = []
        self.marks: list[tuple[int, int]] = []  # (row in the current chunk, updates buffered before it)

    def before_update(self, info: StepInfo) -> None:
        if len(self.etas) == self.capacity:
            self._drain(self._rows)
        self.G[len(self.etas)].copy_(self.sym.G)

    def after_update(self, info: StepInfo) -> None:
        if self.W is not None:
            self.W[len(self.etas)].copy_(self.sym.projector.quad(info.buf))
        self.etas.append(info.lr)

    def _drain(self, rows: Rows | None) -> None:
        """Apply the buffered updates, writing the prediction at every marked row on the way."""
        n = len(self.etas)
        G = self.G[:n].cpu().numpy() if n else None
        W = self.W[:n].cpu().numpy() if (n and self.W is not None) else None
        done = 0
        for row, upto in self.marks:
            if upto > done:
                self._advance(done, upto, G, W)
                done = upto
            pred = [p.predict_numpy() for p in self.predictors]
            rows.put_at("theory", None, row, torch.from_numpy(pred[0] if self.samples == 1 else np.stack(pred)))
        if n > done:
            self._advance(done, n, G, W)
        self.marks.clear()
        self.etas.clear()

    def _advance(self, a: int, b: int, G, W) -> None:
        etas = self.etas[a:b]
        if self.samples == 1:
            self.predictors[0].advance(etas, G[a:b], None if W is None else W[a:b])
            return
        for s, p in enumerate(self.predictors):
            p.advance(etas, G[a:b, s], None if W is None else W[a:b, s])

    @property
    def predictor(self) -> Predictor:
        """The (first replica's) predictor."""
        return self.predictors[0]

    def before_flush(self, rows: Rows) -> None:
        self._drain(rows)

    def record(self, rows: Rows, point: Point) -> None:
        if point.index != 0:
            return
        self._rows = rows
        self.marks.append((rows.row, len(self.etas)))


class FlowLawRecorder(Recorder):
    """``flow_law`` of every flow composed with its law by ``laws`` (what the flow reports in
    ``point.extras["flow_law"]``)."""

    def __init__(self, laws: FlowLaws):
        self.laws = laws

    def variables(self, ctx: RunContext) -> list[Variable]:
        if not self.laws.composed:
            return []
        return [ctx.per_path("flow_law", ("dynamics", "time", "symmetry_group"), shape=(self.laws.forms.G,), attrs={
            "long_name": "quantity predicted by each flow's own law along its trajectory (flowlab.theory.flowlaws)",
            "flows": ", ".join(self.laws.composed)})]

    def record(self, rows: Rows, point: Point) -> None:
        value = point.extras.get("flow_law")
        if value is not None:
            rows.put("flow_law", point.index, value)
