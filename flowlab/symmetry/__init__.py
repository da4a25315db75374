"""The symmetry projector (Kunin et al., "Neural Mechanics", ICLR 2021).

For every symmetry of the network — translation, scale, rescale — found automatically by tracing
the model's data flow (:func:`detect`), flowlab records the quantity gradient flow conserves and
how far each dynamics drifts from it (:mod:`.recorder`), checks the gradient and Hessian constraints
(:func:`check_constraints`, ``flowlab check``), and reports drift per dynamics × kind × layer
(``flowlab report``).  What it adds to flowlab — the ``[symmetry]`` section, the recorder, the
commands ``flowlab symmetries`` and ``flowlab check`` — is declared by :mod:`.part`.
"""

from .build import build_groups, study_groups
from .checks import CheckResult, check_constraints, exact_norms
from .config import SymmetrySection, parse_symmetry
from .detect import Detection, detect, detect_problem
from .groups import KINDS, GroupBlock, Groups, GroupSpec, Skipped, parse_index_spec
from .quantities import SymmetryProjector
from .recorder import SymmetryRecorder

__all__ = [
    "KINDS", "CheckResult", "Detection", "GroupBlock", "GroupSpec", "Groups", "Skipped", "SymmetryProjector",
    "SymmetryRecorder", "SymmetrySection", "build_groups", "check_constraints", "detect", "detect_problem",
    "exact_norms", "parse_index_spec", "parse_symmetry", "study_groups",
]
