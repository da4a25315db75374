"""The stochastic part: the SDE flows (``sme``, ``sme2``, ``sme_momentum``), SVAG and the SGD
modified loss (entries of the flows part's ``flows`` registry), the ``flowlab:euler_maruyama``
integrator, and the ``[ensemble]`` section (K replicas of every stochastic dynamics in one run)."""

from __future__ import annotations

from typing import Any

from ..parts import Contribution, Part, Section, Setup
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


def setup(setup: Setup, symmetry: Any = None) -> Contribution | None:
    """With a stochastic flow, minibatches and the symmetry recorder: record SGD's finite-step / noise
    split of its symmetry breaking (:mod:`flowlab.stochastic.split`)."""
    study = setup.study
    if symmetry is None or study.optimizer.full_batch:
        return None
    reg = study.registry("flows")
    names = [s.name for s in study.flows] + [getattr(getattr(f, "flow", None), "name", "") for f in setup.flows]
    if not any(getattr(reg[n] if n in reg else None, "stochastic", False) for n in names if n):
        return None
    from ..seeds import derive_seed
    from .split import NoiseSplitRecorder

    return Contribution(recorders=[NoiseSplitRecorder(symmetry, derive_seed(study.study.seed, "noise-split"))])


def report(request: Any) -> list:
    from .report import report_ensemble

    return report_ensemble(request)


PART = Part(
    name="stochastic",
    sections=(Section("ensemble", parse_ensemble, default=None),),
    entries={"flows": _flows(), "integrators": {EulerMaruyama.name: EulerMaruyama}},
    wants=("symmetry",),
    setup=setup,
    report=report,
    doc="stochastic models of SGD (SME, SME-2, heavy-ball SME, SVAG, SGD modified loss), ensembles, weak errors",
)
