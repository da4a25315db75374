"""Theory: exact dynamics of the broken conservation laws (Kunin et al., ICLR 2021), predicted for
every run and compared with what was measured.  Importing it registers the ``[theory]`` section
and the ``theory`` recorder (after the symmetry recorder, whose per-step terms it reuses)."""

from .config import TheorySection, parse_theory
from .predict import MOMENTUM_VARIANTS, SGD_VARIANTS, Predictor, variants_for
from .recorder import TheoryRecorder, theory_recorders

__all__ = ["MOMENTUM_VARIANTS", "SGD_VARIANTS", "Predictor", "TheoryRecorder", "TheorySection", "parse_theory",
           "theory_recorders", "variants_for"]
