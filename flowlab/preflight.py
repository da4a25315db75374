"""Checks made before anything runs or is written: ``flowlab run STUDY --check``.

:func:`preflight` does what a run does before its first step — validates the study, builds the
data, model and loss (options checked against the builders, one batch through the model), sets
every part up (flows and integrators resolved with their options, symmetry groups found) and checks
the output folder — and writes nothing.  Bad input raises :class:`~flowlab.errors.FlowlabError`
with the one line the run itself would print.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import Study
from .errors import ConfigError
from .store import STORE_NAME


@dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found: the run's dynamics, the size of its problem, where it would write."""

    study: Study
    labels: tuple[str, ...]
    n_params: int
    n_examples: int
    out: Path

    def summary(self) -> str:
        return (f"{self.study.name}: ok — {self.n_params} parameters, {self.n_examples} examples, "
                f"{self.study.optimizer.steps} steps, dynamics {', '.join(self.labels)}; would write {self.out}")


def check_output(out: str | Path, overwrite: bool = False, field: str = "--out") -> Path:
    """The output folder can be written: not a file, not inside a file, no earlier result there
    unless ``overwrite``.  Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(field, str(out), "is a file; the output is a folder")
    if (out / STORE_NAME).exists() and not overwrite:
        raise ConfigError(field, str(out), f"holds a result ({STORE_NAME}): pass --overwrite, or choose another --out")
    parent = out
    while not parent.exists():  # the nearest folder that exists is where the run's folders get created
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(field, str(out), f"{parent} is a file, so no folder can be made under it")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(field, str(out), f"{parent} is not writable")
    return out


def preflight(study: Study, out: str | Path | None = None, *, overwrite: bool = False) -> Preflight:
    """Everything a run checks before its first step, without running (module docstring)."""
    from .build import build
    from .parts import Setup
    from .runner import default_out
    from .stochastic.ensemble_config import ensemble_size

    out = check_output(out if out is not None else default_out(study), overwrite)
    built = build(study)
    contribution = study.active_parts.contribute(Setup(study, built))
    labels = ["sgd"] + [f.label for f in contribution.dynamics]
    for label in labels[1:]:
        if label == "sgd" or labels.count(label) > 1:
            raise ConfigError("flows.label", label, "labels must be unique and not 'sgd' (give each flow a label)")
    samples = ensemble_size(study)
    if samples > 1:
        from .stochastic.ensemble import ReplicaSGD

        ens = study.sections["ensemble"]
        ReplicaSGD(built.problem, study.optimizer, built.lrs, study.study.seed, samples, ens.vectorise, ens.streams)
    return Preflight(study, tuple(labels), built.problem.dim, built.problem.n, out)
