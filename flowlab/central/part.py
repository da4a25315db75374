"""The central part: ``central_flow`` in the ``flows`` registry, and in every run with a central flow
the :class:`~flowlab.central.recorder.CentralFlowRecorder` (given the symmetry part's service when
the run has symmetry groups)."""

from __future__ import annotations

from typing import Any

from ..parts import Contribution, Part, Setup
from .flow import CentralFlow


def setup(setup: Setup, followers: Any = None, symmetry: Any = None) -> Contribution | None:
    central = [f for f in followers or () if isinstance(f.flow, CentralFlow)]
    if not central:
        return None
    from .recorder import CentralFlowRecorder

    return Contribution(recorders=[CentralFlowRecorder(central[0].flow.window, symmetry)])


PART = Part(
    name="central",
    entries={"flows": {CentralFlow.name: CentralFlow}},
    needs=("followers",),
    wants=("symmetry",),
    setup=setup,
    doc="the central flow of GD at the edge of stability (Cohen et al. 2025), Σ and its predicted loss",
)
