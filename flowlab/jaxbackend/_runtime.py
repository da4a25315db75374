"""JAX runtime helpers: float64 switch, devices, torch ↔ JAX array transfer.

Nothing here imports JAX at module import time; each helper imports it when called.

Float64: JAX computes in float32 unless ``jax_enable_x64`` is set, and that switch is global to the
process.  flowlab sets it only when a float64 problem asks for a JAX twin (:func:`enable_x64`);
float32 twins are built with explicit float32 dtypes everywhere, so they stay float32 after the
switch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, FlowlabError


def jax_module() -> Any:
    try:
        import jax
    except ImportError as exc:  # pragma: no cover - jax is a dependency
        raise FlowlabError(f"the JAX backend needs jax ({exc}); install jax or use a torchdiffeq integrator") from None
    return jax


def enable_x64() -> None:
    """Turn on JAX float64 (global to the process; flowlab does this only for float64 problems)."""
    jax = jax_module()
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def jax_dtype(dtype: torch.dtype) -> Any:
    """The JAX dtype of a torch float dtype (switches x64 on for float64)."""
    import jax.numpy as jnp

    if dtype == torch.float64:
        enable_x64()
        return jnp.float64
    if dtype == torch.float32:
        return jnp.float32
    raise ConfigError("study.dtype", str(dtype).replace("torch.", ""), "the JAX backend supports float32, float64")


def jax_device(spec: Any = "auto", like: torch.device | None = None) -> Any:
    """A JAX device: ``auto`` follows the torch device (``like``) where JAX has that kind, else JAX's
    default; ``cpu``; ``gpu``/``cuda`` (``cuda:N`` / ``gpu:N``); or a ``jax.Device``."""
    jax = jax_module()
    if not isinstance(spec, str):
        return spec
    if spec == "auto":
        if like is not None and like.type == "cuda":
            gpus = _devices(jax, "gpu")
            if gpus:
                return gpus[like.index or 0] if (like.index or 0) < len(gpus) else gpus[0]
        if like is not None and like.type == "cpu":
            return jax.devices("cpu")[0]
        return jax.devices()[0]
    kind, _, index = spec.partition(":")
    kind = {"cuda": "gpu"}.get(kind, kind)
    if kind not in ("cpu", "gpu") or (index and not index.isdigit()):
        raise ConfigError("jax device", spec, "allowed: auto, cpu, gpu, cuda, cuda:N")
    found = _devices(jax, kind)
    i = int(index or 0)
    if i >= len(found):
        raise ConfigError("jax device", spec, f"JAX sees {len(found)} {kind} device(s) here; use 'cpu' or 'auto'")
    return found[i]


def _devices(jax: Any, kind: str) -> list:
    try:
        return list(jax.devices(kind))
    except RuntimeError:
        return []


def to_jax(t: torch.Tensor, device: Any = None, dtype: Any = None) -> Any:
    """A torch tensor as a JAX array on ``device`` (a copy through host memory for CPU tensors,
    DLPack for CUDA tensors)."""
    jax = jax_module()
    t = t.detach()
    if t.device.type == "cuda":
        try:
            arr = jax.dlpack.from_dlpack(t.contiguous())
        except Exception:  # noqa: BLE001 - fall back to a host copy when DLPack cannot share
            arr = jax.numpy.asarray(t.cpu().numpy())
    else:
        arr = np.asarray(t.numpy())
    if dtype is not None:
        arr = arr.astype(dtype)
    return jax.device_put(arr, device) if device is not None else jax.numpy.asarray(arr)


def to_torch(a: Any, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A JAX array as a torch tensor on ``device`` (a fresh, writable tensor)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            t = torch.from_dlpack(a).clone()
        except Exception:  # noqa: BLE001
            t = torch.from_numpy(np.array(a)).to(device)
    else:
        t = torch.from_numpy(np.array(a))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


# JAX's own compile-time events: tracing to a jaxpr (reported for top-level traces only, so a
# function traced inside another is not counted twice), lowering to MLIR, XLA compilation.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile: dict[str, Any] = {"seconds": 0.0, "registered": False, "spans": []}


def _on_event(event: str, duration: float, **_: Any) -> None:
    """Count the UNION of the events' time spans: an event is reported when it ends, and a trace
    can contain other events (ops compiled while tracing), which a plain sum counts twice."""
    if event in _COMPILE_EVENTS:
        import time

        end = time.perf_counter()
        start = end - float(duration)
        lo, hi = start, end
        kept, covered = [], 0.0
        for s, e in _compile["spans"]:  # disjoint
            if e < start or s > end:
                kept.append((s, e))
            else:  # counted already where it overlaps; merged into the new span
                covered += min(e, end) - max(s, start)
                lo, hi = min(s, lo), max(e, hi)
        _compile["seconds"] += max(0.0, float(duration) - covered)
        kept.append((lo, hi))
        _compile["spans"] = sorted(kept)[-64:]


def compile_seconds() -> float:
    """Seconds JAX has spent tracing, lowering and compiling in this process (since the first call)."""
    if not _compile["registered"]:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(_on_event)
        _compile["registered"] = True
    return _compile["seconds"]
