"""The JAX twin of a torch model: a pure function ``apply(theta, x)`` over the SAME flat θ.

The twin is built by walking the torch module: each supported layer becomes a small JAX function
that reads its parameters as static slices of θ (offsets and shapes from the Problem's
:class:`~flowlab.problem.ParamLayout`, i.e. ``module.named_parameters()`` order), so a θ taken from
the torch model gives the same outputs, loss, gradient and Hessian.  Models in training mode only
(BatchNorm uses batch statistics with the biased variance and the module's ``eps``, as
:class:`~flowlab.problem.Problem` evaluates them).

Supported layers (exact types, so a subclass with its own ``forward`` is not silently mistaken
for its parent): ``Sequential``, ``Flatten``, ``Linear``, ``Conv2d`` (zero padding), ``BatchNorm1d``,
``BatchNorm2d``, ``ReLU``, ``LeakyReLU``, ``Tanh``, ``Identity``, ``GELU``, ``Sigmoid``, ``Softplus``,
``MaxPool2d``, ``AvgPool2d``, ``Dropout`` (p = 0 only) and flowlab's ``VGG`` and ``Quadratic``.
Anything else raises :class:`~flowlab.errors.FlowlabError` naming the layer.

Losses: flowlab's ``cross_entropy``, ``mse`` and ``identity`` (see :mod:`flowlab.losses`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax
from torch import nn

from .. import losses as _losses
from .. import models as _models
from ..errors import FlowlabError
from ..problem import ParamEntry, ParamLayout

Apply = Callable[[jax.Array, jax.Array], jax.Array]

HINT = 'use a torchdiffeq integrator for it (e.g. integrator = "torchdiffeq:dopri5")'
CONVS = ("auto", "lax", "im2col")
PRECISIONS = {"highest": lax.Precision.HIGHEST, "high": lax.Precision.HIGH, "default": lax.Precision.DEFAULT}


class NoTwinError(FlowlabError):
    """The model (or loss) has a part the JAX backend cannot reproduce."""


def supported_layers() -> list[str]:
    return sorted(t.__name__ for t in _BUILDERS)


class _Builder:
    """Turns modules into JAX functions, reading parameters as slices of θ."""

    def __init__(self, module: nn.Module, layout: ParamLayout, dtype: Any, precision: Any, conv: str = "lax"):
        self.dtype, self.precision, self.conv = dtype, precision, conv
        params = [p for _, p in module.named_parameters()]
        if len(params) != len(layout.entries):
            raise NoTwinError(f"the layout has {len(layout.entries)} parameters but the model {len(params)}")
        self.entries: dict[int, ParamEntry] = {}
        for p, e in zip(params, layout.entries):
            if tuple(p.shape) != e.shape:
                raise NoTwinError(f"parameter {e.name}: layout shape {e.shape} but model shape {tuple(p.shape)}")
            self.entries[id(p)] = e

    def tensor(self, m: nn.Module, name: str) -> Callable[[jax.Array], jax.Array | None]:
        """theta -> the module's tensor ``name`` (a slice of θ for a parameter, a constant otherwise)."""
        t = getattr(m, name, None)
        if t is None:
            return lambda theta: None
        if isinstance(t, nn.Parameter):
            e = self.entries.get(id(t))
            if e is None:  # pragma: no cover - every parameter is in named_parameters()
                raise NoTwinError(f"parameter {name} of {type(m).__name__} is not in the layout")
            lo, hi, shape = e.offset, e.offset + e.numel, e.shape
            return lambda theta: theta[lo:hi].reshape(shape)
        const = jnp.asarray(t.detach().cpu().numpy(), dtype=self.dtype)
        return lambda theta: const

    def build(self, m: nn.Module, path: str) -> Apply:
        where = path or "<model>"
        maker = _BUILDERS.get(type(m))
        if maker is None:
            raise NoTwinError(
                f"the model has no JAX twin: layer {where!r} is a {type(m).__module__}.{type(m).__name__}, and the "
                f"JAX backend builds twins only from {', '.join(supported_layers())}; {HINT}")
        if m._forward_hooks or m._forward_pre_hooks:
            raise NoTwinError(f"the model has no JAX twin: layer {where!r} has forward hooks; {HINT}")
        return maker(self, m, path)

    def child(self, m: nn.Module, name: str, path: str) -> Apply:
        return self.build(getattr(m, name), f"{path}.{name}" if path else name)


