"""Theory: exact dynamics of the broken conservation laws (Kunin et al., ICLR 2021), predicted for
every run and compared with what was measured, and the law each flow obeys along its own
trajectory.  What it adds to flowlab is declared by :mod:`.part` (it needs the symmetry part's
recorder, whose per-step terms it reuses)."""

from .config import TheorySection, parse_theory
from .flowlaws import FlowLaws, LawFlow, QuadForms
from .predict import MOMENTUM_VARIANTS, SGD_VARIANTS, Predictor, variants_for
from .recorder import FlowLawRecorder, TheoryRecorder

__all__ = ["MOMENTUM_VARIANTS", "SGD_VARIANTS", "FlowLawRecorder", "FlowLaws", "LawFlow", "Predictor", "QuadForms",
           "TheoryRecorder", "TheorySection", "parse_theory", "variants_for"]
