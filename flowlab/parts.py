"""Parts: how flowlab's pieces — and other packages' — say what they add.

A :class:`Part` declares, as data, everything it contributes:

- ``sections`` — study sections it parses (``[symmetry]``, ``[theory]``, ``[[flows]]``);
- ``registries`` — the registries it owns, by title (``flows``, ``integrators``), and ``entries`` it
  adds to registries other parts own (the JAX part adds ``diffrax:*`` to ``integrators``);
- ``commands`` — CLI verbs (``flowlab orders``, ``flowlab check``);
- ``report(request) -> [paths]`` — its part of ``flowlab report RESULT`` (tables, figures);
- ``setup(setup, **needs) -> Contribution`` — at the start of a run: recorders, extra dynamics
  (the flows part's followers) and named services it ``provides`` to other parts;
- ``needs`` / ``wants`` — services it takes from other parts, as keyword arguments of ``setup``:
  a part whose need is not provided in a run (e.g. the theory when no symmetry group was found) is
  skipped; a want that is not provided arrives as ``None``.

Parts are set up in the order their needs impose (a cycle, or a need no part provides, is an error
naming the parts); their recorders run in that order, so a recorder that reads what another
computed at the same step (the theory reads the symmetry recorder's gradient terms) comes after it.

Discovery (:func:`discover`): flowlab's own parts, then every entry point of the group
``flowlab.parts`` (a package adds ``[project.entry-points."flowlab.parts"] name = "pkg.mod:PART"``).
Nothing is registered by importing a module: a :class:`Parts` set copies its parts' registries and
merges their entries into the copies, so two sets never share state.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import FlowlabError
from .registry import Registry, import_object

if TYPE_CHECKING:
    from .build import Built
    from .config import Study

ENTRY_POINT_GROUP = "flowlab.parts"

#: flowlab's own parts, loaded like entry points (``module:attribute``), in this order.
BUILTIN_PARTS: tuple[tuple[str, str], ...] = (
    ("core", "flowlab.core:PART"),
    ("symmetry", "flowlab.symmetry.part:PART"),
    ("theory", "flowlab.theory.part:PART"),
    ("flows", "flowlab.flows.part:PART"),
    ("jax", "flowlab.jaxbackend.part:PART"),
    ("stochastic", "flowlab.stochastic.part:PART"),
    ("central", "flowlab.central.part:PART"),
    ("sweep", "flowlab.sweep.part:PART"),
)


@dataclass(frozen=True)
class Section:
    """A study section a part parses: ``parse(raw) -> config object with to_dict()``.

    ``raw`` is the TOML value (a table, or a list of tables for ``[[name]]``); a study without the
    section gets ``parse(default)``.  ``listed``: the section appears in ``Study.to_dict()`` even when
    the study does not have it (``flows``: an empty list)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any = field(default_factory=dict)
    listed: bool = False


@dataclass(frozen=True)
class Command:
    """A CLI verb: ``flowlab NAME ...``; ``configure(parser)`` adds its arguments,
    ``handler(args) -> exit status``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class ReportRequest:
    """What ``flowlab report`` hands each part's ``report``: the result's path and Dataset, the
    options, the console to print on and the folder figures go to."""

    result: Path
    dataset: Any
    by_layer: bool = False
    figures: bool = True
    console: Any = None
    #: an ensemble's full Dataset (with its ``sample`` dim); ``dataset`` is then its mean over samples
    ensemble: Any = None

    @property
    def folder(self) -> Path:
        return self.result.parent if self.result.is_file() else self.result


@dataclass
class Contribution:
    """What a part's ``setup`` adds to one run."""

    recorders: list = field(default_factory=list)
    dynamics: list = field(default_factory=list)
    provides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setup:
    """What a part sees when a run is set up: the study, its built problem and learning rates, and
    the flows and extra objects given to :func:`flowlab.run` as Python objects."""

    study: Study
    built: Built
    flows: tuple = ()

    @property
    def problem(self):
        return self.built.problem


@dataclass(frozen=True)
class Part:
    """One piece of flowlab, or of another package (see the module docstring)."""

    name: str
    sections: tuple[Section, ...] = ()
    registries: Mapping[str, Registry] = field(default_factory=dict)
    entries: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    commands: tuple[Command, ...] = ()
    provides: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    wants: tuple[str, ...] = ()
    setup: Callable[..., Contribution | None] | None = None
    report: Callable[[ReportRequest], list] | None = None
    doc: str = ""


