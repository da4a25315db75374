"""Hand-written gradient and Hessian-vector product (Pearlmutter's R-operator) for layer stacks.

For models that are a plain chain of supported layers — ``nn.Sequential`` nests and flowlab's
``VGG`` (features, flatten, classifier) made of Linear, Conv2d, BatchNorm1d/2d (batch statistics),
ReLU, LeakyReLU, Tanh, MaxPool2d, AvgPool2d, Flatten, Identity, Dropout(p=0) — with flowlab's
``cross_entropy`` or ``mse`` loss, :class:`RopEngine` computes

- ``grad(θ)``: loss and ∇L by its own forward and backward passes, keeping each layer's input,
  normalised activations and the backward signal δ at each layer's output;
- ``hvp(v)``: H(θ)v at that same θ by one R-forward and one R-backward pass that reuse them:
  Ry = W·Rx + V·x per linear map, the BatchNorm tangent Rx̂ = s(Rx − mean Rx − x̂·mean(x̂Rx)), and
  R(∂L/∂x) = Rδ·W + δ·V, R(∂L/∂W) = Rδᵀ⋆x + δᵀ⋆Rx (two ``convolution_backward`` calls per conv).

No autograd graph is built; an HVP after a gradient costs only the extra passes.  Anything else
(an unsupported layer, a user loss, BatchNorm in eval mode, a functional ``forward``) makes
:func:`engine_for` return None and callers fall back to autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..problem import Problem

Tensor = torch.Tensor


class _Layer:
    params: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, prefix: str):
        self.m, self.prefix = module, prefix

    def fwd(self, x: Tensor, need_input_grad: bool) -> Tensor:
        raise NotImplementedError

    def bwd(self, dy: Tensor, grads: dict[str, Tensor], need_dx: bool) -> Tensor | None:
        raise NotImplementedError

    def rfwd(self, rx: Tensor | None, V: dict[str, Tensor]) -> Tensor | None:
        raise NotImplementedError

    def rbwd(self, dy: Tensor, rdy: Tensor | None, V: dict[str, Tensor], out: dict[str, Tensor],
             need_dx: bool) -> Tensor | None:
        raise NotImplementedError


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a.add_(b)


class _Linear(_Layer):
    def fwd(self, x, need_input_grad):
        if x.ndim != 2:
            raise NotImplementedError("RopEngine: Linear on inputs with more than one batch dimension")
        self.x = x
        return F.linear(x, self.m.weight, self.m.bias)

    def bwd(self, dy, grads, need_dx):
        if grads is not None:
            torch.mm(dy.t(), self.x, out=grads["weight"])
            if self.m.bias is not None:
                torch.sum(dy, 0, out=grads["bias"])
        return dy.mm(self.m.weight) if need_dx else None

    def rfwd(self, rx, V):
        ry = F.linear(self.x, V["weight"], V.get("bias"))
        self.rx = rx
        return ry if rx is None else ry.addmm_(rx, self.m.weight.t())

    def rbwd(self, dy, rdy, V, out, need_dx):
        gw = out["weight"]
        if rdy is not None:
            gw.copy_(rdy.t().mm(self.x))
            if self.m.bias is not None:
                out["bias"].copy_(rdy.sum(0))
        else:
            gw.zero_()
            if self.m.bias is not None:
                out["bias"].zero_()
        if self.rx is not None:
            gw.addmm_(dy.t(), self.rx)
        if not need_dx:
            return None
        rdx = dy.mm(V["weight"])
        return rdx if rdy is None else rdx.addmm_(rdy, self.m.weight)


class _Conv(_Layer):
    def _args(self):
        m = self.m
        return (list(m.stride), list(m.padding), list(m.dilation), False, [0] * len(m.stride), m.groups)

    def fwd(self, x, need_input_grad):
        self.x = x
        return self.m._conv_forward(x, self.m.weight, self.m.bias)

    def bwd(self, dy, grads, need_dx):
        if grads is None and not need_dx:
            return None
        bias = [self.m.out_channels] if self.m.bias is not None else None
        dx, gw, gb = torch.ops.aten.convolution_backward(dy, self.x, self.m.weight, bias, *self._args(),
                                                         [need_dx, grads is not None, grads is not None and bias is not None])
        if grads is not None:
            grads["weight"].copy_(gw)
            if gb is not None:
                grads["bias"].copy_(gb)
        return dx

    def rfwd(self, rx, V):
        ry = self.m._conv_forward(self.x, V["weight"], V.get("bias"))
        self.rx = rx
        return ry if rx is None else ry.add_(self.m._conv_forward(rx, self.m.weight, None))

    def rbwd(self, dy, rdy, V, out, need_dx):
        has_bias = self.m.bias is not None
        rdx = None
        if rdy is not None:  # Rδ·W and Rδᵀ⋆x (and Σ Rδ for the bias)
            bias = [self.m.out_channels] if has_bias else None
            rdx, gw, gb = torch.ops.aten.convolution_backward(rdy, self.x, self.m.weight, bias, *self._args(),
                                                              [need_dx, True, has_bias])
            out["weight"].copy_(gw)
            if has_bias:
                out["bias"].copy_(gb)
        else:
            out["weight"].zero_()
            if has_bias:
                out["bias"].zero_()
        if need_dx or self.rx is not None:  # δ·V and δᵀ⋆Rx
            x2 = self.rx if self.rx is not None else self.x
            dx2, gw2, _ = torch.ops.aten.convolution_backward(dy, x2, V["weight"], None, *self._args(),
                                                              [need_dx, self.rx is not None, False])
            if self.rx is not None:
                out["weight"].add_(gw2)
            rdx = _add(rdx, dx2) if need_dx else None
        return rdx


class _BatchNorm(_Layer):
    """Training-mode BatchNorm with batch statistics: x̂ = (x − μ)s, s = (var + ε)^(−1/2), y = γx̂ + β.

    The map P(u) = s (u − mean u − x̂ mean(x̂ u)) gives ∂L/∂x = P(γδ) and the tangent Rx̂ = P(Rx); it is
    torch's fused ``native_batch_norm_backward`` with γ = 1, which also returns Σ u x̂ and Σ u."""

    def _dims(self, x):
        return [0] + list(range(2, x.ndim)), [1, -1] + [1] * (x.ndim - 2)

    def _P(self, u, sums=False):
        m = self.m
        out = torch.ops.aten.native_batch_norm_backward(u, self.x, None, None, None, self.mean, self.invstd, True,
                                                        m.eps, [True, sums, sums])
        return out if sums else out[0]

    def fwd(self, x, need_input_grad):
        m = self.m
        self.x = x
        self.dims, self.shape = self._dims(x)
        y, self.mean, self.invstd = torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.0, m.eps)
        self.xh = None
        return y

    def bwd(self, dy, grads, need_dx):
        m = self.m
        dx, gw, gb = torch.ops.aten.native_batch_norm_backward(dy, self.x, m.weight, None, None, self.mean,
                                                               self.invstd, True, m.eps, [need_dx, m.affine, m.affine])
        if m.affine:
            if grads is not None:
                grads["weight"].copy_(gw)
                grads["bias"].copy_(gb)
            self.sum_dy_xh = gw  # Σ δ x̂ (per channel)
        else:
            self.sum_dy_xh = (dy * self._xhat()).sum(self.dims)
        self.dx = dx
        return dx

    def _xhat(self):
        if self.xh is None:
            shape = self.shape
            self.xh = (self.x - self.mean.view(shape)) * self.invstd.view(shape)
        return self.xh

    def rfwd(self, rx, V):
        m = self.m
        shape = self.shape
        xh = self._xhat()
        n = xh.numel() / xh.shape[1]
        if rx is None:
            self.rxh, self.rs_over_s = None, None
            ry = None
        else:
            self.rxh, sum_xrx, _ = self._P(rx, sums=True)  # Rx̂ = P(Rx), Σ x̂ Rx
            self.rs_over_s = (-(sum_xrx / n) * self.invstd).view(shape)  # Rs / s
            ry = self.rxh * m.weight.view(shape) if m.affine else self.rxh
        if m.affine:
            if ry is None:
                ry = torch.addcmul(V["bias"].view(shape), xh, V["weight"].view(shape))
            else:
                ry.add_(V["bias"].view(shape)).addcmul_(xh, V["weight"].view(shape))
        return ry if ry is not None else torch.zeros_like(xh)

    def rbwd(self, dy, rdy, V, out, need_dx):
        m = self.m
        dims, shape = self.dims, self.shape
        xh = self._xhat()
        n = xh.numel() / xh.shape[1]
        sum_dy_rxh = (dy * self.rxh).sum(dims) if self.rxh is not None else None
        if m.affine:
            rg = (rdy * xh).sum(dims) if rdy is not None else torch.zeros_like(m.weight)
            if sum_dy_rxh is not None:
                rg.add_(sum_dy_rxh)
            out["weight"].copy_(rg)
            out["bias"].copy_(rdy.sum(dims) if rdy is not None else torch.zeros_like(m.bias))
        if not need_dx:
            return None
        # R(dx̂) = Vγ δ + γ Rδ;  R(dx) = P(R dx̂) + (Rs/s) dx − s (Rx̂ mean(x̂ dx̂) + x̂ mean(Rx̂ dx̂))
        if m.affine:
            rdxh = dy * V["weight"].view(shape)
            if rdy is not None:
                rdxh.addcmul_(rdy, m.weight.view(shape))
            g = m.weight.view(shape)
        else:
            rdxh = rdy if rdy is not None else torch.zeros_like(xh)
            g = 1.0
        rdx = self._P(rdxh)
        if self.rxh is not None:
            rdx.addcmul_(self.dx, self.rs_over_s)
            a = (self.sum_dy_xh.view(shape) / n) * g * self.invstd.view(shape)  # s·mean(x̂ dx̂)
            b = (sum_dy_rxh.view(shape) / n) * g * self.invstd.view(shape)  # s·mean(Rx̂ dx̂)
            rdx.sub_(self.rxh * a).sub_(xh * b)
        return rdx


