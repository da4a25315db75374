"""The flow and integrator registries (names are a contract: studies and the JAX backend use them)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..registry import Registry

#: name → Flow class (``flows[name](**options)``); ``"package.module:Class"`` for a user flow
FLOWS: Registry = Registry("flow")
#: name → Integrator class (``integrators[name](rtol=, atol=, dt=, **options)``)
INTEGRATORS: Registry = Registry("integrator")


def _split(cls: Any, options: Mapping[str, Any], section: str) -> dict:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return dict(options)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    for key, value in options.items():
        if key not in params:
            names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise ConfigError(f"{section}.{key}", value, f"unknown option; allowed: {', '.join(names) or '(none)'}",
                              did_you_mean(key, names))
    return dict(options)


def make_flow(name: str, options: Mapping[str, Any] | None = None, section: str = "flows.name") -> Any:
    """Build the flow ``name`` (registered or ``module:Class``) with its options."""
    cls = FLOWS.resolve(name, section)
    opts = _split(cls, options or {}, section.rsplit(".", 1)[0])
    obj = cls(**opts)
    missing = [m for m in ("vector_field", "initial_state", "theta", "time_shift") if not callable(getattr(obj, m, None))]
    if missing or not hasattr(obj, "order") or not hasattr(obj, "state_size"):
        raise ConfigError(section, name, f"is not a flow: it lacks {', '.join(missing) or 'order/state_size'} "
                          "(see flowlab.flows.base.Flow)")
    return obj


def make_integrator(name: str, rtol: float | None = None, atol: float | None = None, dt: float | None = None,
                    options: Mapping[str, Any] | None = None, section: str = "flows.integrator") -> Any:
    """Build the integrator ``name`` (e.g. ``torchdiffeq:dopri5``, ``flowlab:rk4``)."""
    if name not in INTEGRATORS and ":" in name and name.split(":", 1)[0] in ("torchdiffeq", "flowlab", "diffrax"):
        allowed = f"unknown integrator; known: {', '.join(sorted(INTEGRATORS))}"
        raise ConfigError(section, name, allowed, did_you_mean(name, INTEGRATORS))
    cls = INTEGRATORS.resolve(name, section)
    opts = _split(cls, options or {}, section.rsplit(".", 1)[0] + ".integrator_options")
    return cls(rtol=rtol, atol=atol, dt=dt, **opts)
