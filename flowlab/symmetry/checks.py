"""Constraint checks: does every group really carry its symmetry?

A symmetry of the loss forces (Kunin et al., "Neural Mechanics", ICLR 2021, §3;
docs/theory.md#constraints-and-conservation-laws)::

    translation  ⟨g, 1_A⟩ = 0                 H 1_A = 0
    scale        ⟨g, θ_A⟩ = 0                 H θ_A = −g_A
    rescale      ⟨g, θ_A1 − θ_A2⟩ = 0         H (θ_A1 − θ_A2) = −(g_A1 − g_A2)

(the Hessian identities are the θ-derivatives of the gradient ones).  They hold for every batch,
so a residual above round-off means a wrong group.  Residuals are relative:

- gradient: |⟨g, s_A⟩| / (|g_A| |s_A|) with s_A = 1_A (translation) or θ_A1 − θ_A2 (= θ_A for scale);
- Hessian: |H s_A + r_A| / (h |s_A| + |r_A|) with r_A = 0 (translation) or g_A1 − g_A2, and
  h = |H ξ| / |ξ| for one seeded Gaussian ξ (the typical size of H).

Normalisations with ε > 0 (BatchNorm's default 1e-5) make scale invariance only approximate
(residual ≈ ε / (σ² + ε)); :func:`exact_norms` sets ε ≈ 0 (float64's smallest normal) on the model's normalisation modules for
the duration of a check, which is what ``flowlab check`` does unless ``--keep-eps``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flowlab.problem import Batch, Problem

from .groups import Groups
from .quantities import SymmetryProjector

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


@contextmanager
def exact_norms(module: nn.Module) -> Iterator[int]:
    """Inside, every BatchNorm / InstanceNorm / LayerNorm / GroupNorm / RMSNorm of ``module`` has
    ε = the smallest positive normal number of float64 (torch rejects ε = 0 in training), so that
    scale invariance is exact to round-off (yields how many modules were changed)."""
    changed = []
    tiny = float(torch.finfo(torch.float64).tiny)
    rms = getattr(nn, "RMSNorm", None)
    for m in module.modules():
        if isinstance(m, _NORM_TYPES) or (rms is not None and isinstance(m, rms)):
            changed.append((m, m.eps))
            m.eps = tiny
    try:
        yield len(changed)
    finally:
        for m, eps in changed:
            m.eps = eps


def auto_tolerance(dtype: torch.dtype) -> float:
    """The flagging threshold for relative residuals: √ε of the dtype (float64: 1.5e-8, float32:
    3.5e-4) — half the digits.  A right group's residual is round-off amplified by cancellation,
    ε·κ (e.g. ε / |p − y| for a translation column whose examples are confidently classified;
    measured up to ~10⁴ ε on small nets at random θ); a wrong group's is O(10⁻³…1)."""
    return math.sqrt(float(torch.finfo(dtype).eps))