_BUILDERS: dict[type, Callable[[_Builder, Any, str], Apply]] = {}


def _layer(*types: type):
    def deco(fn):
        for t in types:
            _BUILDERS[t] = fn
        return fn

    return deco


# ------------------------------------------------------------------ containers


@_layer(nn.Sequential)
def _sequential(b: _Builder, m: nn.Sequential, path: str) -> Apply:
    # _modules, not named_children(): a module used twice runs twice (named_children lists it once)
    fns = [b.child(m, name, path) for name in m._modules]

    def apply(theta, x):
        for f in fns:
            x = f(theta, x)
        return x

    return apply


@_layer(_models.VGG)
def _vgg(b: _Builder, m: _models.VGG, path: str) -> Apply:
    features, classifier = b.child(m, "features", path), b.child(m, "classifier", path)
    return lambda theta, x: classifier(theta, features(theta, x).reshape(x.shape[0], -1))


@_layer(_models.Quadratic)
def _quadratic(b: _Builder, m: _models.Quadratic, path: str) -> Apply:
    th, A = b.tensor(m, "theta"), b.tensor(m, "A")

    def apply(theta, x):
        d = th(theta) - x.reshape(x.shape[0], -1)
        return 0.5 * (jnp.matmul(d, A(theta), precision=b.precision) * d).sum(-1)

    return apply


# -------------------------------------------------------------------- layers


@_layer(nn.Flatten)
def _flatten(b: _Builder, m: nn.Flatten, path: str) -> Apply:
    start, end = m.start_dim, m.end_dim

    def apply(theta, x):
        s, e = start % x.ndim, end % x.ndim
        return x.reshape(*x.shape[:s], -1, *x.shape[e + 1:])

    return apply


@_layer(nn.Linear)
def _linear(b: _Builder, m: nn.Linear, path: str) -> Apply:
    W, bias = b.tensor(m, "weight"), b.tensor(m, "bias")
    has_bias = m.bias is not None

    def apply(theta, x):
        y = jnp.matmul(x, W(theta).T, precision=b.precision)
        return y + bias(theta) if has_bias else y

    return apply


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


