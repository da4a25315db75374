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

How it is computed: the discrete run's vectors (ĝ_k of every update, θ_k and v_k at every row, and
v_{k+1} when a listener needs W) are *staged* — copied into a small device buffer of ``slots``
vectors each, a few µs per step — and turned into group scalars a whole block at a time, when the
buffer fills or the rows are flushed: one sparse × dense product per kind of term over the block
(:meth:`SymmetryProjector.apply` on a batch), the accumulator's recursion on the host, and one
write per variable.  On the small models most studies use, per-step Python and small-kernel overhead
is what recording costs, and this removes most of it; the numbers are those of the step-by-step
computation to round-off (tests/test_symmetry_run.py compares the two).  ``stage_bytes = 0`` (or a
model so large that two vectors do not fit) computes every step as it comes.  The flows' quantities
are computed at their records as they come (a flow's record costs integration anyway).

The symmetry part provides this recorder as the service ``symmetry``: its ``groups`` and
``projector`` (a :class:`~flowlab.symmetry.quantities.SymmetryProjector`) are there for the
recorders that are given it to reuse; a recorder that needs the per-update terms (the theory)
calls :meth:`SymmetryRecorder.listen` and is handed (steps, η, G, W) blocks as they are computed.
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

    #: staging buffers' budget on the device (bytes, all buffers together)
    stage_bytes: int = 24 * 2**20
    #: most vectors staged per block (measured best near 16: larger blocks leave the cache in the transposed copy)
    max_slots: int = 16

    def __init__(self, groups: Groups, projector: SymmetryProjector):
        self.groups = groups
        self.projector = projector
        self._listeners: list = []
        self.want_W = False

    @property
    def A(self) -> torch.Tensor:
        """The accumulator after the updates computed so far (float64, on the device)."""
        return torch.from_numpy(self._A.copy()).to(self.projector.device)

    def listen(self, callback, want_W: bool = False) -> None:
        """``callback(steps, etas, G, W)`` is called with every block of updates once its terms are
        computed, in order: ``steps`` (n,) int, ``etas`` (n,), ``G`` (n, *lead, groups) float64
        numpy, ``W`` the same for |v_{k+1}|² terms (``want_W``; with momentum) or None."""
        self._listeners.append(callback)
        self.want_W = self.want_W or want_W

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
        proj = self.projector
        dev = proj.device
        self.wd = float(ctx.study.optimizer.weight_decay)
        self.lead = (ctx.samples,) if ctx.samples > 1 else ()
        self._A = np.zeros((*self.lead, len(self.groups)))  # the accumulator after the settled updates
        self.decay = 1.0
        self.Q0: dict[int, torch.Tensor] = {}
        t = proj.is_translation
        nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        self._nan_on_translation = torch.where(t, nan, zero)
        self._nan_off_translation = torch.where(t, zero, nan)
        dtype = ctx.problem.theta0.dtype
        per = math.prod(self.lead) * proj.m * dtype.itemsize
        n_buffers = 2 + self.momentum + self.want_W  # ĝ, θ, [v], [v_{k+1}]
        self.slots = max(1, min(self.max_slots, self.stage_bytes // max(1, per * n_buffers)))
        shape = (self.slots, *self.lead, proj.m)
        self._g = torch.empty(shape, dtype=dtype, device=dev)
        self._th = torch.empty(shape, dtype=dtype, device=dev)
        self._v = torch.zeros(shape, dtype=dtype, device=dev) if self.momentum else None
        self._w = torch.zeros(shape, dtype=dtype, device=dev) if (self.want_W and self.momentum) else None
        self._reset_block()
        self._rows: Rows | None = None
        self._tbuf: dict[str, torch.Tensor] = {}
        self._plans: dict[str, tuple] = {}

    def _reset_block(self) -> None:
        self._n_g = 0  # staged ĝ vectors
        self._upd: list[tuple[int, int, float]] = []  # (step, ĝ slot, η) of each staged update
        self._rec: list[tuple[int, int, int, float]] = []  # (row, ĝ slot or -1, updates before it, decay)
        self._pending: tuple[int, int] | None = None  # (step, ĝ slot) staged by a row, for its update

    def state_dict(self) -> dict:
        from flowlab.checkpoint import pack

        if self._n_g or self._rec or self._upd:
            raise RuntimeError("checkpoint: the symmetry recorder has a staged block (take checkpoints after a flush)")
        return {"A": pack(self._A), "decay": self.decay, "Q0": pack(self.Q0)}

    def load_state_dict(self, state: dict) -> None:
        from flowlab.checkpoint import unpack

        self._A = unpack(state["A"])
        self.decay = float(state["decay"])
        self.Q0 = {int(k): v.to(self.projector.device) for k, v in unpack(state["Q0"]).items()}

    # ------------------------------------------------------------------ hooks
    def record(self, rows: Rows, point: Point) -> None:
        if point.index == 0 and point.label == "sgd":
            self._record_discrete(rows, point)
            return
        Q = self.projector.quantities(point.theta)
        rows.put("quantity", point.index, Q)
        Q0 = self.Q0.get(point.index)
        if Q0 is None:
            Q0 = self.Q0[point.index] = Q.clone()
        rows.put("drift", point.index, Q - Q0)

    def _record_discrete(self, rows: Rows, point: Point) -> None:
        if len(self._rec) == self.slots or (point.grad is not None and self._n_g == self.slots):
            self.settle(rows)
        self._rows = rows
        r = len(self._rec)
        self._th[r].copy_(point.theta)
        if self._v is not None:
            if point.buf is not None:
                self._v[r].copy_(point.buf)
            else:
                self._v[r].zero_()
        slot = -1
        if point.grad is not None:
            slot = self._n_g
            self._g[slot].copy_(point.grad)
            self._n_g += 1
            self._pending = (point.step, slot)
        self._rec.append((rows.row, slot, len(self._upd), self.decay))

    def before_update(self, info: StepInfo) -> None:
        if self._pending is not None and self._pending[0] == info.step:
            slot = self._pending[1]
        else:
            if self._n_g == self.slots:
                self.settle(self._rows)
            slot = self._n_g
            self._g[slot].copy_(info.grad)
            self._n_g += 1
        self._pending = None
        self._upd.append((info.step, slot, info.lr))
        self.decay *= 1.0 - info.lr * self.wd

    def after_update(self, info: StepInfo) -> None:
        if self._w is not None:
            self._w[len(self._upd) - 1].copy_(info.buf)

    def before_flush(self, rows: Rows) -> None:
        self.settle(rows)

    # ------------------------------------------------------------ the block
    def _compact(self, part: str) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(S_part restricted to the parameters it touches, those parameters' indices or None when
        it touches nearly all, their number); cached."""
        if part not in self._plans:
            p = self.projector
            S = p.matrix(part)
            if S is None:
                self._plans[part] = (None, None, 0)
            else:
                col = S.col_indices().to(torch.long)
                used = torch.unique(col)
                if used.numel() > 0.9 * p.m:
                    self._plans[part] = (S, None, p.m)
                else:
                    remap = torch.full((p.m,), -1, dtype=torch.long, device=col.device)
                    remap[used] = torch.arange(used.numel(), device=col.device)
                    Sc = p._csr(S.crow_indices(), remap[col].to(S.col_indices().dtype), S.values(),
                                (p.G, used.numel()))
                    self._plans[part] = (Sc, used, used.numel())
        return self._plans[part]

    def _batched(self, part: str, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """S_part @ (x ⊙ y) (``quad``; x ⊙ x without y) or S_part @ x (``lin``) over a block
        (n, *lead, m) → (n, *lead, groups), float64: the parameters the part touches are copied
        once, transposed and in float64, into a reused (u, n) buffer, and multiplied by the CSR
        matrix in one product."""
        lead = x.shape[:-1]
        p = self.projector
        S, used, u = self._compact(part)
        if S is None:
            return torch.zeros(*lead, p.G, dtype=torch.float64, device=p.device)
        x2 = x.reshape(-1, p.m)
        y2 = None if y is None else y.reshape(-1, p.m)
        if used is not None:
            x2 = x2.index_select(1, used)
            y2 = None if y2 is None else y2.index_select(1, used)
        n = x2.shape[0]
        buf = self._tbuf.get(part)
        if buf is None or buf.numel() < u * n:
            buf = self._tbuf[part] = torch.empty(u * max(n, self.slots * math.prod(self.lead)),
                                                 dtype=torch.float64, device=p.device)
        xt = buf[: u * n].view(u, n)  # contiguous
        xt.copy_(x2.t())
        if part == "quad":
            xt.mul_(xt if y2 is None else y2.t())
        return (S @ xt).t().reshape(*lead, p.G)

    def settle(self, rows: Rows | None) -> None:
        """Turn the staged block into rows and per-update terms (see the module docstring)."""
        n_g, n_u, n_r = self._n_g, len(self._upd), len(self._rec)
        if n_g == 0 and n_r == 0:
            return
        G = self._batched("quad", self._g[:n_g]) if n_g else None
        upd_slots = [u[1] for u in self._upd]
        G_upd = G[upd_slots] if n_u else None
        W = self._batched("quad", self._w[:n_u]) if (n_u and self._w is not None) else None
        # the accumulator A_{k+1} = (1 − η_kλ)² A_k + η_k² G_k, on the host in float64
        A_hist = np.empty((n_u + 1, *self._A.shape))
        A_hist[0] = self._A
        if n_u:
            G_np = G_upd.cpu().numpy()
            for i, (_, _, lr) in enumerate(self._upd):
                c = 1.0 - lr * self.wd
                np.multiply(A_hist[i], c * c, out=A_hist[i + 1])
                A_hist[i + 1] += (lr * lr) * G_np[i]
            self._A = A_hist[n_u].copy()
        if n_r:
            if rows is None:
                raise RuntimeError("symmetry recorder: rows staged without a row buffer")
            idx = [r[0] for r in self._rec]
            th = self._th[:n_r]
            Q = self._batched("lin", th) + self._batched("quad", th)
            if 0 not in self.Q0:
                self.Q0[0] = Q[0].clone()
            rows.put_rows("quantity", 0, idx, Q)
            rows.put_rows("drift", 0, idx, Q - self.Q0[0])
            with_g = [i for i, r in enumerate(self._rec) if r[1] >= 0]
            if with_g:
                rows.put_rows("grad_term", None, [idx[i] for i in with_g], G[[self._rec[i][1] for i in with_g]])
            acc = torch.from_numpy(A_hist[[r[2] for r in self._rec]]).to(self.projector.device)
            rows.put_rows("grad_term_acc", None, idx, acc)
            decay = torch.tensor([r[3] for r in self._rec], dtype=torch.float64, device=self.projector.device)
            rows.put_rows("weight_decay_factor", None, idx, decay)
            if self.momentum:
                v = self._v[:n_r]
                rows.put_rows("momentum_P", None, idx, self._batched("quad", th, v) + self._nan_on_translation)
                rows.put_rows("momentum_V", None, idx, self._batched("quad", v) + self._nan_on_translation)
                rows.put_rows("momentum_U", None, idx, self._batched("lin", v) + self._nan_off_translation)
        if n_u and self._listeners:
            steps = np.array([u[0] for u in self._upd], dtype=np.int64)
            etas = np.array([u[2] for u in self._upd])
            W_np = W.cpu().numpy() if W is not None else None
            for cb in self._listeners:
                cb(steps, etas, G_np, W_np)
        pending = self._pending
        self._reset_block()
        if pending is not None:  # a row's ĝ whose update has not been taken: keep it staged
            self._g[0].copy_(self._g[pending[1]])
            self._n_g = 1
            self._pending = (pending[0], 0)
