"""Study files: TOML validated into frozen config objects.

A study has the core sections ``[study]``, ``[model]``, ``[data]``, ``[loss]``, ``[optimizer]`` and
``[record]``, and those of flowlab's parts (``[[flows]]``, ``[symmetry]``, ``[theory]``,
:mod:`flowlab.parts`).  ``[model]``, ``[data]`` and ``[loss]`` take a ``name`` and pass
their other keys to the named builder (checked against its signature when the study is built).
Unknown sections and keys, and values of the wrong type or range, raise :class:`ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, FlowlabError, did_you_mean
from .parts import Parts, default_parts

# ------------------------------------------------------------------ value checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> str | None:
    return None if _is_int(v) and v > 0 else "expected a positive integer"


def chunk_size(v: Any) -> str | None:
    return None if v == "auto" or (_is_int(v) and v > 0) else 'expected a positive integer or "auto"'


def at_most(check: Callable[[Any], str | None], limit: int, why: str) -> Callable[[Any], str | None]:
    """``check``, and the value at most ``limit`` (a typo like 1e12 steps would exhaust memory before
    the first step: each step's learning rate and time are held as arrays)."""
    def wrapped(v: Any) -> str | None:
        problem = check(v)
        if problem is None and v > limit:
            return f"expected at most {limit:,} ({why})"
        return problem

    return wrapped


#: the most SGD steps a study may ask for: the step grid (learning rate and t per step) lives in memory
MAX_STEPS = 10**8
#: the most rows buffered before a store write, and random projections recorded per row
MAX_CHUNK = 10**6
MAX_PROJECTIONS = 10**4


def nonneg_int(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "expected an integer >= 0"


def positive_num(v: Any) -> str | None:
    return None if _is_num(v) and v > 0 else "expected a number > 0"


def nonneg_num(v: Any) -> str | None:
    return None if _is_num(v) and v >= 0 else "expected a number >= 0"


def unit_interval_open(v: Any) -> str | None:
    return None if _is_num(v) and 0 <= v < 1 else "expected a number in [0, 1)"


def unit_interval(v: Any) -> str | None:
    return None if _is_num(v) and 0 <= v <= 1 else "expected a number in [0, 1]"


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def string(v: Any) -> str | None:
    return None if isinstance(v, str) and v else "expected a non-empty string"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"allowed: {', '.join(choices)}"

    return check


def optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def wrapped(v: Any) -> str | None:
        return None if v is None else check(v)

    return wrapped


def batch_size_check(v: Any) -> str | None:
    if v is None or v == "full" or (_is_int(v) and v > 0):
        return None
    return "expected a positive integer or \"full\""


def snapshot_check(v: Any) -> str | None:
    if v is None or v == "ends" or (_is_int(v) and v > 0):
        return None
    return "expected a positive integer (steps between snapshots) or \"ends\" (first and last only)"


def study_name(v: Any) -> str | None:
    """A name that is also a folder name (``runs/<name>``): no path separators, not '.' or '..'."""
    if not isinstance(v, str) or not v.strip():
        return "expected a non-empty string"
    if "/" in v or "\\" in v or v in (".", "..") or any(ord(c) < 32 for c in v):
        return "expected a name without '/', '\\' or control characters, not '.' or '..' (runs/<name> is its folder)"
    return None


#: seeds are 32-bit (numpy's legacy generators, and offsets added to the seed, stay in range)
MAX_SEED = 2**32 - 1


def device_check(v: Any) -> str | None:
    if v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit()):
        return None
    return "allowed: auto, cpu, cuda, cuda:N"


def _check(check: Callable[[Any], str | None]) -> dict:
    return {"check": check}


# -------------------------------------------------------------------- sections


@dataclass(frozen=True)
class StudySection:
    name: str = field(default="study", metadata=_check(study_name))
    seed: int = field(default=0, metadata=_check(at_most(nonneg_int, MAX_SEED, "seeds are 32-bit")))
    dtype: str = field(default="float64", metadata=_check(one_of("float32", "float64")))
    device: str = field(default="auto", metadata=_check(device_check))
    out: str | None = field(default=None, metadata=_check(optional(string)))
    description: str = field(default="", metadata=_check(lambda v: None if isinstance(v, str) else "expected a string"))
    #: TF32 matrix products and convolutions on CUDA (faster float32, ~1e-3 relative error); off unless
    #: asked for, and recorded in the Dataset's attrs either way
    tf32: bool = field(default=False, metadata=_check(boolean))


@dataclass(frozen=True)
class NamedSection:
    """A section that names a registered builder; its other keys are the builder's options."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, **dict(self.options)}


@dataclass(frozen=True)
class DataSection(NamedSection):
    #: examples per chunk of the full-batch functions: None (the whole dataset on CPU, "auto" on a
    #: GPU), a positive integer, or "auto" (as many as fit in half the free memory: Problem)
    chunk_size: int | str | None = None

    def to_dict(self) -> dict:
        d = super().to_dict()
        if self.chunk_size is not None:
            d["chunk_size"] = self.chunk_size
        return d


@dataclass(frozen=True)
class LossSection(NamedSection):
    hvp: str = "auto"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "hvp": self.hvp}


@dataclass(frozen=True)
class ScheduleSection:
    name: str = "constant"
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, **dict(self.options)}


@dataclass(frozen=True)
class OptimizerSection:
    lr: float = field(default=MISSING, metadata=_check(positive_num))  # type: ignore[assignment]
    steps: int = field(default=MISSING, metadata=_check(at_most(positive_int, MAX_STEPS, "each step's learning "
                                                                 "rate and time are held in memory")))  # type: ignore[assignment]
    weight_decay: float = field(default=0.0, metadata=_check(nonneg_num))
    momentum: float = field(default=0.0, metadata=_check(unit_interval_open))
    dampening: float = field(default=0.0, metadata=_check(unit_interval))
    nesterov: bool = field(default=False, metadata=_check(boolean))
    batch_size: int | str | None = field(default=None, metadata=_check(batch_size_check))
    drop_last: bool = field(default=True, metadata=_check(boolean))
    #: how batches are drawn: "reshuffle" (a seeded permutation per epoch, cut into batches),
    #: "with_replacement" (B i.i.d. indices per step), "without_replacement" (a fresh uniform B-subset per step)
    sampling: str = field(default="reshuffle", metadata=_check(one_of("reshuffle", "with_replacement",
                                                                       "without_replacement")))
    schedule: ScheduleSection = field(default_factory=ScheduleSection)

    @property
    def full_batch(self) -> bool:
        return self.batch_size in (None, "full")


@dataclass(frozen=True)
class RecordSection:
    every: int = field(default=1, metadata=_check(positive_int))
    snapshot_every: int | str | None = field(default=None, metadata=_check(snapshot_check))
    projections: int = field(default=8, metadata=_check(at_most(nonneg_int, MAX_PROJECTIONS, "each is a random "
                                                                "direction of θ's size held in memory")))
    full_loss: bool = field(default=False, metadata=_check(boolean))
    #: λ_max of the Hessian of the full-batch L_λ at every dynamics' θ at each recorded row
    #: (``sharpness`` (dynamics, time); flowlab.spectrum.SharpnessRecorder)
    sharpness: bool = field(default=False, metadata=_check(boolean))
    chunk: int = field(default=512, metadata=_check(at_most(positive_int, MAX_CHUNK, "rows are buffered in memory "
                                                            "before each store write")))
    #: rows reach the store at least this often (seconds), besides every full chunk, so a run that
    #: is still going, or was killed, shows what it has done
    flush_seconds: float = field(default=60.0, metadata=_check(positive_num))


@dataclass(frozen=True)
class Study:
    """A validated study (the sections of its TOML file as frozen config objects)."""

    study: StudySection
    model: NamedSection
    data: DataSection
    loss: LossSection
    optimizer: OptimizerSection
    record: RecordSection
    source: str | None = None
    #: every part's section as parsed (its default where the study has none)
    sections: Mapping[str, Any] = field(default_factory=dict)
    #: the sections the study file itself has
    given: frozenset[str] = frozenset()
    #: the parts the study was parsed with (their registries resolve its names)
    parts: Parts | None = field(default=None, compare=False, repr=False)

    def section(self, name: str) -> Any:
        """A part's section config (``[symmetry]``, ``[theory]``, ``flows``...)."""
        try:
            return self.sections[name]
        except KeyError:
            known = ", ".join(self.sections) or "none"
            raise FlowlabError(f"this study has no section {name!r}: no part declares it (parts' sections: {known})") from None

    @property
    def flows(self) -> tuple:
        """The ``[[flows]]`` entries (:class:`flowlab.flows.FlowSpec`), () without the flows part."""
        return tuple(self.sections["flows"]) if "flows" in self.sections else ()

    @property
    def name(self) -> str:
        return self.study.name

    def registry(self, title: str):
        """The registry ``title`` of the study's parts (``models``, ``flows``, ``integrators``...)."""
        return self.active_parts.registry(title)

    @property
    def active_parts(self) -> Parts:
        """The parts the study was parsed with (this installation's when none were given)."""
        return self.parts if self.parts is not None else default_parts()

    def to_dict(self) -> dict:
        return {
            "study": asdict(self.study),
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "loss": self.loss.to_dict(),
            "optimizer": {**{f.name: getattr(self.optimizer, f.name) for f in fields(self.optimizer)
                             if f.name != "schedule"}, "schedule": self.optimizer.schedule.to_dict()},
            "record": asdict(self.record),
            **{name: obj.to_dict() for name, obj in self.sections.items()
               if name in self.given or self.active_parts.sections[name].listed},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_overrides(self, overrides: Sequence[str]) -> Study:
        return parse_study(apply_overrides(self.to_dict(), overrides), self.source, self.parts)

    def replace(self, **sections: Any) -> Study:
        return replace(self, **sections)


# -------------------------------------------------------------------- parsing

#: the core sections; parts add theirs (``[symmetry]``, ``[theory]``, ``[[flows]]``...)
SECTIONS = ("study", "model", "data", "loss", "optimizer", "record")


def _typed(cls: type, section: str, raw: Any, **nested: Any) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(section, raw, "expected a table")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known or key in nested:
            if key in nested:
                continue
            raise ConfigError(f"{section}.{key}", raw[key], f"unknown key; allowed: {', '.join(known)}",
                              did_you_mean(key, known))
    kwargs: dict[str, Any] = dict(nested)
    for name, f in known.items():
        if name in nested:
            continue
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                raise ConfigError(f"{section}.{name}", None, "is required")
            continue
        value = raw[name]
        check = f.metadata.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise ConfigError(f"{section}.{name}", value, problem)
        if isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _named(cls: type, section: str, raw: Any, default_name: str | None = None, **extra: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(section, raw, "expected a table")
    raw = dict(raw)
    name = raw.pop("name", default_name)
    if name is None:
        raise ConfigError(f"{section}.name", None, "is required")
    problem = string(name)
    if problem:
        raise ConfigError(f"{section}.name", name, problem)
    fixed = pop_checked(raw, extra, section)
    return cls(name=name, options=freeze_options(raw), **fixed)


def pop_checked(raw: dict, checks: Mapping[str, Callable[[Any], str | None]], section: str) -> dict[str, Any]:
    """Remove the keys of ``checks`` from ``raw``, validating each; return them."""
    out = {}
    for key, check in checks.items():
        if key in raw:
            value = raw.pop(key)
            problem = check(value)
            if problem:
                raise ConfigError(f"{section}.{key}", value, problem)
            out[key] = value
    return out


def first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """Where two study dicts first differ: (dotted key, a's value, b's value; "(absent)" for a
    missing key), or None when they are equal.  Lists are compared entry by entry (``flows.0.dt``)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                return key, a.get(k, "(absent)"), b.get(k, "(absent)")
            d = first_difference(a[k], b[k], key)
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{prefix}.{i}" if prefix else str(i))
            if d is not None:
                return d
        return None
    return None if a == b else (prefix or "(top)", a, b)


def freeze_options(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def parse_study(raw: Mapping[str, Any], source: str | None = None, parts: Parts | None = None) -> Study:
    """Validate a study mapping (as read from TOML) into a :class:`Study`.

    ``parts``: the parts whose sections the study may have (default: this installation's)."""
    parts = parts if parts is not None else default_parts()
    if not isinstance(raw, Mapping):
        raise ConfigError("study", raw, "expected a table of sections")
    allowed = SECTIONS + tuple(parts.sections)
    for key in raw:
        if key not in allowed:
            raise ConfigError(key, raw[key] if not isinstance(raw[key], Mapping) else "[...]",
                              f"unknown section; allowed: {', '.join(allowed)}", did_you_mean(key, allowed))
    for key in ("model", "data", "optimizer"):
        if key not in raw:
            raise ConfigError(f"[{key}]", None, "section is required")
    opt_raw = raw["optimizer"]
    if not isinstance(opt_raw, Mapping):
        raise ConfigError("optimizer", opt_raw, "expected a table")
    schedule_raw = opt_raw.get("schedule", {"name": "constant"})
    if isinstance(schedule_raw, str):
        schedule_raw = {"name": schedule_raw}
    schedule = _named(ScheduleSection, "optimizer.schedule", schedule_raw, default_name="constant")
    optimizer = _typed(OptimizerSection, "optimizer", opt_raw, schedule=schedule)
    if optimizer.nesterov and (optimizer.momentum <= 0 or optimizer.dampening != 0):
        raise ConfigError("optimizer.nesterov", True, "Nesterov momentum requires momentum > 0 and dampening = 0")
    study = Study(
        study=_typed(StudySection, "study", raw.get("study", {})),
        model=_named(NamedSection, "model", raw["model"]),
        data=_named(DataSection, "data", raw["data"], chunk_size=optional(chunk_size)),
        loss=_named(LossSection, "loss", raw.get("loss", {}), default_name=_default_loss(raw),
                    hvp=one_of("auto", "forward_over_reverse", "double_backward")),
        optimizer=optimizer,
        record=_typed(RecordSection, "record", raw.get("record", {})),
        source=source,
        sections={name: s.parse(raw[name] if name in raw else s.default) for name, s in parts.sections.items()},
        given=frozenset(name for name in parts.sections if name in raw),
        parts=parts,
    )
    return study


def _default_loss(raw: Mapping[str, Any]) -> str:
    model = raw.get("model")
    return "identity" if isinstance(model, Mapping) and model.get("name") == "quadratic" else "cross_entropy"


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as TOML, else taken as strings)."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", item, "expected section.key=value, e.g. optimizer.lr=0.05")
        path = key.strip().split(".")
        node: Any = out
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError("--set", item, f"{'.'.join(path[:i])} has {len(node)} entries")
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError("--set", item, f"{'.'.join(path[: i + 1])} is not a section")
        if isinstance(node, list):
            raise ConfigError("--set", item, "name a key inside a list entry, e.g. flows.0.rtol=1e-8")
        node[path[-1]] = _parse_value(text.strip())
    return out


def load_study(path: str | Path, overrides: Sequence[str] = (), parts: Parts | None = None) -> Study:
    """Read and validate a TOML study file (with optional ``section.key=value`` overrides)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError("study file", str(path), "is a folder; give the study's .toml file")
    if not p.is_file():
        raise ConfigError("study file", str(path), "no such file")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("study file", str(path), f"is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("study file", str(path), "is not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError("study file", str(path), f"cannot be read ({exc.strerror or exc})") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_study(raw, str(p), parts)
