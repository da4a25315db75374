"""flowlab's core part: the model, data, loss and schedule registries, and the commands ``run``,
``list`` and ``export`` (its study sections are the core ones of :mod:`flowlab.config`)."""

from __future__ import annotations

from .checkpoint import parse_checkpoint
from .cli import BENCH, EXPORT, LIST, REPORT, RUN, report_summary
from .data import DATASETS
from .losses import LOSSES
from .models import MODELS
from .parts import Part, Section
from .schedules import SCHEDULES

PART = Part(
    name="core",
    registries={"models": MODELS, "datasets": DATASETS, "losses": LOSSES, "schedules": SCHEDULES},
    sections=(Section("checkpoint", parse_checkpoint),),
    commands=(RUN, LIST, EXPORT, REPORT, BENCH),
    report=report_summary,
    doc="the discrete run, the zoo of models, data, losses and schedules, the trajectory store",
)
