"""Networks written for the symmetry tests (not the zoo), importable as a plain module.

``tests/`` is on pytest's ``pythonpath`` (pyproject.toml), so studies name these builders as
``[model] name = "helper_models:vgg_style"`` and test modules ``import helper_models`` in any
import mode.  The expected groups of each network are written out by hand in
``tests/test_symmetry_models.py``; :func:`bn_eps_defects` is the closed form of how much
BatchNorm's ε breaks the scale groups of :func:`vgg_style`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class VGGStyle(nn.Module):
    """conv–[BN]–ReLU–maxpool, conv–[BN]–ReLU–avgpool, flatten, fc–ReLU–dropout, fc (8×8 input)."""

    def __init__(self, batchnorm: bool = True, in_ch: int = 1, classes: int = 4, bn_eps: float = 1e-5,
                 dropout: float = 0.25):
        super().__init__()
        self.batchnorm, self.p = batchnorm, dropout
        self.c1 = nn.Conv2d(in_ch, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        if batchnorm:
            self.b1 = nn.BatchNorm2d(3, eps=bn_eps)
            self.b2 = nn.BatchNorm2d(4, eps=bn_eps)
        self.fc1 = nn.Linear(4 * 2 * 2, 6)
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        if self.batchnorm:
            x = self.b1(x)
        x = F.max_pool2d(F.relu(x, inplace=True), 2)
        x = self.c2(x)
        if self.batchnorm:
            x = self.b2(x)
        x = F.avg_pool2d(torch.relu(x), 2)
        x = x.view(x.size(0), -1)
        x = F.dropout(F.relu(self.fc1(x)), self.p, self.training)
        return self.fc2(x)


def vgg_style(batchnorm: bool = True, bn_eps: float = 1e-5, dropout: float = 0.25, num_outputs: int = 4) -> nn.Module:
    return VGGStyle(batchnorm, 1, num_outputs, bn_eps, dropout)


def leaky_mlp(num_outputs: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.LeakyReLU(0.1), nn.Dropout(0.2), nn.Linear(7, 5),
                         nn.LeakyReLU(0.3), nn.Linear(5, num_outputs))


def tanh_net(num_outputs: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, num_outputs))


class ResMLP(nn.Module):
    """h = relu(inp x); y = h + blk2(relu(blk1 h)); out = head(relu y)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.inp = nn.Linear(64, 6)
        self.blk1 = nn.Linear(6, 5)
        self.blk2 = nn.Linear(5, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x.flatten(1)))
        y = h + self.blk2(F.relu(self.blk1(h)))
        return self.head(F.relu(y))


def res_mlp(num_outputs: int = 4) -> nn.Module:
    return ResMLP(num_outputs)


class LNMLP(nn.Module):
    def __init__(self, classes: int = 4, eps: float = 1e-5):
        super().__init__()
        self.fc1 = nn.Linear(64, 6)
        self.ln = nn.LayerNorm(6, eps=eps)
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.ln(self.fc1(x.reshape(x.shape[0], -1)))))


class GNConv(nn.Module):
    def __init__(self, classes: int = 3, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gn = nn.GroupNorm(2, 4, eps=eps)
        self.fc = nn.Linear(4 * 6 * 6, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.gn(self.conv(x))), 1))


class GroupedConv(nn.Module):
    """conv(1→4) → ReLU → conv(4→4, groups=2) → ReLU → flatten → fc."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3)
        self.b = nn.Conv2d(4, 4, 3, groups=2, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).flatten(1))


class Shared(nn.Module):
    """The same Linear applied twice (weight sharing): no group may involve it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.sq = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.sq(F.relu(self.sq(h))))
        return self.out(h)


class INConv(nn.Module):
    """conv(1→4) → InstanceNorm2d(4, affine) → ReLU → flatten → fc."""

    def __init__(self, classes: int = 3, eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.inorm = nn.InstanceNorm2d(4, affine=True, eps=eps)
        self.fc = nn.Linear(4 * 6 * 6, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.inorm(self.conv(x))), 1))


class RMSMLP(nn.Module):
    """fc1 → RMSNorm over the 6 features (weight only, no bias) → ReLU → fc2."""

    def __init__(self, classes: int = 4, eps: float | None = 1e-6):
        super().__init__()
        self.fc1 = nn.Linear(64, 6)
        self.rms = nn.RMSNorm(6, eps=eps)
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc2(F.relu(self.rms(self.fc1(x.flatten(1)))))


