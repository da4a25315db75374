"""Continuous models of SGD (flows) and their integrators, run in lock step with discrete SGD.

- :mod:`.base`: the contracts (ops, :class:`Flow`, :class:`Integrator`, :class:`Hyper`).
- :mod:`.library`: the built-in flows (registry ``FLOWS``).
- :mod:`.integrators`: torchdiffeq methods and flowlab's fixed-step RK (registry ``INTEGRATORS``).
- :mod:`.follower`: :class:`FlowFollower`, one per ``[[flows]]`` entry of a study.
- :mod:`.orders`: the discretisation-error analysis (``flowlab orders``).
"""

from __future__ import annotations

from .. import register_registry
from ..recording import register_recorders
from ..runner import set_follower_factory
from . import integrators as _integrators  # noqa: F401,E402  (registers the integrators)
from . import library as _library  # noqa: F401,E402  (registers the flows)
from . import orders as _orders  # noqa: F401,E402  (registers `flowlab orders`)
from .base import Flow, FlowStopped, Hyper, Integrator, Ops, grad_l, hvp_l, loss_grad_l
from .follower import FlowFollower, build_followers, flow_recorders  # noqa: E402
from .registry import FLOWS, INTEGRATORS, make_flow, make_integrator
from .torch_ops import TorchOps  # noqa: E402

register_registry("flows", FLOWS)
register_registry("integrators", INTEGRATORS)
set_follower_factory(build_followers)
register_recorders(flow_recorders)

__all__ = ["FLOWS", "INTEGRATORS", "Flow", "FlowFollower", "FlowStopped", "Hyper", "Integrator", "Ops", "TorchOps",
           "build_followers", "grad_l", "hvp_l", "loss_grad_l", "make_flow", "make_integrator"]
