"""flowlab: discrete SGD and continuous-time models of SGD on the same network, measured through
the network's symmetries."""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while waiting slow torch down by orders of magnitude when another process
# holds a core (measured here: 120 ms instead of 0.4 ms per SGD step of a small MLP on a loaded
# 2-core machine).  Passive waiting costs little when cores are free.  Only takes effect when torch
# is first imported after flowlab; set OMP_WAIT_POLICY yourself to choose otherwise.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .build import Built, build  # noqa: E402
from .config import Study, load_study, parse_study  # noqa: E402
from .data import DATASETS, Data  # noqa: E402
from .engine import Clock, LockStep  # noqa: E402
from .errors import ConfigError, FlowlabError  # noqa: E402
from .losses import LOSSES  # noqa: E402
from .models import MODELS  # noqa: E402
from .parts import Command, Contribution, Part, Parts, ReportRequest, Section, Setup, default_parts, discover  # noqa: E402
from .problem import ParamLayout, Problem  # noqa: E402
from .recording import Point, Recorder, Rows, RunContext, StepInfo, Variable  # noqa: E402
from .runner import Run, run  # noqa: E402
from .schedules import SCHEDULES  # noqa: E402
from .sgd import BatchSampler, DiscreteSGD  # noqa: E402
from .store import export_netcdf, open_result  # noqa: E402

__all__ = [
    "DATASETS", "LOSSES", "MODELS", "SCHEDULES", "BatchSampler", "Built", "Clock", "Command", "ConfigError",
    "Contribution", "Data", "DiscreteSGD", "FlowlabError", "LockStep", "ParamLayout", "Part", "Parts", "Point",
    "Problem", "Recorder", "ReportRequest", "Rows", "Run", "RunContext", "Section", "Setup", "StepInfo", "Study",
    "Variable", "build", "default_parts", "discover", "export_netcdf", "load_study", "open_result", "parse_study",
    "registries", "run",
]


def registries() -> dict:
    """Every registry of this installation's parts by title (what ``flowlab list`` prints)."""
    return dict(default_parts().registries)
