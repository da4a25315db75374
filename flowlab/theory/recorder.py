"""Recording the theory's predictions beside the measured quantities.

``theory`` (variant, time, symmetry_group): the predicted quantity Q_pred(t_k) of every symmetry
group under each variant of :mod:`flowlab.theory.predict` (coordinate ``variant``), at the same rows
as ``quantity``.  The predictions are driven by the gradient terms of EVERY update (taken from the
symmetry recorder it is given, which runs before it, so nothing is computed twice) and, with momentum, by
the buffer's V_{k+1} = |v_{A,k+1}|² (rescale: A1 − A2).  Updates between two rows are buffered on the
device by the symmetry recorder, handed over a block at a time (:meth:`SymmetryRecorder.listen`) and
applied when a chunk of rows is flushed (runs of equal η by matrix powers; every marked row's
prediction in one vectorised evaluation), so the theory costs nothing per step.

``flow_law`` (dynamics, time, symmetry_group): for each integrated flow with a law
(:mod:`flowlab.theory.flowlaws`), the quantity that law predicts along the flow's own trajectory,
integrated with the flow (NaN for ``sgd`` and flows without a law): :class:`FlowLawRecorder`.
"""

from __future__ import annotations

import numpy as np
import torch

from flowlab.recording import Point, Recorder, Rows, RunContext, Variable
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
        if not getattr(self, "_listening", False):  # before the symmetry recorder's start: it stages W for us
            self.sym.listen(self._terms, want_W=self.momentum)
            self._listening = True
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
        self.blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.n_pending = 0
        self.marks: list[tuple[int, int]] = []  # (row in the current chunk, step k of that row)
        self._rows: Rows | None = None

    def _terms(self, steps: np.ndarray, etas: np.ndarray, G: np.ndarray, W: np.ndarray | None) -> None:
        """A block of updates from the symmetry recorder (steps in order, none skipped)."""
        self.blocks.append((steps, etas, G, W if self.momentum else None))
        self.n_pending += len(steps)
        if self.n_pending >= self.capacity:
            self._drain(self._rows)

    def _drain(self, rows: Rows | None) -> None:
        """Apply the delivered updates, writing the prediction at every marked row on the way."""
        if self.blocks:
            steps = np.concatenate([b[0] for b in self.blocks])
            etas = np.concatenate([b[1] for b in self.blocks])
            G = np.concatenate([b[2] for b in self.blocks])
            W = np.concatenate([b[3] for b in self.blocks]) if self.blocks[0][3] is not None else None
        else:
            steps, etas, G, W = np.zeros(0, np.int64), np.zeros(0), None, None
        first = self.predictors[0].k
        if len(steps) and steps[0] != first:
            raise RuntimeError(f"theory: updates from step {steps[0]} delivered after step {first}")
        at = [k - first for _, k in self.marks]
        total = len(steps)
        if any(a < 0 or a > total for a in at):
            raise RuntimeError("theory: a marked row lies outside the delivered updates")
        # Advance to the last marked row, or to the last global multiple of ``capacity``: never to
        # wherever a flush happened to fall, so that the runs of equal η (and their rounding) are the
        # same however the run was flushed, checkpointed or resumed; the rest waits for the next drain.
        upto = max(max(at, default=0), ((first + total) // self.capacity) * self.capacity - first, 0)
        upto = min(upto, total)
        etas_l = etas[:upto].tolist()
        Gu = None if G is None else G[:upto]
        Wu = None if W is None else W[:upto]
        if self.samples == 1:
            preds = self.predictors[0].advance_marked(etas_l, Gu, Wu, at)
        else:
            per = [p.advance_marked(etas_l, None if Gu is None else Gu[:, s], None if Wu is None else Wu[:, s], at)
                   for s, p in enumerate(self.predictors)]
            preds = np.stack(per, axis=1)  # (marks, sample, variant, group)
        if self.marks:
            rows.put_rows("theory", None, [m[0] for m in self.marks], torch.from_numpy(preds))
        self.marks.clear()
        self.blocks.clear()
        self.n_pending = total - upto
        if upto < total:
            self.blocks.append((steps[upto:], etas[upto:], G[upto:], None if W is None else W[upto:]))

    def state_dict(self) -> dict:
        from flowlab.checkpoint import pack

        if self.marks:
            raise RuntimeError("checkpoint: the theory recorder has undrained rows (take checkpoints after a flush)")
        return {"predictors": [pack({"s_tr": p.s_tr, "s_sc": p.s_sc, "E": dict(p.E), "k": p.k})
                               for p in self.predictors],
                "blocks": [pack(list(b)) for b in self.blocks], "n_pending": self.n_pending}

    def load_state_dict(self, state: dict) -> None:
        from flowlab.checkpoint import unpack

        for p, st in zip(self.predictors, state["predictors"]):
            st = unpack(st)
            p.s_tr, p.s_sc, p.E, p.k = st["s_tr"], st["s_sc"], dict(st["E"]), int(st["k"])
        self.blocks = [tuple(unpack(b)) for b in state["blocks"]]
        self.n_pending = int(state["n_pending"])

    @property
    def predictor(self) -> Predictor:
        """The (first replica's) predictor."""
        return self.predictors[0]

    def before_flush(self, rows: Rows) -> None:
        self.sym.settle(rows)
        self._drain(rows)

    def record(self, rows: Rows, point: Point) -> None:
        if point.index != 0:
            return
        self._rows = rows
        self.marks.append((rows.row, point.step))


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
