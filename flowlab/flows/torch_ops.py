"""The torch ops object: full-batch derivatives of L on a :class:`flowlab.Problem` (counted)."""

from __future__ import annotations

import torch

from ..problem import GradGraph, Problem


class TorchOps:
    """``loss / grad / loss_and_grad / hvp / d3`` of the full-batch, unregularised loss L.

    Every result is a new tensor (solvers keep several of them); ``counts`` tallies the calls.

    HVPs: a vector field such as IGR's asks for ∇L(θ) and then H(θ)∇L at the same θ.  Once an
    ``hvp``/``d3`` call has followed a ``loss_and_grad`` call at the same θ (the same tensor,
    unmodified, with no other evaluation of the problem in between), later gradients keep what the
    HVP needs, and HVPs at that θ run only the extra passes:

    - with the R-operator engine (:mod:`flowlab.flows.rop`) when the model is a supported layer
      chain and the loss cross-entropy or MSE: the gradient by its own passes, each HVP by one
      R-forward and one R-backward pass;
    - otherwise (and for ``d3``, which the engine does not do) with the gradient's autograd graph
      kept; once ``d3`` has been called, kept graphs run BatchNorm as primitive ops (torch's fused
      BatchNorm has wrong third derivatives).

    Both need the whole dataset in one chunk (``data.chunk_size`` unset); ``reuse_graph=False``
    turns reuse off, ``engine=False`` the R-operator engine.
    """

    backend = "torch"

    def __init__(self, problem: Problem, reuse_graph: bool | str = "auto", engine: bool = True):
        self.problem = problem
        self.counts = {"loss": 0, "grad": 0, "hvp": 0, "d3": 0}
        self.reuse_graph = reuse_graph
        self._last: tuple | None = None  # (theta, version, stamp, kept state or None)
        self.third_order = False  # set by the first d3 call
        self._engine_state = None if engine else False

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The computation paths chosen so far (graph reuse, third-order graphs, whether the R-op
        engine failed) and the counts: a resumed run takes the same paths, hence the same rounding."""
        return {"counts": dict(self.counts), "reuse_graph": self.reuse_graph, "third_order": self.third_order,
                "engine_failed": self._engine_state is False}

    def load_state_dict(self, state: dict) -> None:
        self.counts.clear()
        self.counts.update({k: int(v) for k, v in state["counts"].items()})
        self.reuse_graph, self.third_order = state["reuse_graph"], bool(state["third_order"])
        if state["engine_failed"]:
            self._engine_state = False
        self._last = None

    # ------------------------------------------------------------------ helpers
    def _stamp(self) -> int:
        return sum(self.problem.counts.values())

    def _remember(self, theta: torch.Tensor, kept) -> None:
        self._last = (theta, theta._version, self._stamp(), kept)

    def _same(self, theta: torch.Tensor) -> tuple | None:
        last = self._last
        if last is not None and last[0] is theta and last[1] == theta._version and last[2] == self._stamp():
            return last
        return None

    def _one_chunk(self) -> bool:
        return self.problem.chunk_size >= self.problem.n

    def engine(self):
        """The R-operator engine for this problem, or None (unsupported model/loss, several chunks,
        d3 in use, or turned off)."""
        if self._engine_state is None:
            from .rop import engine_for

            self._engine_state = engine_for(self.problem) or False
        return None if (self._engine_state is False or self.third_order) else self._engine_state

    def _kept(self, theta: torch.Tensor):
        last = self._same(theta)
        if last is None:
            return None
        if last[3] is None and self.reuse_graph == "auto" and self._one_chunk():
            self.reuse_graph = True  # the grad-then-HVP pattern: keep what HVPs need from now on
        return last[3]

    # ---------------------------------------------------------------------- ops
    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        self.counts["loss"] += 1
        self._last = None
        return self.problem.full_loss(theta)

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.counts["grad"] += 1
        if self.reuse_graph is True and self._one_chunk():
            eng = self.engine()
            if eng is not None:
                try:
                    loss, g = eng.grad(theta, self.problem.batch())
                    self._remember(theta, eng)
                    return loss, g
                except NotImplementedError:
                    self._engine_state = False
            res = self.problem.full_grad_graph(theta, third_order=self.third_order)
            if res is not None:
                self._remember(theta, res[2])
                return res[0], res[1]
        out = self.problem.full_loss_and_grad(theta)
        self._remember(theta, None)
        return out

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_and_grad(theta)[1]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.counts["hvp"] += 1
        kept = self._kept(theta)
        if kept is not None:
            return kept.hvp(v)
        self._last = None
        if self._one_chunk():
            eng = self.engine()
            if eng is not None:
                try:
                    return eng.standalone_hvp(theta, self.problem.batch(), v)
                except NotImplementedError:
                    self._engine_state = False
            if self.problem.hvp_method == "auto":  # double backward, without timing alternatives first
                self.problem.counts["hvp"] += 1
                return self.problem.grad_graph(theta, self.problem.batch())[2].hvp(v, retain=False)
        return self.problem.full_hvp(theta, v)

    def d3(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.counts["d3"] += 1
        self.third_order = True
        kept = self._kept(theta)
        if isinstance(kept, GradGraph) and kept.third_order_ok:
            return kept.d3(v)
        out = self.problem.full_d3(theta, v)
        self._last = None
        return out

    # ------------------------------------------- per-example weights and batches (stochastic flows)
    @property
    def n(self) -> int:
        """The number of examples N."""
        return self.problem.n

    def weighted_loss_grad(self, theta: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L(θ), ∇_θ Σ_i w_i ℓ_i(θ)) in one backward pass (:mod:`flowlab.stochastic.noise`)."""
        from ..stochastic.noise import weighted_loss_grad

        self.counts["grad"] += 1
        self._last = None
        return weighted_loss_grad(self.problem, theta, w)

    def batch_loss_grad(self, theta: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L̂, ∇L̂) on the examples ``index``."""
        from ..stochastic.noise import batch_loss_grad

        self.counts["grad"] += 1
        self._last = None
        return batch_loss_grad(self.problem, theta, index)
