"""The torch ops object: full-batch derivatives of L on a :class:`flowlab.Problem` (counted)."""

from __future__ import annotations

import torch

from ..problem import GradGraph, Problem


class TorchOps:
    """``loss / grad / loss_and_grad / hvp / d3`` of the full-batch, unregularised loss L.

    Every result is a new tensor (solvers keep several of them); ``counts`` tallies the calls.

    Graph reuse: a vector field such as IGR's asks for ∇L(θ) and then H(θ)∇L at the same θ.  Once
    an ``hvp``/``d3`` call has followed a ``loss_and_grad`` call at the same θ (the same tensor,
    unmodified, with no other evaluation of the problem in between), later gradients are computed
    with their autograd graph kept, and HVPs / third-derivative contractions at that θ run only the
    extra backward passes (the forward and first backward pass are shared).  This needs the whole
    dataset in one chunk (``data.chunk_size`` unset); ``reuse_graph=False`` turns it off.  Once
    ``d3`` has been called, kept graphs run BatchNorm as primitive ops (torch's fused BatchNorm has
    wrong third derivatives).
    """

    backend = "torch"

    def __init__(self, problem: Problem, reuse_graph: bool | str = "auto"):
        self.problem = problem
        self.counts = {"loss": 0, "grad": 0, "hvp": 0, "d3": 0}
        self.reuse_graph = reuse_graph
        self._last: tuple | None = None  # (theta, version, stamp, graph or None)
        self.third_order = False  # set by the first d3 call: graphs then keep BatchNorm differentiable thrice

    def _stamp(self) -> int:
        return sum(self.problem.counts.values())

    def _remember(self, theta: torch.Tensor, graph: GradGraph | None) -> None:
        self._last = (theta, theta._version, self._stamp(), graph)

    def _same(self, theta: torch.Tensor) -> tuple | None:
        last = self._last
        if last is not None and last[0] is theta and last[1] == theta._version and last[2] == self._stamp():
            return last
        return None

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        self.counts["loss"] += 1
        self._last = None
        return self.problem.full_loss(theta)

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.counts["grad"] += 1
        if self.reuse_graph is True:
            res = self.problem.full_grad_graph(theta, third_order=self.third_order)
            if res is not None:
                self._remember(theta, res[2])
                return res[0], res[1]
        out = self.problem.full_loss_and_grad(theta)
        self._remember(theta, None)
        return out

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_and_grad(theta)[1]

    def _graph(self, theta: torch.Tensor) -> GradGraph | None:
        last = self._same(theta)
        if last is None:
            return None
        if last[3] is None and self.reuse_graph == "auto" and self.problem.chunk_size >= self.problem.n:
            self.reuse_graph = True  # the grad-then-HVP pattern: keep graphs from now on
        return last[3]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.counts["hvp"] += 1
        graph = self._graph(theta)
        if graph is not None:
            return graph.hvp(v)
        if self.problem.hvp_method == "auto" and self.problem.chunk_size >= self.problem.n:
            # double backward (the graph-reuse path) without timing the alternatives first
            self.problem.counts["hvp"] += 1
            out = self.problem.grad_graph(theta, self.problem.batch())[2].hvp(v, retain=False)
        else:
            out = self.problem.full_hvp(theta, v)
        self._last = None
        return out

    def d3(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.counts["d3"] += 1
        self.third_order = True
        graph = self._graph(theta)
        if graph is not None and graph.third_order_ok:
            return graph.d3(v)
        out = self.problem.full_d3(theta, v)
        self._last = None
        return out