class _Pointwise(_Layer):
    """y = σ(x) elementwise: ReLU (masks via ``threshold_backward`` on y), LeakyReLU (σ'' = 0), Tanh."""

    def fwd(self, x, need_input_grad):
        m = self.m
        self.kind = "relu" if type(m) is nn.ReLU else ("tanh" if type(m) is nn.Tanh else "leaky")
        if self.kind == "relu":
            self.y = torch.relu(x)
            return self.y
        if self.kind == "tanh":
            y = torch.tanh(x)
            self.d1 = 1 - y * y
            self.d2 = -2 * y * self.d1
            return y
        self.d1 = torch.where(x > 0, torch.ones_like(x), torch.full_like(x, m.negative_slope))
        return x * self.d1

    def _mask(self, g):
        if self.kind == "relu":
            return torch.ops.aten.threshold_backward(g, self.y, 0)
        return g * self.d1

    def bwd(self, dy, grads, need_dx):
        return self._mask(dy) if need_dx else None

    def rfwd(self, rx, V):
        self.rx = rx
        return None if rx is None else self._mask(rx)

    def rbwd(self, dy, rdy, V, out, need_dx):
        if not need_dx:
            return None
        r = None if rdy is None else self._mask(rdy)
        if self.kind == "tanh" and self.rx is not None:
            r = _add(r, dy * self.d2 * self.rx)
        return r


