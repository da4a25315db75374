"""Name → factory registries with a listing error and a ``module:function`` escape hatch."""

from __future__ import annotations

import collections.abc as cabc
import importlib
import inspect
import types
import typing
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
    # A value of the wrong type (by fn's annotations) is refused, but fn has the first say: its own
    # message is the more precise one ("expected a number >= 1"); the type is the fallback when fn
    # fails in a way of its own, or accepts the value silently (`image = "yes"` taken as true).
    hints = _hints(fn)
    wrong = next(((k, v, p) for k, v in options.items() if (p := type_problem(v, hints.get(k, Any)))), None)
    try:
        obj = fn(**kwargs)
    except FlowlabError:
        raise
    except (TypeError, ValueError, ArithmeticError, LookupError, RuntimeError, AttributeError, OSError) as exc:
        if wrong is not None:
            raise ConfigError(f"{section}.{wrong[0]}", wrong[1], wrong[2]) from exc
        # the builder's own complaint, in one line; `flowlab --debug` shows where it came from
        what = str(exc) if str(exc) else type(exc).__name__
        raise ConfigError(section, options, f"rejected by {getattr(fn, '__name__', fn)}: {what}") from exc
    if wrong is not None:
        raise ConfigError(f"{section}.{wrong[0]}", wrong[1], wrong[2])
    return obj


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """The parameter annotations of ``fn`` (of its ``__init__`` for a class), resolved; {} when they
    cannot be (a user's function with annotations that do not evaluate)."""
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - annotations are a help here, not a requirement
        return {}


_PLURAL = {"an integer": "integers", "a number": "numbers", "a string": "strings", "true or false": "booleans",
           "a list": "lists", "a table": "tables", "a list of numbers": "lists of numbers",
           "a list of integers": "lists of integers"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with a study value for a parameter annotated ``hint`` (None: nothing).

    Understands what a TOML value can be: ``bool``, ``int``, ``float`` (an integer is a number),
    ``str``, ``None``, unions, ``Literal``, lists (``Sequence[T]``, ``list[T]``, ``tuple[T, ...]``,
    fixed ``tuple[A, B]``) and tables (``Mapping``, ``dict``).  Any other annotation (a class, a
    callable, ``Any``) is not checked here: the builder checks it."""
    if hint is Any or hint is inspect.Parameter.empty or hint is object:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [type_problem(value, a) for a in args]
        if any(p is None for p in problems):
            return None
        shown = [p.removeprefix("expected ") for a, p in zip(args, problems) if p and a is not type(None)]
        return "expected " + " or ".join(dict.fromkeys(shown))
    if origin is typing.Literal:
        return None if value in args else f"allowed: {', '.join(repr(a) for a in args)}"
    if hint is type(None) or hint is None:
        return None if value is None else "expected nothing (leave it out)"
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        return None if _is_int(value) else "expected an integer"
    if hint is float:  # (NaN and inf are numbers here; ranges are the builder's to check)
        return None if _is_int(value) or isinstance(value, float) else "expected a number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    container = origin or hint
    if container in (list, tuple, cabc.Sequence, cabc.MutableSequence, typing.Sequence):
        if not isinstance(value, list | tuple):
            return "expected a list"
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                return f"expected a list of {len(args)} values"
            inner = [type_problem(v, a) for v, a in zip(value, args)]
        else:
            item = args[0] if args else Any
            inner = [type_problem(v, item) for v in value]
        bad = next((p for p in inner if p), None)
        if bad is None:
            return None
        what = bad.removeprefix("expected ")
        return f"expected a list of {_PLURAL.get(what, what)}"
    if container in (dict, cabc.Mapping, cabc.MutableMapping, typing.Mapping):
        return None if isinstance(value, Mapping) else "expected a table"
    return None