def gradient_residuals(proj: SymmetryProjector, theta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Relative residual of the gradient constraint, per group (float64, on the device)."""
    groups = proj.groups
    num = proj.dots(g, theta).abs()
    num = torch.where(proj.is_translation, proj.lin(g).abs(), num)
    g_norm = proj.norms_sq(g).sqrt()
    s_norm = torch.where(proj.is_translation,
                         torch.as_tensor(np.sqrt(groups.sizes.astype(np.float64)), device=proj.device),
                         proj.norms_sq(theta).sqrt())
    den = g_norm * s_norm
    return torch.where(num == 0, torch.zeros_like(num), num / den.clamp_min(torch.finfo(torch.float64).tiny))


def _direction(groups: Groups, gi: int, theta: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_A, r_A): the symmetry direction and the expected −H s_A."""
    idx, sign = groups.members(gi)
    idx = idx.to(theta.device)
    s = torch.zeros_like(theta)
    r = torch.zeros_like(theta)
    if groups.kinds[gi] == "translation":
        s[idx] = 1.0
    else:
        sg = sign.to(device=theta.device, dtype=theta.dtype)
        s[idx] = theta[idx] * sg
        r[idx] = g[idx] * sg
    return s, r


def hessian_scale(problem: Problem, theta: torch.Tensor, batch: Batch, seed: int = 0) -> float:
    """h = |Hξ| / |ξ| for a seeded Gaussian ξ."""
    gen = torch.Generator().manual_seed(seed + 104729)
    xi = torch.randn(problem.dim, generator=gen, dtype=torch.float64).to(device=theta.device, dtype=theta.dtype)
    return float(torch.linalg.vector_norm(problem.hvp(theta, xi, batch)) / torch.linalg.vector_norm(xi))


def hessian_residual(problem: Problem, groups: Groups, gi: int, theta: torch.Tensor, g: torch.Tensor, batch: Batch,
                     h: float) -> float:
    """Relative residual of group gi's Hessian identity (one Hessian-vector product)."""
    s, r = _direction(groups, gi, theta, g)
    Hs = problem.hvp(theta, s, batch)
    num = float(torch.linalg.vector_norm((Hs + r).double()))
    den = h * float(torch.linalg.vector_norm(s.double())) + float(torch.linalg.vector_norm(r.double()))
    return 0.0 if num == 0 else num / max(den, 1e-300)


def sample_groups(groups: Groups, per_layer: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``per_layer`` groups of each (kind, layer), spread over the layer (0: all)."""
    if per_layer <= 0:
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    out = []
    keys = [f"{k}\x00{la}" for k, la in zip(groups.kinds, groups.layers)]
    for key in dict.fromkeys(keys):
        members = np.array([i for i, k in enumerate(keys) if k == key])
        if len(members) > per_layer:
            members = np.sort(rng.choice(members, per_layer, replace=False))
        out.append(members)
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


@dataclass
class CheckResult:
    """Per-group residuals (NaN where the Hessian identity was not checked)."""

    groups: Groups
    gradient: np.ndarray
    hessian: np.ndarray
    tolerance: float
    h: float = math.nan
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> np.ndarray:
        worst = np.fmax(self.gradient, np.nan_to_num(self.hessian, nan=0.0))
        return ~(worst <= self.tolerance)

    @property
    def ok(self) -> bool:
        return not bool(self.flagged.any())

    def by_layer(self) -> list[dict]:
        rows: dict[tuple[str, str], dict] = {}
        for i, (k, la) in enumerate(zip(self.groups.kinds, self.groups.layers)):
            r = rows.setdefault((k, la), {"kind": k, "layer": la, "groups": 0, "grad_max": 0.0, "hess_max": math.nan,
                                          "hess_checked": 0, "flagged": []})
            r["groups"] += 1
            r["grad_max"] = max(r["grad_max"], float(self.gradient[i]))
            if not math.isnan(self.hessian[i]):
                r["hess_checked"] += 1
                r["hess_max"] = float(self.hessian[i]) if math.isnan(r["hess_max"]) else max(r["hess_max"], float(self.hessian[i]))
            if self.flagged[i]:
                r["flagged"].append(int(self.groups.units[i]))
        return list(rows.values())


def check_constraints(problem: Problem, groups: Groups, theta: torch.Tensor | None = None, batch: Batch | None = None,
                      *, hessian_per_layer: int = 0, tolerance: float | None = None, exact: bool = True,
                      seed: int = 0) -> CheckResult:
    """Gradient residuals of every group and Hessian residuals of a sample (``hessian_per_layer``
    groups per kind and layer; 0: all), at ``theta`` (default θ0) on ``batch`` (default: all data).
    With ``exact`` the model's normalisations get ε = 0 for the check (see :func:`exact_norms`)."""
    theta = problem.theta0 if theta is None else theta
    batch = problem.batch() if batch is None else batch
    tol = auto_tolerance(problem.dtype) if tolerance is None else float(tolerance)
    proj = SymmetryProjector(groups, problem.device)
    notes = []
    ctx = exact_norms(problem.module) if exact else _nullcontext()
    devices = [problem.device] if problem.device.type == "cuda" else []
    with ctx as n_changed, torch.random.fork_rng(devices=devices):
        if exact and n_changed:
            notes.append(f"normalisation ε set to ~0 (1e-308) in {n_changed} module(s) for the check "
                         "(ε > 0 makes scale invariance approximate; --keep-eps to check as is)")
        # every evaluation starts from the same random state: a model with dropout sees the same
        # masks in g and in each Hessian-vector product
        torch.manual_seed(seed)
        g = problem.grad(theta, batch)
        grad_res = gradient_residuals(proj, theta, g).cpu().numpy()
        hess = np.full(len(groups), np.nan)
        h = math.nan
        chosen = sample_groups(groups, hessian_per_layer, seed)
        if len(chosen):
            torch.manual_seed(seed)
            h = hessian_scale(problem, theta, batch, seed)
            for gi in chosen:
                torch.manual_seed(seed)
                hess[gi] = hessian_residual(problem, groups, int(gi), theta, g, batch, h)
    if not exact:
        eps = groups.eps
        if (eps > 0).any():
            notes.append(f"{int((eps > 0).sum())} scale group(s) feed a normalisation with ε > 0: "
                         "their residuals are ≈ ε/(σ²+ε), not round-off")
    return CheckResult(groups, grad_res, hess, tol, h, notes)


@contextmanager
def _nullcontext() -> Iterator[int]:
    yield 0
