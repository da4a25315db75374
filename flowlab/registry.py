"""Name → factory registries with a listing error and a ``module:function`` escape hatch."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from .errors import ConfigError, FlowlabError, did_you_mean

F = TypeVar("F", bound=Callable[..., Any])


def import_object(spec: str, field: str = "name") -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(field, spec, "expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(field, spec, f"cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(field, spec, f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


class Registry(Generic[F], Mapping[str, F]):
    """A plain dict of named factories.

    ``registry.resolve(name)`` accepts a registered name or ``"module:function"``; an unknown name
    raises a :class:`ConfigError` that lists the registered ones.
    """

    def __init__(self, kind: str, items: Mapping[str, F] | None = None):
        self.kind = kind
        self._items: dict[str, F] = {}
        self._docs: dict[str, str] = {}
        for name, fn in (items or {}).items():
            self.add(name, fn)

    def copy(self) -> Registry[F]:
        """A registry with the same entries (a set of parts merges its parts' entries into copies)."""
        new: Registry[F] = Registry(self.kind)
        new._items, new._docs = dict(self._items), dict(self._docs)
        return new

    def register(self, name: str, doc: str | None = None) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            self._docs[name] = doc or " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
            return fn

        return deco

    def add(self, name: str, fn: F, doc: str | None = None) -> F:
        return self.register(name, doc)(fn)

    def __getitem__(self, name: str) -> F:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def doc(self, name: str) -> str:
        return self._docs.get(name, "")

    def resolve(self, name: Any, field: str) -> F:
        if not isinstance(name, str) or not name:
            raise ConfigError(field, name, f"expected the name of a {self.kind}")
        if name in self._items:
            return self._items[name]
        if ":" in name:
            obj = import_object(name, field)
            if not callable(obj):
                raise ConfigError(field, name, "is not callable")
            return obj
        allowed = f"unknown {self.kind}; known: {', '.join(sorted(self._items))}, or 'package.module:function'"
        raise ConfigError(field, name, allowed, did_you_mean(name, self._items))


def call_with_options(fn: Callable[..., Any], options: Mapping[str, Any], section: str, **injected: Any) -> Any:
    """Call ``fn(**options, **injected)``, rejecting options ``fn`` does not take by name.

    ``injected`` values (shapes inferred from the data, a seed, ...) are passed only where ``fn``
    accepts them, so a user's function need not know about them.  Unknown or missing options are
    named ``section.key``; a :class:`FlowlabError` raised by ``fn`` passes through as it is.
    This is flowlab's one option checker (models, data, losses, schedules, flows, integrators).
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature
        return fn(**options, **injected)
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not takes_kwargs:
        for key in options:
            if key not in params:
                allowed = ", ".join(n for n in names if n not in injected) or "(none)"
                raise ConfigError(f"{section}.{key}", options[key], f"unknown option; allowed: {allowed}",
                                  did_you_mean(key, names))
    kwargs = dict(options)
    for key, value in injected.items():
        if key in kwargs:
            continue
        if takes_kwargs or key in params:
            kwargs[key] = value
    missing = [
        n for n, p in params.items()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}", None, "is required")
    try:
        return fn(**kwargs)
    except FlowlabError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(section, options, f"rejected by {getattr(fn, '__name__', fn)}: {exc}") from None
