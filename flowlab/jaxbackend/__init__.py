"""flowlab's JAX backend: JAX twins of torch Problems and diffrax integrators.

Importing this package is cheap: JAX is imported only when a twin or a diffrax integrator is
first used (most runs never touch JAX).  The public names below load on first access.

- :class:`JaxProblem` (``flowlab.jaxbackend.problem``): the twin of a torch Problem on the same flat θ;
  ``JaxProblem(problem).ops`` has ``loss``, ``grad``, ``loss_and_grad``, ``hvp``, ``d3`` (full batch,
  jit-compiled).  ``jax_problem(problem)`` caches one twin per Problem.
- :func:`model_twin`, :func:`loss_twin` (``flowlab.jaxbackend.twin``): the pure JAX model / loss.
- :func:`enable_x64`: JAX float64 is a process-wide switch; flowlab turns it on only when a float64
  problem builds a twin.
- :func:`sample_paths` (``flowlab.jaxbackend.sde``): K Euler–Maruyama paths of a stochastic flow
  (``sme``, ``sme2``, ``sme_momentum``) in one jitted ``jax.vmap`` over Brownian keys; one path is
  what ``diffrax:Euler`` integrates in a run.
- :mod:`.part`: what this package adds to flowlab (the ``diffrax:*`` integrators, their statistics).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "JaxProblem": "problem",
    "JaxOps": "problem",
    "jax_problem": "problem",
    "model_twin": "twin",
    "loss_twin": "twin",
    "NoTwinError": "twin",
    "supported_layers": "twin",
    "enable_x64": "_runtime",
    "to_jax": "_runtime",
    "to_torch": "_runtime",
    "sample_paths": "sde",
    "IncrementPath": "sde",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
