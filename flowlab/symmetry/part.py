"""The symmetry part: the ``[symmetry]`` section, the commands ``flowlab symmetries`` and
``flowlab check``, the drift tables of ``flowlab report``, and in every run the
:class:`~flowlab.symmetry.recorder.SymmetryRecorder` of the study's groups — provided as the service
``symmetry`` to parts that reuse its projector and per-step terms (the theory)."""

from __future__ import annotations

from ..parts import Contribution, Part, Section, Setup
from .build import study_groups
from .cli import COMMANDS, report_drift
from .config import parse_symmetry
from .recorder import SymmetryRecorder


def setup(setup: Setup) -> Contribution | None:
    if not setup.study.section("symmetry").enabled:
        return None
    groups = study_groups(setup.study, setup.problem)
    if len(groups) == 0:
        return None
    rec = SymmetryRecorder(groups, groups.projector(setup.problem.device))
    return Contribution(recorders=[rec], provides={"symmetry": rec})


PART = Part(
    name="symmetry",
    sections=(Section("symmetry", parse_symmetry),),
    commands=COMMANDS,
    provides=("symmetry",),
    setup=setup,
    report=report_drift,
    doc="symmetry groups found by tracing the model; conserved quantities and their drift per dynamics",
)
