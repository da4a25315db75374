"""The central flow (Cohen et al., ICLR 2025): a continuous model of full-batch GD at the edge of
stability, and what a run records about it.

- :mod:`.flow`: :class:`CentralFlow` (``[[flows]] name = "central_flow"``), :class:`CentralPoint`;
- :mod:`.sdcp`: the k × k semidefinite complementarity problem (:func:`solve_sdcp`);
- :mod:`.recorder`: :class:`CentralFlowRecorder` (Σ, critical directions, predicted loss, GD's window
  averages, the symmetry terms);
- :mod:`.part`: the ``central`` part (the flow as an entry of the ``flows`` registry; the recorder in
  runs with a central flow).

The sharpness of every dynamics (``[record] sharpness = true``) is recorded by
:class:`flowlab.spectrum.SharpnessRecorder`.
"""

from __future__ import annotations

from .flow import CentralFlow, CentralPoint, MinibatchWarning
from .recorder import CentralFlowRecorder
from .sdcp import SDCPResult, solve_sdcp

__all__ = ["CentralFlow", "CentralFlowRecorder", "CentralPoint", "MinibatchWarning", "SDCPResult", "solve_sdcp"]
