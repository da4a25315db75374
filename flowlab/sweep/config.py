"""The ``[sweep]`` study section: axes over any study key, a product by default.

```toml
[sweep]
"optimizer.lr" = [0.2, 0.1, 0.05]
"optimizer.weight_decay" = [0.0, 5e-4]
"study.seed" = [0, 1, 2]
zip = [["optimizer.lr", "optimizer.steps"]]   # optional: tie axes of equal length into one dim
```

Each axis key is a study key as ``--set`` takes it (``flows.0.dt`` too).  Every point is the study
with the sweep's values set and the ``[sweep]`` section removed; each is validated up front, so a
bad key or value is one line naming ``sweep.KEY`` before anything runs.  Dims are named by the key's
last component (``lr``, ``weight_decay``, ``seed``; the whole key with dots as underscores where two
would clash); a zipped group is one dim, named by its first key, with the others as coordinates
along it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class SweepSection:
    axes: tuple[tuple[str, tuple], ...]
    zip: tuple[tuple[str, ...], ...] = ()

    def to_dict(self) -> dict:
        d: dict[str, Any] = {k: list(v) for k, v in self.axes}
        if self.zip:
            d["zip"] = [list(g) for g in self.zip]
        return d

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.axes]

    def groups(self) -> list[tuple[str, ...]]:
        """The sweep's dims in order: each a tuple of keys (one key, or a zipped group)."""
        zipped = {k: g for g in self.zip for k in g}
        out, seen = [], set()
        for k in self.keys:
            g = zipped.get(k, (k,))
            if g[0] not in seen:
                out.append(g)
                seen.add(g[0])
        return out

    def dim_names(self) -> dict[str, str]:
        """key → name (the dim's name for a group's first key, a coordinate's for the others)."""
        last = [k.split(".")[-1] for k in self.keys]
        return {k: (s if last.count(s) == 1 and s not in RESERVED else k.replace(".", "_"))
                for k, s in zip(self.keys, last)}

    def points(self) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
        """(index along each dim, {key: value}) for every point, in order."""
        values = dict(self.axes)
        groups = self.groups()
        out = []
        for idx in itertools.product(*[range(len(values[g[0]])) for g in groups]):
            setting = {k: values[k][i] for g, i in zip(groups, idx) for k in g}
            out.append((tuple(idx), setting))
        return out


#: dims a run's Dataset already has: a sweep axis may not take their names
RESERVED = frozenset({"dynamics", "time", "snapshot", "sample", "symmetry_group", "variant", "proj", "param", "step"})

_SCALARS = (int, float, str, bool)


def parse_sweep(raw: Any) -> SweepSection | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError("sweep", raw, "expected a table of axes, e.g. \"optimizer.lr\" = [0.1, 0.05]")
    raw = dict(raw)
    zipped = raw.pop("zip", [])
    axes = []
    for key, values in raw.items():
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"sweep.{key}", values, "expected a study key as --set takes it, e.g. \"optimizer.lr\"")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}", values, "expected a non-empty list of values")
        for v in values:
            if not isinstance(v, _SCALARS) and not (isinstance(v, list) and all(isinstance(x, _SCALARS) for x in v)):
                raise ConfigError(f"sweep.{key}", v, "expected numbers, strings, booleans or lists of them")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"sweep.{key}", values, "values must be distinct")
        axes.append((key, tuple(values)))
    keys = [k for k, _ in axes]
    if not isinstance(zipped, list) or not all(isinstance(g, list) and len(g) >= 2 for g in zipped):
        raise ConfigError("sweep.zip", zipped, "expected a list of groups of at least two axis keys")
    seen: set[str] = set()
    for g in zipped:
        for k in g:
            if k not in keys:
                raise ConfigError("sweep.zip", k, f"is not an axis of the sweep; axes: {', '.join(keys)}")
            if k in seen:
                raise ConfigError("sweep.zip", k, "appears in two zipped groups")
            seen.add(k)
        lengths = {len(dict(axes)[k]) for k in g}
        if len(lengths) > 1:
            raise ConfigError("sweep.zip", g, "zipped axes must have the same number of values")
    return SweepSection(tuple(axes), tuple(tuple(g) for g in zipped))


def point_study(study: Any, setting: Mapping[str, Any]) -> Any:
    """The study of one sweep point: ``study`` with ``setting`` applied and no ``[sweep]``."""
    from ..config import apply_overrides, parse_study

    raw = study.to_dict()
    raw.pop("sweep", None)
    overrides = [f"{k}={json.dumps(v)}" for k, v in setting.items()]
    try:
        return parse_study(apply_overrides(raw, overrides), study.source, study.parts)
    except ConfigError as exc:
        key = next((k for k in setting if exc.field == k or exc.field.startswith(k + ".") or k.startswith(exc.field)),
                   None)
        if key is not None:
            raise ConfigError(f"sweep.{key}", setting[key], exc.allowed or str(exc), exc.hint) from None
        raise exc.within("sweep") from None