def prelu_mlp(num_outputs: int = 4) -> nn.Module:
    """PReLU with one shared slope, then PReLU with one slope per channel."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.PReLU(), nn.Linear(7, 5), nn.PReLU(5),
                         nn.Linear(5, num_outputs))


class CatMLP(nn.Module):
    """h = relu(fc0 x); out = head(cat[relu(fa h), relu(fb h)]): two branches concatenated."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.fc0 = nn.Linear(64, 6)
        self.fa = nn.Linear(6, 3)
        self.fb = nn.Linear(6, 2)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        h = F.relu(self.fc0(x.flatten(1)))
        return self.head(torch.cat([F.relu(self.fa(h)), F.relu(self.fb(h))], dim=1))


class ComputedWeight(nn.Module):
    """fc1 → ReLU → a layer whose weight is computed (tanh(raw): an op on a parameter, so scaling
    raw's rows is no symmetry) → ReLU → fc2 → ReLU → out."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(64, 6)
        self.raw = nn.Parameter(torch.randn(5, 6) / 3)
        self.mid_bias = nn.Parameter(torch.zeros(5))
        self.fc2 = nn.Linear(5, 4)
        self.out = nn.Linear(4, classes)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(F.linear(h, torch.tanh(self.raw), self.mid_bias))
        return self.out(F.relu(self.fc2(h)))


def weight_norm_mlp(num_outputs: int = 4) -> nn.Module:
    """fc0 → ReLU → weight-normalised fc1 (w = g·v/|v|, computed by a parametrization) → ReLU → fc2."""
    fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(6, 5))
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), fc1, nn.ReLU(), nn.Linear(5, num_outputs))


def bn_eps_defects(model: VGGStyle, X: torch.Tensor, y: torch.Tensor, loss_fn=F.cross_entropy):
    """For each scale group of ``vgg_style(batchnorm=True)`` (c1's channels, then c2's): how far
    BatchNorm's ε breaks it, from a closed form (docs/theory.md#batchnorm-epsilon), float64.

    With ŷ = (z − μ)/√(σ² + ε) the channel's normalised pre-activation z = conv(x)_c (batch
    statistics), scaling θ_A = (W[c], b[c]) by α gives ŷ(α) = α(z − μ)/√(α²σ² + ε), whose α-derivative
    at 1 is ŷ·ε/(σ² + ε).  With out = γ_c ŷ + β_c:

        ρ_c(θ) = ⟨g_A, θ_A⟩ = ε/(σ_c² + ε) · γ_c · Σ_{batch, pixels} ∂L/∂out_c · ŷ_c   (every θ)

    Returns (gradient residual |ρ_c| / (|g_A| |θ_A|), an upper bound of the Hessian residual
    |∇_θ ρ_c| / |g_A|), as numpy arrays.  ∇_θ⟨g, θ_A⟩ = Hθ_A + g_A = H s_A + r_A, and the check divides
    it by h|s_A| + |r_A| ≥ |g_A|."""
    params = [p for _, p in model.named_parameters()]
    seen = {}

    def keep(mod, inp, out):
        seen[mod] = (inp[0], out)
        return out.clone()  # the model's in-place ReLU then acts on the copy, not on ``out``

    hooks = [model.b1.register_forward_hook(keep), model.b2.register_forward_hook(keep)]
    try:
        model.train()
        loss = loss_fn(model(X), y)
    finally:
        for h in hooks:
            h.remove()
    outs = [seen[model.b1][1], seen[model.b2][1]]
    grads = torch.autograd.grad(loss, outs + params, create_graph=True)
    d_out, g = grads[:2], dict(zip([n for n, _ in model.named_parameters()], grads[2:]))
    residual, hess_bound = [], []
    for (conv, bn), dout in zip(((model.c1, model.b1), (model.c2, model.b2)), d_out):
        z = seen[bn][0]
        eps = bn.eps
        var = z.var(dim=(0, 2, 3), unbiased=False)
        yhat = (z - z.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(var + eps).view(1, -1, 1, 1)
        cname = "c1" if conv is model.c1 else "c2"
        for c in range(z.shape[1]):
            rho = eps / (var[c] + eps) * bn.weight[c] * (dout[:, c] * yhat[:, c]).sum()
            gA = torch.cat([g[f"{cname}.weight"][c].reshape(-1), g[f"{cname}.bias"][c].reshape(1)]).detach()
            tA = torch.cat([conv.weight[c].reshape(-1), conv.bias[c].reshape(1)]).detach()
            grad_rho = torch.autograd.grad(rho, params, retain_graph=True)
            grad_rho = torch.cat([t.reshape(-1) for t in grad_rho])
            residual.append(float(rho.detach().abs() / (gA.norm() * tA.norm())))
            hess_bound.append(float(grad_rho.norm() / gA.norm()))
    return np.array(residual), np.array(hess_bound)
