"""Exceptions for bad input.

Every error a user can cause by a study file, a command line or a Python call is a
:class:`FlowlabError`: its message is one line that names the field, the value and what is
allowed.  The CLI prints it and exits with status 2; nothing else in flowlab raises for bad
input.

Fields are named by the dotted path ``--set`` accepts, list entries by index
(``optimizer.lr``, ``flows.0.integrator_options.max_steps``, ``symmetry.groups.2.kind``).
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable

#: the longest a value is quoted in a message (a 10 000-entry list is shown by its start)
VALUE_CHARS = 160


def one_line(text: object) -> str:
    """``text`` on one line: its lines joined by " / " (an exception's message may span several)."""
    lines = [line.strip() for line in str(text).splitlines()]
    return " / ".join(line for line in lines if line)


def show(value: object) -> str:
    """``repr(value)``, on one line and cut to :data:`VALUE_CHARS` characters."""
    text = one_line(repr(value))
    if len(text) > VALUE_CHARS:
        short = reprlib.Repr()
        short.maxstring = short.maxother = VALUE_CHARS // 2
        text = one_line(short.repr(value))
        if len(text) > VALUE_CHARS:
            text = text[: VALUE_CHARS - 1] + "…"
    return text


class FlowlabError(Exception):
    """Bad input, said in one line (field, value, what is allowed)."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(FlowlabError, ValueError):
    """A study section, key or value that is not allowed."""

    def __init__(self, field: str, value: object, allowed: str, hint: str | None = None):
        self.field, self.value, self.allowed = field, value, allowed
        msg = f"{field} = {show(value)}: {allowed}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.hint = hint

    def within(self, prefix: str) -> ConfigError:
        """The same error with its field placed under ``prefix`` (``dt`` → ``flows.0.dt``).

        Flows and integrators name fields relative to their own table; whoever builds them from a
        study knows where that table is and re-raises ``exc.within("flows.0")``."""
        field = f"{prefix}.{self.field}" if prefix and self.field else (prefix or self.field)
        return ConfigError(field, self.value, self.allowed, self.hint)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice that looks most like ``name`` (for 'did you mean' hints)."""
    import difflib

    found = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    best = closest(name, choices)
    return f"did you mean {best!r}?" if best else None
