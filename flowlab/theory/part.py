"""The theory part: the ``[theory]`` section; in every run with symmetry groups, the predictions of
the broken conservation laws for the discrete run (:class:`~flowlab.theory.recorder.TheoryRecorder`,
given the symmetry part's recorder) and, unless ``flow_laws = false``, the ``laws`` service that
composes each flow with its own law before it is integrated (recorded as ``flow_law``); its tables
and figure in ``flowlab report``."""

from __future__ import annotations

from ..parts import Contribution, Part, Section, Setup
from ..symmetry.recorder import SymmetryRecorder
from .config import parse_theory
from .flowlaws import FlowLaws
from .recorder import FlowLawRecorder, TheoryRecorder
from .report import print_theory


def setup(setup: Setup, symmetry: SymmetryRecorder) -> Contribution | None:
    section = setup.study.section("theory")
    if not section.enabled:
        return None
    recorders = [TheoryRecorder(symmetry, section.variants)]
    provides = {}
    if section.flow_laws:
        laws = FlowLaws(symmetry.groups, symmetry.projector, setup.problem.theta0, setup.problem)
        recorders.append(FlowLawRecorder(laws))
        provides["laws"] = laws
    return Contribution(recorders=recorders, provides=provides)


PART = Part(
    name="theory",
    sections=(Section("theory", parse_theory),),
    needs=("symmetry",),
    provides=("laws",),
    setup=setup,
    report=print_theory,
    doc="exact predictions of the broken conservation laws (Kunin et al. 2021) and each flow's own law",
)
