"""The stochastic part: the SDE flows (``sme``, ``sme2``, ``sme_momentum``), SVAG and the SGD
modified loss (entries of the flows part's ``flows`` registry), the ``flowlab:euler_maruyama``
integrator, and the ``[ensemble]`` section (K replicas of every stochastic dynamics in one run)."""

from __future__ import annotations

from ..parts import Part, Section
from .ensemble_config import parse_ensemble
from .integrator import EulerMaruyama
from .sde import BUILTIN_SDES


def _flows() -> dict:
    out = dict(BUILTIN_SDES)
    try:
        from .svag import BUILTIN_EXTRA
    except ImportError:  # pragma: no cover - while the module is being written
        BUILTIN_EXTRA = {}
    out.update(BUILTIN_EXTRA)
    return out


PART = Part(
    name="stochastic",
    sections=(Section("ensemble", parse_ensemble, default=None),),
    entries={"flows": _flows(), "integrators": {EulerMaruyama.name: EulerMaruyama}},
    doc="stochastic models of SGD (SME, SME-2, heavy-ball SME, SVAG, SGD modified loss), ensembles, weak errors",
)