class _MaxPool(_Layer):
    def fwd(self, x, need_input_grad):
        m = self.m
        self.x = x
        y, self.idx = F.max_pool2d_with_indices(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        return y

    def _back(self, g):
        m = self.m
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
        s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
        p = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
        d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,) * 2
        return torch.ops.aten.max_pool2d_with_indices_backward(g, self.x, list(k), list(s), list(p), list(d),
                                                                m.ceil_mode, self.idx)

    def bwd(self, dy, grads, need_dx):
        return self._back(dy) if need_dx else None

    def rfwd(self, rx, V):
        if rx is None:
            return None
        return rx.flatten(2).gather(2, self.idx.flatten(2)).view(self.idx.shape)

    def rbwd(self, dy, rdy, V, out, need_dx):
        return self._back(rdy) if (need_dx and rdy is not None) else None


class _Linearmap(_Layer):
    """A fixed linear map without parameters (AvgPool2d, Flatten, Identity, Dropout(p=0))."""

    def fwd(self, x, need_input_grad):
        self.x_shape = x.shape
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            y = self.m(xi)
        self._xi, self._y = xi, y
        return y.detach()

    def _vjp(self, g):
        return torch.autograd.grad(self._y, self._xi, g, retain_graph=True)[0]

    def bwd(self, dy, grads, need_dx):
        return self._vjp(dy) if need_dx else None

    def rfwd(self, rx, V):
        return None if rx is None else self.m(rx)

    def rbwd(self, dy, rdy, V, out, need_dx):
        return self._vjp(rdy) if (need_dx and rdy is not None) else None


