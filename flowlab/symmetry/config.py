"""The ``[symmetry]`` study section.

```toml
[symmetry]
enabled = true            # record quantity / drift / grad_term ... in every run (default true)
detect = true             # find groups automatically (false: only the groups below)
exclude = ["classifier.*", "scale:features.0"]   # drop detected groups: layer or kind:layer (wildcards)
tolerance = "auto"        # `flowlab check`: flag residuals above this ("auto": from the dtype's round-off)

[[symmetry.groups]]       # add groups by parameter name and slice; i = one group per index
kind = "rescale"
layer = "fc1"
incoming = ["fc1.weight[i, :]", "fc1.bias[i]"]
outgoing = ["fc2.weight[:, i]"]
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowlab.errors import ConfigError, did_you_mean

from .groups import KINDS, GroupSpec

KEYS = ("enabled", "detect", "exclude", "groups", "tolerance")
GROUP_KEYS = ("kind", "layer", "params", "incoming", "outgoing")


@dataclass(frozen=True)
class SymmetrySection:
    enabled: bool = True
    detect: bool = True
    exclude: tuple[str, ...] = ()
    groups: tuple[GroupSpec, ...] = ()
    tolerance: float | str = "auto"

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"enabled": self.enabled, "detect": self.detect, "tolerance": self.tolerance}
        if self.exclude:
            d["exclude"] = list(self.exclude)
        if self.groups:
            d["groups"] = [g.to_dict() for g in self.groups]
        return d


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, value, "expected a list of non-empty strings")
    return tuple(value)


def _group(raw: Any, k: int) -> GroupSpec:
    where = f"symmetry.groups.{k}"
    if not isinstance(raw, Mapping):
        raise ConfigError(where, raw, "expected a table ([[symmetry.groups]])")
    for key in raw:
        if key not in GROUP_KEYS:
            raise ConfigError(f"{where}.{key}", raw[key], f"unknown key; allowed: {', '.join(GROUP_KEYS)}",
                              did_you_mean(key, GROUP_KEYS))
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}.kind", kind, f"allowed: {', '.join(KINDS)}")
    layer = raw.get("layer", "")
    if not isinstance(layer, str):
        raise ConfigError(f"{where}.layer", layer, "expected a string (a name for the group's layer)")
    parts = {key: _strings(raw[key], f"{where}.{key}") for key in ("params", "incoming", "outgoing") if key in raw}
    if kind == "rescale" and (set(parts) != {"incoming", "outgoing"}):
        raise ConfigError(where, dict(raw), "a rescale group needs incoming = [...] and outgoing = [...]")
    if kind != "rescale" and set(parts) != {"params"}:
        raise ConfigError(where, dict(raw), f"a {kind} group needs params = [...]")
    return GroupSpec(kind, layer, parts.get("params", ()), parts.get("incoming", ()), parts.get("outgoing", ()))


def parse_symmetry(raw: Any) -> SymmetrySection:
    """Validate a ``[symmetry]`` table (unknown keys and bad values: :class:`ConfigError`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("symmetry", raw, "expected a table ([symmetry])")
    for key in raw:
        if key not in KEYS:
            raise ConfigError(f"symmetry.{key}", raw[key], f"unknown key; allowed: {', '.join(KEYS)}",
                              did_you_mean(key, KEYS))
    kw: dict[str, Any] = {}
    for key in ("enabled", "detect"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ConfigError(f"symmetry.{key}", raw[key], "expected true or false")
            kw[key] = raw[key]
    if "exclude" in raw:
        kw["exclude"] = _strings(raw["exclude"], "symmetry.exclude")
    if "groups" in raw:
        groups = raw["groups"]
        if isinstance(groups, Mapping):
            groups = [groups]
        if not isinstance(groups, list | tuple):
            raise ConfigError("symmetry.groups", groups, "expected a list of tables ([[symmetry.groups]])")
        kw["groups"] = tuple(_group(g, k) for k, g in enumerate(groups))
    if "tolerance" in raw:
        tol = raw["tolerance"]
        if tol != "auto" and not (isinstance(tol, int | float) and not isinstance(tol, bool) and tol > 0):
            raise ConfigError("symmetry.tolerance", tol, "expected a positive number or \"auto\"")
        kw["tolerance"] = tol
    return SymmetrySection(**kw)

