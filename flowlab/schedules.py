"""Learning-rate schedules: ``schedule(k) -> η_k`` for the update k = 0, 1, 2, ...

Closed forms equal to stepping the matching ``torch.optim.lr_scheduler`` once after every
``optimizer.step()``.  A user schedule is ``"package.module:function"`` called as
``function(step, lr, **options)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import ConfigError
from .registry import Registry, call_with_options

SCHEDULES: Registry = Registry("schedule")

Schedule = Callable[[int], float]


@SCHEDULES.register("constant")
def constant(step: int, lr: float) -> float:
    """η_k = lr."""
    return lr


@SCHEDULES.register("step")
def step_decay(step: int, lr: float, step_size: int = 1000, gamma: float = 0.1) -> float:
    """η_k = lr · gamma^⌊k / step_size⌋ (torch StepLR)."""
    return lr * gamma ** (step // step_size)


@SCHEDULES.register("exponential")
def exponential(step: int, lr: float, gamma: float = 0.999) -> float:
    """η_k = lr · gamma^k (torch ExponentialLR)."""
    return lr * gamma**step


@SCHEDULES.register("cosine")
def cosine(step: int, lr: float, period: int = 1000, lr_min: float = 0.0) -> float:
    """η_k = lr_min + (lr − lr_min)(1 + cos(πk/period))/2 (torch CosineAnnealingLR, one period)."""
    k = min(step, period)
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * k / period)) / 2


@SCHEDULES.register("warmup")
def warmup(step: int, lr: float, warmup_steps: int = 100) -> float:
    """Linear warm-up to lr over ``warmup_steps`` updates, then constant."""
    return lr * min(1.0, (step + 1) / warmup_steps)


def build_schedule(name: str, lr: float, options: dict, steps: int, registry: Registry | None = None) -> np.ndarray:
    """The learning rates η_0 … η_{steps−1} as an array (validated: finite and > 0); ``name``
    resolved in ``registry`` (a study's schedules; default flowlab's own)."""
    fn = (registry if registry is not None else SCHEDULES).resolve(name, "optimizer.schedule.name")
    opts = dict(options)
    if name == "cosine":
        opts.setdefault("period", steps)
    try:
        call_with_options(fn, opts, "optimizer.schedule", step=0, lr=lr)  # checks the option names once
    except ArithmeticError as exc:  # e.g. warmup_steps = 0, period = 0, step_size = 0
        raise ConfigError("optimizer.schedule", opts, f"rejected by {name}: {exc}") from None
    try:
        values = np.array([fn(step=k, lr=lr, **opts) for k in range(steps)], dtype=np.float64)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise ConfigError("optimizer.schedule", name, f"failed: {exc}") from None
    bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
    if bad.size:
        k = int(bad[0])
        raise ConfigError("optimizer.schedule", name, f"gives learning rate {float(values[k])!r} at step {k}; must be > 0")
    return values