class _Reshape(_Layer):
    def __init__(self, module, prefix, start_dim=1):
        super().__init__(module, prefix)
        self.start_dim = start_dim

    def fwd(self, x, need_input_grad):
        self.shape = x.shape
        return x.flatten(self.start_dim)

    def bwd(self, dy, grads, need_dx):
        return dy.reshape(self.shape) if need_dx else None

    def rfwd(self, rx, V):
        return None if rx is None else rx.flatten(self.start_dim)

    def rbwd(self, dy, rdy, V, out, need_dx):
        return rdy.reshape(self.shape) if (need_dx and rdy is not None) else None


def _linearize(module: nn.Module, prefix: str, layers: list) -> bool:
    from ..models import VGG

    if isinstance(module, nn.Sequential):
        return all(_linearize(child, f"{prefix}{name}.", layers) for name, child in module.named_children())
    if type(module) is VGG:  # classifier(flatten(features(x), 1))
        if not _linearize(module.features, f"{prefix}features.", layers):
            return False
        layers.append(_Reshape(None, prefix, 1))
        return _linearize(module.classifier, f"{prefix}classifier.", layers)
    if type(module) is nn.Linear:
        layers.append(_Linear(module, prefix))
    elif type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        layers.append(_Conv(module, prefix))
    elif type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and module.training:
        layers.append(_BatchNorm(module, prefix))
    elif type(module) in (nn.ReLU, nn.LeakyReLU, nn.Tanh):
        layers.append(_Pointwise(module, prefix))
    elif type(module) is nn.MaxPool2d and not module.return_indices:
        layers.append(_MaxPool(module, prefix))
    elif type(module) is nn.Flatten and module.end_dim == -1:
        layers.append(_Reshape(module, prefix, module.start_dim))
    elif type(module) in (nn.Identity,) or (type(module) is nn.Dropout and (module.p == 0 or not module.training)):
        pass
    elif type(module) is nn.AvgPool2d:
        layers.append(_Linearmap(module, prefix))
    else:
        return False
    return True


