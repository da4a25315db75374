"""The flow and integrator registries, and building flows and integrators from names and options.

``FLOWS`` and ``INTEGRATORS`` hold flowlab's own entries (the flows part owns them; other parts add
entries through their :class:`flowlab.Part` ``entries``, e.g. the JAX part's ``diffrax:*``).  The
registries a study resolves against are its parts' merged copies (``study.registry("flows")``);
without a study, :func:`make_flow` and :func:`make_integrator` use this installation's parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..parts import default_parts
from ..registry import Registry, call_with_options
from .integrators import builtin_integrators
from .library import BUILTIN

#: name → Flow class (``flows[name](**options)``); ``"package.module:Class"`` for a user flow
FLOWS: Registry = Registry("flow", BUILTIN)
#: name → Integrator class (``integrators[name](rtol=, atol=, dt=, **options)``)
INTEGRATORS: Registry = Registry("integrator", builtin_integrators())

FLOW_METHODS = ("vector_field", "initial_state", "theta", "time_shift")


def make_flow(name: str, options: Mapping[str, Any] | None = None, section: str = "flows",
              registry: Registry | None = None) -> Any:
    """Build the flow ``name`` (registered or ``module:Class``) with its options.  Errors name
    fields under ``section`` (``flows.0.correction``)."""
    reg = registry if registry is not None else default_parts().registry("flows")
    cls = reg.resolve(name, _at(section, "name"))
    try:
        obj = call_with_options(cls, dict(options or {}), section)
    except ConfigError as exc:
        raise _placed(exc, section) from None
    check_flow(obj, _at(section, "name"), name)
    return obj


def check_flow(obj: Any, field: str, name: Any) -> None:
    """A flow has the methods of :class:`flowlab.flows.Flow` and its ``order`` and ``state_size``."""
    missing = [m for m in FLOW_METHODS if not callable(getattr(obj, m, None))]
    if missing or not hasattr(obj, "order") or not hasattr(obj, "state_size"):
        raise ConfigError(field, name, f"is not a flow: it lacks {', '.join(missing) or 'order/state_size'} "
                          "(see flowlab.flows.base.Flow)")


def make_integrator(name: str, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                    options: Mapping[str, Any] | None = None, section: str = "flows",
                    registry: Registry | None = None) -> Any:
    """Build the integrator ``name`` (e.g. ``torchdiffeq:dopri5``, ``flowlab:rk4``, ``diffrax:Dopri5``).
    ``options`` are its ``integrator_options``; errors name fields under ``section``."""
    reg = registry if registry is not None else default_parts().registry("integrators")
    family = name.split(":", 1)[0] if isinstance(name, str) else ""
    if isinstance(name, str) and name not in reg and family in {k.split(":", 1)[0] for k in reg}:
        raise ConfigError(_at(section, "integrator"), name, f"unknown integrator; known: {', '.join(sorted(reg))}",
                          did_you_mean(name, reg))  # torchdiffeq:…/flowlab:…/diffrax:… is not a module path
    cls = reg.resolve(name, _at(section, "integrator"))
    if not isinstance(options, Mapping) and options is not None:
        raise ConfigError(_at(section, "integrator_options"), options, "expected a table of integrator options")
    try:
        return call_with_options(cls, dict(options or {}), _at(section, "integrator_options"), rtol=rtol, atol=atol,
                                 dt=dt)
    except ConfigError as exc:
        raise _placed(exc, section) from None


def integrator(name: str, **options: Any) -> Any:
    """An integrator by name with keyword options, for the Python API:
    ``integrator("torchdiffeq:dopri5", rtol=1e-8)``, ``integrator("flowlab:rk4", dt=0.05)``."""
    rtol, atol, dt = options.pop("rtol", None), options.pop("atol", None), options.pop("dt", None)
    return make_integrator(name, rtol, atol, dt, options, section="")


def _at(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _placed(exc: ConfigError, section: str) -> ConfigError:
    """Fields named relative to a flow's table (``dt``, ``integrator_options.land``) placed under
    ``section``; fields already placed there stay."""
    if not section or exc.field == section or exc.field.startswith(section + "."):
        return exc
    return exc.within(section)
