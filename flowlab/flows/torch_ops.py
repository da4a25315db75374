"""The torch ops object: full-batch derivatives of L on a :class:`flowlab.Problem` (counted)."""

from __future__ import annotations

import torch

from ..problem import Problem


class TorchOps:
    """``loss / grad / loss_and_grad / hvp / d3`` of the full-batch, unregularised loss L.

    Every result is a new tensor (solvers keep several of them); ``counts`` tallies the calls.
    """

    backend = "torch"

    def __init__(self, problem: Problem):
        self.problem = problem
        self.counts = {"loss": 0, "grad": 0, "hvp": 0, "d3": 0}

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        self.counts["loss"] += 1
        return self.problem.full_loss(theta)

    def loss_and_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.counts["grad"] += 1
        return self.problem.full_loss_and_grad(theta)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.loss_and_grad(theta)[1]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.counts["hvp"] += 1
        return self.problem.full_hvp(theta, v)

    def d3(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.counts["d3"] += 1
        return self.problem.full_d3(theta, v)