class RopEngine:
    """Gradient + HVP for a supported layer chain on a Problem (see the module docstring)."""

    def __init__(self, problem: Problem, layers: list[_Layer], loss: str):
        self.problem, self.layers, self.loss = problem, layers, loss
        layout = problem.layout
        for layer in layers:
            names = [n for n in ("weight", "bias") if layer.m is not None and f"{layer.prefix}{n}" in layout]
            layer.params = tuple(names)
        self.ready = False

    def _views(self, flat: Tensor) -> list[dict[str, Tensor]]:
        views = self.problem.layout.unflatten(flat)
        return [{n: views[f"{layer.prefix}{n}"] for n in layer.params} for layer in self.layers]

    def _loss_grad(self, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        B = z.shape[0]
        if self.loss == "cross_entropy":
            logp = torch.log_softmax(z, 1)
            self.p = logp.exp()
            loss = -logp.gather(1, y.view(-1, 1)).mean()
            dz = self.p.clone()
            dz[torch.arange(B, device=z.device), y] -= 1.0
            return loss, dz / B
        target = F.one_hot(y, z.shape[-1]).to(z.dtype) if y.dtype == torch.long else y.reshape(z.shape)
        diff = z - target
        return 0.5 * diff.pow(2).sum(1).mean(), diff / B

    def _loss_r(self, rz: Tensor) -> Tensor:
        B = rz.shape[0]
        if self.loss == "cross_entropy":
            prz = self.p * rz
            return (prz - self.p * prz.sum(1, keepdim=True)) / B
        return rz / B

    @torch.no_grad()
    def grad(self, theta: Tensor, batch, out: Tensor | None = None, weights: bool = True
             ) -> tuple[Tensor, Tensor | None]:
        """(loss, ∇L) at θ on ``batch``, keeping what :meth:`hvp` needs (``weights=False``: only the
        backward signals, no parameter gradient — the first half of a stand-alone HVP)."""
        p = self.problem
        p.load(theta)
        X, y = batch
        h = X
        for layer in self.layers:
            h = layer.fwd(h, True)
        loss, d = self._loss_grad(h, y)
        if weights:
            out = torch.empty(p.dim, dtype=theta.dtype, device=theta.device) if out is None else out
            grads = self._views(out)
        else:
            out, grads = None, [None] * len(self.layers)
        self.deltas = [None] * len(self.layers)
        for i in range(len(self.layers) - 1, -1, -1):
            self.deltas[i] = d
            d = self.layers[i].bwd(d, grads[i], i > 0)
        self.ready = True
        p.counts["grad"] += 1  # the problem's θ is now this one (other users' kept state is stale)
        return loss, out

    def standalone_hvp(self, theta: Tensor, batch, v: Tensor) -> Tensor:
        """H(θ)v from scratch: forward, backward signals (no parameter gradient), R passes."""
        self.grad(theta, batch, weights=False)
        return self.hvp(v)

    @torch.no_grad()
    def hvp(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        """H(θ)v at the θ of the last :meth:`grad`."""
        if not self.ready:
            raise RuntimeError("RopEngine.hvp needs a grad() at the same θ first")
        p = self.problem
        V = self._views(v)
        out = torch.zeros(p.dim, dtype=v.dtype, device=v.device) if out is None else out
        res = self._views(out)
        rh = None
        for layer, Vl in zip(self.layers, V):
            rh = layer.rfwd(rh, Vl)
        rd = self._loss_r(rh)
        for i in range(len(self.layers) - 1, -1, -1):
            rd = self.layers[i].rbwd(self.deltas[i], rd, V[i], res[i], i > 0)
        return out


def engine_for(problem: Problem) -> RopEngine | None:
    """A :class:`RopEngine` when the problem's model and loss are supported (one chunk), else None."""
    from ..losses import cross_entropy, mse

    if problem.chunk_size < problem.n:
        return None
    loss = {cross_entropy: "cross_entropy", F.cross_entropy: "cross_entropy", mse: "mse"}.get(problem.loss_fn)
    if loss is None:
        return None
    layers: list[_Layer] = []
    if not _linearize(problem.module, "", layers):
        return None
    covered = {f"{layer.prefix}{n}" for layer in layers for n in ("weight", "bias") if layer.m is not None
               and getattr(layer.m, n, None) is not None}
    if covered != set(problem.layout.names):
        return None
    return RopEngine(problem, layers, loss)
