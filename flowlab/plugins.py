"""flowlab's optional parts (symmetry projector, flows, theory, JAX backend) register their
study sections, recorders, followers and CLI commands when imported; this imports them once."""

from __future__ import annotations

import importlib

PLUGINS = ("flowlab.symmetry", "flowlab.flows", "flowlab.theory", "flowlab.jaxbackend")
_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in PLUGINS:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # the part is not there (yet): fine; anything else: raise
            if exc.name is None or not name.startswith(exc.name):
                raise
