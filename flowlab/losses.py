"""Losses: ``loss(output, target) -> scalar`` (mean over the batch).

Built in: ``cross_entropy``, ``mse`` (½ the squared error summed over outputs, averaged over examples;
integer labels become one-hot targets) and ``identity`` (the mean of the model's output, for models such
as ``quadratic`` whose output already is the per-example loss).  A user loss is
``"package.module:function"`` with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Registry

LOSSES: Registry = Registry("loss")


@LOSSES.register("cross_entropy")
def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with integer class labels (mean over the batch)."""
    return F.cross_entropy(output, target)


@LOSSES.register("mse")
def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """½|f(x) − y|² summed over outputs, mean over the batch (labels become one-hot)."""
    if target.dtype == torch.long:
        target = F.one_hot(target, output.shape[-1]).to(output.dtype)
    diff = output.reshape(output.shape[0], -1) - target.reshape(target.shape[0], -1)
    return 0.5 * diff.pow(2).sum(1).mean()


@LOSSES.register("identity")
def identity(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of the model's output (the model computes its own per-example loss)."""
    return output.mean()
