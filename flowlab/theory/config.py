"""The ``[theory]`` study section.

```toml
[theory]
enabled = true                 # predict every group's quantity for the discrete run (needs [symmetry])
variants = ["paper", "exact_discrete"]   # default: all that apply (SGD or momentum set)
flow_laws = true               # integrate each flow's own law alongside it (flow_law variable)
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowlab.errors import ConfigError, did_you_mean

from .predict import MOMENTUM_VARIANTS, SGD_VARIANTS

KEYS = ("enabled", "variants", "flow_laws")
ALL_VARIANTS = tuple(dict.fromkeys(SGD_VARIANTS + MOMENTUM_VARIANTS))


@dataclass(frozen=True)
class TheorySection:
    enabled: bool = True
    variants: tuple[str, ...] = ()
    flow_laws: bool = True

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"enabled": self.enabled, "flow_laws": self.flow_laws}
        if self.variants:
            d["variants"] = list(self.variants)
        return d


def parse_theory(raw: Any) -> TheorySection:
    if not isinstance(raw, Mapping):
        raise ConfigError("theory", raw, "expected a table")
    for key in raw:
        if key not in KEYS:
            raise ConfigError(f"theory.{key}", raw[key], f"unknown key; allowed: {', '.join(KEYS)}",
                              did_you_mean(key, KEYS))
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("theory.enabled", enabled, "expected true or false")
    variants = raw.get("variants", ())
    if isinstance(variants, str):
        variants = [variants]
    if not isinstance(variants, list | tuple):
        raise ConfigError("theory.variants", variants, f"expected a list of: {', '.join(ALL_VARIANTS)}")
    for v in variants:
        if v not in ALL_VARIANTS:
            raise ConfigError("theory.variants", v, f"allowed: {', '.join(ALL_VARIANTS)}", did_you_mean(v, ALL_VARIANTS))
    flow_laws = raw.get("flow_laws", True)
    if not isinstance(flow_laws, bool):
        raise ConfigError("theory.flow_laws", flow_laws, "expected true or false")
    return TheorySection(enabled, tuple(variants), flow_laws)