@_layer(nn.Conv2d)
def _conv2d(b: _Builder, m: nn.Conv2d, path: str) -> Apply:
    if m.padding_mode != "zeros":
        raise NoTwinError(f"the model has no JAX twin: Conv2d {path!r} has padding_mode={m.padding_mode!r} "
                          f"(only 'zeros' is supported); {HINT}")
    W, bias = b.tensor(m, "weight"), b.tensor(m, "bias")
    has_bias = m.bias is not None
    stride, dilation = _pair(m.stride), _pair(m.dilation)
    kernel = _pair(m.kernel_size)
    if m.padding == "valid":
        pad = [(0, 0), (0, 0)]
    elif m.padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        pad = [(t // 2, t - t // 2) for t in total]
    else:
        pad = [(p, p) for p in _pair(m.padding)]
    groups = m.groups
    use_lax = b.conv == "lax" or groups != 1

    def apply_lax(theta, x):
        y = lax.conv_general_dilated(x, W(theta), window_strides=stride, padding=pad, rhs_dilation=dilation,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups,
                                     precision=b.precision)
        return y + bias(theta)[None, :, None, None] if has_bias else y

    def apply_im2col(theta, x):
        # the convolution as ONE matrix product over the kernel's shifted, strided views of the input
        # (same sums as lax.conv to round-off).  XLA:CPU runs lax convolutions (and their gradients)
        # inside loop bodies, the diffrax kernel's while_loop, 10-35x slower than at top level
        # (jax-ml/jax#12868); pads, slices and a dot do not suffer, and at top level this is as fast.
        n, c, h, w = x.shape
        xp = jnp.pad(x, ((0, 0), (0, 0), pad[0], pad[1]))
        ho = (h + sum(pad[0]) - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        wo = (w + sum(pad[1]) - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        views = [lax.slice(xp, (0, 0, i * dilation[0], j * dilation[1]),
                           (n, c, i * dilation[0] + stride[0] * (ho - 1) + 1, j * dilation[1] + stride[1] * (wo - 1) + 1),
                           (1, 1, stride[0], stride[1]))
                 for i in range(kernel[0]) for j in range(kernel[1])]
        cols = jnp.concatenate(views, axis=1) if len(views) > 1 else views[0]  # (n, k·c, ho, wo), kernel-major
        Wt = W(theta)
        Wm = Wt.transpose(0, 2, 3, 1).reshape(Wt.shape[0], -1)  # (o, k·c) in the same order
        y = jnp.dot(Wm, cols.transpose(1, 0, 2, 3).reshape(Wm.shape[1], -1), precision=b.precision)
        y = y.reshape(Wt.shape[0], n, ho, wo).transpose(1, 0, 2, 3)
        return y + bias(theta)[None, :, None, None] if has_bias else y

    return apply_lax if use_lax else apply_im2col


@_layer(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm(b: _Builder, m: nn.modules.batchnorm._BatchNorm, path: str) -> Apply:
    # Problem evaluates in training mode with running-statistics tracking off: batch statistics
    weight, bias = b.tensor(m, "weight"), b.tensor(m, "bias")
    affine = m.weight is not None
    eps = float(m.eps)

    def apply(theta, x):
        axes = (0,) + tuple(range(2, x.ndim))
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        mean = x.mean(axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)  # biased, as torch normalises
        y = (x - mean) * lax.rsqrt(var + eps)
        if affine:
            y = y * weight(theta).reshape(shape) + bias(theta).reshape(shape)
        return y

    return apply


@_layer(nn.ReLU)
def _relu(b, m, path):
    return lambda theta, x: jax.nn.relu(x)  # derivative 0 at 0, as torch


@_layer(nn.LeakyReLU)
def _leaky_relu(b, m, path):
    slope = float(m.negative_slope)
    return lambda theta, x: jnp.where(x > 0, x, x * slope)


@_layer(nn.Tanh)
def _tanh(b, m, path):
    return lambda theta, x: jnp.tanh(x)


@_layer(nn.Sigmoid)
def _sigmoid(b, m, path):
    return lambda theta, x: jax.nn.sigmoid(x)


@_layer(nn.Identity)
def _identity(b, m, path):
    return lambda theta, x: x


@_layer(nn.GELU)
def _gelu(b, m, path):
    approximate = m.approximate == "tanh"
    return lambda theta, x: jax.nn.gelu(x, approximate=approximate)


@_layer(nn.Softplus)
def _softplus(b, m, path):
    beta, threshold = float(m.beta), float(m.threshold)

    def apply(theta, x):  # torch: linear where beta·x > threshold
        bx = beta * x
        return jnp.where(bx > threshold, x, jnp.logaddexp(jnp.minimum(bx, threshold), 0.0) / beta)

    return apply


@_layer(nn.Dropout)
def _dropout(b, m, path):
    if m.p != 0:
        raise NoTwinError(f"the model has no JAX twin: Dropout {path!r} has p={m.p} (random masks in training "
                          f"mode make the loss a random function; only p = 0 is supported); {HINT}")
    return lambda theta, x: x


def _pool_geometry(m: nn.Module, path: str) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    if getattr(m, "ceil_mode", False):
        raise NoTwinError(f"the model has no JAX twin: {type(m).__name__} {path!r} has ceil_mode=True; {HINT}")
    kernel = _pair(m.kernel_size)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size)
    return kernel, stride, _pair(m.padding)


@_layer(nn.MaxPool2d)
def _maxpool(b, m: nn.MaxPool2d, path):
    if _pair(m.dilation) != (1, 1) or m.return_indices:
        raise NoTwinError(f"the model has no JAX twin: MaxPool2d {path!r} has dilation or return_indices; {HINT}")
    kernel, stride, pad = _pool_geometry(m, path)
    window, strides = (1, 1, *kernel), (1, 1, *stride)
    padding = ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1]))

    def apply(theta, x):
        return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, padding)

    return apply


