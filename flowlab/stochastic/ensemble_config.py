"""The ``[ensemble]`` study section.

```toml
[ensemble]
size = 64            # K replicas of every stochastic dynamics (SGD's batch orders, SDE paths, SVAG runs)
vectorise = "auto"   # torch.func.vmap over the replicas where the model allows ("auto" | true | false)
streams = "auto"     # SGD's batches: "replica" (a seeded sampler per replica; replica 0 = the single run),
                     # "block" (one generator, (K, B) draws: for very large K), "auto" (replica up to 4096)
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import pop_checked
from ..errors import ConfigError


def _size(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    return "expected an integer >= 1 (replicas)"


def _streams(v: Any) -> str | None:
    return None if v in ("auto", "replica", "block") else "allowed: \"auto\", \"replica\", \"block\""


def _vectorise(v: Any) -> str | None:
    return None if v in ("auto", True, False) else "allowed: \"auto\", true, false"


@dataclass(frozen=True)
class EnsembleSection:
    size: int = 1
    vectorise: Any = "auto"
    streams: str = "auto"

    def to_dict(self) -> dict:
        return {"size": self.size, "vectorise": self.vectorise, "streams": self.streams}


def parse_ensemble(raw: Any) -> EnsembleSection | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ConfigError("ensemble", raw, "expected a table ([ensemble])")
    raw = dict(raw)
    kwargs = pop_checked(raw, {"size": _size, "vectorise": _vectorise, "streams": _streams}, "ensemble")
    if raw:
        key = next(iter(raw))
        raise ConfigError(f"ensemble.{key}", raw[key], "unknown key; allowed: size, vectorise, streams")
    return EnsembleSection(**kwargs)


def ensemble_size(study: Any) -> int:
    sec = study.sections.get("ensemble") if hasattr(study, "sections") else None
    return 1 if sec is None else int(sec.size)
