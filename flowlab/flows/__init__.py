"""Continuous models of SGD (flows) and their integrators, run in lock step with discrete SGD.

- :mod:`.base`: the contracts (ops, :class:`Flow`, :class:`Law`, :class:`Integrator`, :class:`Hyper`).
- :mod:`.library`: the built-in flows (registry ``FLOWS``).
- :mod:`.integrators`: torchdiffeq methods and flowlab's fixed-step RK (registry ``INTEGRATORS``).
- :mod:`.follower`: :class:`FlowFollower`, one per continuous model of a run; :class:`Continuous`,
  a flow and its integrator given as objects.
- :mod:`.orders`: the discretisation-error analysis (``flowlab orders``).
- :mod:`.part`: what this package adds to flowlab (:mod:`flowlab.parts`).

Importing it registers nothing anywhere: the flows part declares its section, registries and
command, and a run asks it for its followers.
"""

from __future__ import annotations

from .base import Flow, FlowStopped, Hyper, Integrator, Law, Ops, grad_l, hvp_l, loss_grad_l
from .config import FlowSpec, FlowsSection, default_label
from .follower import Continuous, FlowFollower, build_followers
from .library import (
    GradientFlow,
    ModifiedLoss,
    ModifiedSecondOrder,
    ModifiedTemporal,
    MomentumFirstOrder,
    MomentumModified,
    MomentumSecondOrder,
)
from .registry import FLOWS, INTEGRATORS, integrator, make_flow, make_integrator
from .torch_ops import TorchOps

__all__ = ["FLOWS", "INTEGRATORS", "Continuous", "Flow", "FlowFollower", "FlowSpec", "FlowStopped", "FlowsSection",
           "GradientFlow", "Hyper", "Integrator", "Law", "ModifiedLoss", "ModifiedSecondOrder", "ModifiedTemporal",
           "MomentumFirstOrder", "MomentumModified", "MomentumSecondOrder", "Ops", "TorchOps", "build_followers",
           "default_label", "grad_l", "hvp_l", "integrator", "loss_grad_l", "make_flow", "make_integrator"]