class Parts:
    """A resolved set of parts: merged registries, sections, commands, and the set-up order."""

    def __init__(self, parts: Iterable[Part]):
        self.parts: tuple[Part, ...] = tuple(parts)
        names = [p.name for p in self.parts]
        for p in self.parts:
            if not isinstance(p, Part):
                raise FlowlabError(f"parts: {p!r} is not a flowlab.Part")
            if names.count(p.name) > 1:
                raise FlowlabError(f"parts: two parts are named {p.name!r}")
        self.registries: dict[str, Registry] = {}
        owner: dict[str, str] = {}
        for p in self.parts:
            for title, reg in p.registries.items():
                if title in self.registries:
                    raise FlowlabError(f"parts: {p.name!r} and {owner[title]!r} both own the registry {title!r}")
                self.registries[title], owner[title] = reg.copy(), p.name
        for p in self.parts:
            for title, items in p.entries.items():
                if title not in self.registries:
                    raise FlowlabError(f"part {p.name!r} adds to the registry {title!r}, which no part owns "
                                       f"(known: {', '.join(self.registries)})")
                reg = self.registries[title]
                for name, obj in items.items():
                    if name in reg:
                        raise FlowlabError(f"part {p.name!r} adds {reg.kind} {name!r}, which is already registered")
                    reg.add(name, obj)
        self.sections: dict[str, Section] = {}
        self.commands: dict[str, Command] = {}
        for p in self.parts:
            for s in p.sections:
                if s.name in self.sections:
                    raise FlowlabError(f"part {p.name!r}: the study section [{s.name}] is declared twice")
                self.sections[s.name] = s
            for c in p.commands:
                if c.name in self.commands:
                    raise FlowlabError(f"part {p.name!r}: the command {c.name!r} is declared twice")
                self.commands[c.name] = c
        self.order: tuple[Part, ...] = _ordered(self.parts)

    def __iter__(self):
        return iter(self.parts)

    def __contains__(self, name: str) -> bool:
        return any(p.name == name for p in self.parts)

    def __repr__(self) -> str:
        return f"Parts({', '.join(p.name for p in self.parts)})"

    def registry(self, title: str) -> Registry:
        try:
            return self.registries[title]
        except KeyError:
            raise FlowlabError(f"no part provides the registry {title!r} (known: {', '.join(self.registries)})") from None

    def with_parts(self, *extra: Part) -> Parts:
        """This set plus ``extra`` parts (a new set; this one is unchanged)."""
        return Parts((*self.parts, *extra)) if extra else self

    def contribute(self, setup: Setup) -> Contribution:
        """Set every part up for one run, in dependency order; their contributions together."""
        services: dict[str, Any] = {}
        out = Contribution()
        for part in self.order:
            if part.setup is None or any(services.get(n) is None for n in part.needs):
                continue
            kwargs = {n: services.get(n) for n in (*part.needs, *part.wants)}
            got = part.setup(setup, **kwargs)
            if got is None:
                continue
            unknown = set(got.provides) - set(part.provides)
            if unknown:
                raise FlowlabError(f"part {part.name!r} provides {sorted(unknown)} without declaring them in provides")
            services.update(got.provides)
            out.recorders += list(got.recorders)
            out.dynamics += list(got.dynamics)
        out.provides = services
        return out


def _ordered(parts: Sequence[Part]) -> tuple[Part, ...]:
    """Parts in an order where every provider comes before the parts that need or want it
    (otherwise their declared order)."""
    providers: dict[str, Part] = {}
    for p in parts:
        for s in p.provides:
            if s in providers:
                raise FlowlabError(f"parts {providers[s].name!r} and {p.name!r} both provide {s!r}")
            providers[s] = p
    for p in parts:
        for s in p.needs:
            if s not in providers:
                raise FlowlabError(f"part {p.name!r} needs {s!r}, which no part provides "
                                   f"(provided: {', '.join(providers) or 'nothing'})")
    done: list[Part] = []
    visiting: list[str] = []

    def visit(p: Part) -> None:
        if p in done:
            return
        if p.name in visiting:
            raise FlowlabError(f"parts: a cycle of needs: {' -> '.join([*visiting, p.name])}")
        visiting.append(p.name)
        for s in (*p.needs, *p.wants):
            if s in providers and providers[s] is not p:
                visit(providers[s])
        visiting.pop()
        done.append(p)

    for p in parts:
        visit(p)
    return tuple(done)


def load_part(spec: str, where: str = "part") -> Part:
    """The :class:`Part` at ``"package.module:ATTRIBUTE"``."""
    obj = import_object(spec, where)
    if callable(obj) and not isinstance(obj, Part):
        obj = obj()
    if not isinstance(obj, Part):
        raise FlowlabError(f"{where} {spec!r} is {type(obj).__name__}, not a flowlab.Part")
    return obj


def discover(entry_points: Iterable[metadata.EntryPoint] | None = None, *, builtin: bool = True) -> Parts:
    """flowlab's own parts and those of the entry-point group ``flowlab.parts``.

    ``entry_points``: the entry points to load instead of the installed ones (how a test, or a
    program that wants a fixed set, adds a part without installing a package)."""
    parts: list[Part] = [load_part(spec, f"flowlab part {name!r}") for name, spec in BUILTIN_PARTS] if builtin else []
    found = metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else list(entry_points)
    for ep in found:
        try:
            obj = ep.load()
        except ImportError as exc:
            raise FlowlabError(f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP}: cannot import it ({exc})") from None
        if callable(obj) and not isinstance(obj, Part):
            obj = obj()
        if not isinstance(obj, Part):
            raise FlowlabError(f"entry point {ep.name!r} ({ep.value}) of {ENTRY_POINT_GROUP} is "
                               f"{type(obj).__name__}, not a flowlab.Part")
        parts.append(obj)
    return Parts(parts)


_DEFAULT: Parts | None = None


def default_parts() -> Parts:
    """The parts of this installation (discovered once per process)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = discover()
    return _DEFAULT


__all__ = ["BUILTIN_PARTS", "ENTRY_POINT_GROUP", "Command", "Contribution", "Part", "Parts", "ReportRequest", "Section",
           "Setup",
           "default_parts", "discover", "load_part"]