@_layer(nn.AvgPool2d)
def _avgpool(b, m: nn.AvgPool2d, path):
    if m.divisor_override is not None:
        raise NoTwinError(f"the model has no JAX twin: AvgPool2d {path!r} has divisor_override; {HINT}")
    kernel, stride, pad = _pool_geometry(m, path)
    window, strides = (1, 1, *kernel), (1, 1, *stride)
    padding = ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1]))
    include_pad = m.count_include_pad or pad == (0, 0)

    def apply(theta, x):
        total = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, window, strides, padding)
        if include_pad:
            return total / (kernel[0] * kernel[1])
        ones = np.ones((1, 1) + x.shape[2:], x.dtype)  # constant: counts per window
        count = lax.reduce_window(ones, np.zeros((), x.dtype), lax.add, window, strides, padding)
        return total / count

    return apply


# --------------------------------------------------------------------- public


def model_twin(module: nn.Module, layout: ParamLayout | None = None, dtype: Any = None,
               precision: str = "highest", conv: str = "auto", platform: str = "cpu") -> Apply:
    """``apply(theta, x)``: the JAX function the torch ``module`` computes in training mode, with its
    parameters read from the flat ``theta`` laid out as ``layout`` (default: the module's own).

    ``precision``: matrix products and convolutions at ``highest`` (true float32 on GPUs, no TF32;
    the default, for integrators at tight tolerances), ``high`` or ``default``.
    ``conv``: how Conv2d is computed: ``lax`` (``lax.conv_general_dilated``), ``im2col`` (one matrix
    product over the kernel's shifted views; grouped convolutions always use ``lax``) or ``auto``:
    ``im2col`` when ``platform`` is ``cpu`` — XLA:CPU runs lax convolutions inside loop bodies (the
    diffrax kernel) 10-35x slower than at top level — else ``lax``.
    """
    layout = layout or ParamLayout.from_module(module)
    if precision not in PRECISIONS:
        raise FlowlabError(f"precision = {precision!r}: allowed: {', '.join(PRECISIONS)}")
    if dtype is None:
        dtype = jnp.float64 if next(module.parameters()).dtype == torch.float64 else jnp.float32
    if conv not in CONVS:
        raise FlowlabError(f"conv = {conv!r}: allowed: {', '.join(CONVS)}")
    if conv == "auto":
        conv = "im2col" if platform == "cpu" else "lax"
    return _Builder(module, layout, dtype, PRECISIONS[precision], conv).build(module, "")


def _cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=-1))


def _mse(out: jax.Array, y: jax.Array) -> jax.Array:
    if jnp.issubdtype(y.dtype, jnp.integer):
        y = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
    diff = out.reshape(out.shape[0], -1) - y.reshape(y.shape[0], -1)
    return 0.5 * jnp.mean(jnp.sum(jnp.square(diff), axis=1))


def _identity_loss(out: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(out)


LOSS_TWINS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": _cross_entropy, "mse": _mse, "identity": _identity_loss,
}
_TORCH_LOSSES = {_losses.cross_entropy: "cross_entropy", _losses.mse: "mse", _losses.identity: "identity"}


def loss_twin(loss: str | Callable) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The JAX version of a flowlab loss (given by name or as the torch function itself)."""
    name = loss if isinstance(loss, str) else _TORCH_LOSSES.get(loss)
    if name not in LOSS_TWINS:
        shown = loss if isinstance(loss, str) else getattr(loss, "__qualname__", repr(loss))
        raise NoTwinError(f"the loss {shown!r} has no JAX twin (the JAX backend has {', '.join(LOSS_TWINS)}); {HINT}")
    return LOSS_TWINS[name]


def labels_as_jax(y: torch.Tensor) -> np.ndarray:
    """Targets as a numpy array for JAX (integer labels as int32)."""
    arr = y.detach().cpu().numpy()
    return arr.astype(np.int32) if np.issubdtype(arr.dtype, np.integer) else arr
