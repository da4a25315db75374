"""The model zoo: named builders of ``torch.nn.Module``.

Every builder takes keyword options (a study's ``[model]`` keys) and, where it accepts them, the
shapes inferred from the data: ``input_shape`` (one example's shape) and ``num_outputs``.  A user
model is ``"package.module:function"`` returning an ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .registry import Registry

MODELS: Registry = Registry("model")

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
}


def _activation(name: str, field: str = "model.activation") -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(field, name, f"allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _features(input_shape: Sequence[int] | None, field: str) -> int:
    if input_shape is None:
        raise ConfigError(field, None, "cannot infer the input size; give it explicitly")
    return int(math.prod(input_shape))


def _outputs(num_outputs: int | None, field: str) -> int:
    if num_outputs is None:
        raise ConfigError(field, None, "cannot infer the output size; give it explicitly")
    return int(num_outputs)


def _positive_ints(values: Sequence[int], field: str) -> list[int]:
    if isinstance(values, int | str) or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(field, values, "expected a list of positive integers")
    return list(values)


class Quadratic(nn.Module):
    """L(θ; x) = ½ (θ − x)ᵀ A (θ − x) per data point x; the model's output is that loss.

    With the default single data point x = 0 this is the closed-form quadratic ½ θᵀAθ.
    """

    def __init__(self, A: torch.Tensor, theta0: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.theta = nn.Parameter(theta0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.theta - x.reshape(x.shape[0], -1)
        return 0.5 * ((d @ self.A) * d).sum(-1)


@MODELS.register("quadratic")
def quadratic(A: Sequence[Sequence[float]] = ((2.5, -1.5), (-1.5, 2.5)), theta0: Sequence[float] | None = None,
              input_shape: Sequence[int] | None = None) -> nn.Module:
    """½(θ−x)ᵀA(θ−x) with a given symmetric matrix A (default: the paper's Fig. 4 quadratic)."""
    A_t = torch.as_tensor(A, dtype=torch.float64)
    if A_t.ndim != 2 or A_t.shape[0] != A_t.shape[1]:
        raise ConfigError("model.A", A, "expected a square matrix (list of rows)")
    if not torch.allclose(A_t, A_t.T):
        raise ConfigError("model.A", A, "expected a symmetric matrix")
    n = A_t.shape[0]
    if input_shape is not None and math.prod(input_shape) != n:
        raise ConfigError("model.A", f"{n}x{n}", f"does not fit data points of size {math.prod(input_shape)}")
    th0 = torch.ones(n) if theta0 is None else torch.as_tensor(theta0, dtype=A_t.dtype)
    if th0.shape != (n,):
        raise ConfigError("model.theta0", theta0, f"expected {n} numbers")
    return Quadratic(A_t, th0.to(A_t.dtype))


@MODELS.register("linear")
def linear(in_features: int | None = None, out_features: int | None = None, bias: bool = True,
           input_shape: Sequence[int] | None = None, num_outputs: int | None = None) -> nn.Module:
    """A single linear layer (logistic / linear regression)."""
    n_in = in_features or _features(input_shape, "model.in_features")
    n_out = out_features or _outputs(num_outputs, "model.out_features")
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_out, bias=bias))


@MODELS.register("deep_linear")
def deep_linear(widths: Sequence[int] = (32, 32), bias: bool = False, in_features: int | None = None,
                out_features: int | None = None, input_shape: Sequence[int] | None = None,
                num_outputs: int | None = None) -> nn.Module:
    """A deep linear network (linear layers, no activation)."""
    return mlp(widths=widths, activation="identity", bias=bias, in_features=in_features,
               out_features=out_features, input_shape=input_shape, num_outputs=num_outputs)


@MODELS.register("mlp")
def mlp(widths: Sequence[int] = (128, 128), activation: str = "relu", batchnorm: bool = False,
        bias: bool = True, in_features: int | None = None, out_features: int | None = None,
        input_shape: Sequence[int] | None = None, num_outputs: int | None = None) -> nn.Module:
    """A multilayer perceptron: Linear → [BatchNorm1d] → activation per hidden width."""
    widths = _positive_ints(widths, "model.widths")
    n_in = in_features or _features(input_shape, "model.in_features")
    n_out = out_features or _outputs(num_outputs, "model.out_features")
    layers: list[nn.Module] = [nn.Flatten()]
    for w in widths:
        layers.append(nn.Linear(n_in, w, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(_activation(activation))
        n_in = w
    layers.append(nn.Linear(n_in, n_out, bias=bias))
    return nn.Sequential(*layers)


def _image_shape(input_shape: Sequence[int] | None, field: str) -> tuple[int, int, int]:
    if input_shape is None or len(input_shape) != 3:
        raise ConfigError(field, input_shape, "a convolutional model needs image data of shape (channels, height, width)")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


@MODELS.register("cnn")
def cnn(channels: Sequence[int] = (16, 32), kernel_size: int = 3, batchnorm: bool = False,
        activation: str = "relu", pool: str = "max", hidden: Sequence[int] = (), bias: bool = True,
        input_shape: Sequence[int] | None = None, num_outputs: int | None = None) -> nn.Module:
    """A small conv net: [Conv → [BN] → act → pool] per channel count, then a classifier."""
    c, h, w = _image_shape(input_shape, "data")
    channels = _positive_ints(channels, "model.channels")
    pools = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d, "none": None}
    if pool not in pools:
        raise ConfigError("model.pool", pool, "allowed: max, avg, none")
    layers: list[nn.Module] = []
    for ch in channels:
        layers.append(nn.Conv2d(c, ch, kernel_size, padding=kernel_size // 2, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm2d(ch))
        layers.append(_activation(activation))
        if pools[pool] is not None and min(h, w) >= 2:
            layers.append(pools[pool](2))
            h, w = h // 2, w // 2
        c = ch
    layers.append(nn.Flatten())
    n_in = c * h * w
    for width in _positive_ints(hidden, "model.hidden") if hidden else []:
        layers += [nn.Linear(n_in, width, bias=bias), _activation(activation)]
        n_in = width
    layers.append(nn.Linear(n_in, _outputs(num_outputs, "model.num_outputs"), bias=bias))
    return nn.Sequential(*layers)


VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG: ``features`` (3×3 convs, [BN], ReLU, 2×2 max-pools) and a ``classifier`` MLP."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@MODELS.register("vgg")
def vgg(depth: int = 11, width: float = 1.0, batchnorm: bool = True, classifier: Sequence[int] = (1024, 1024),
        dropout: float = 0.0, config: Sequence[int | str] | None = None,
        input_shape: Sequence[int] | None = None, num_outputs: int | None = None) -> nn.Module:
    """VGG-style net: depth 11/13/16/19 (or an explicit ``config`` such as [64, "M", 128, "M"]),
    channel counts scaled by ``width``, BatchNorm or not, ReLU, max-pool, MLP classifier."""
    c, h, w = _image_shape(input_shape, "data")
    if config is None:
        if depth not in VGG_CONFIGS:
            raise ConfigError("model.depth", depth, f"allowed: {', '.join(map(str, VGG_CONFIGS))} (or give config)")
        config = VGG_CONFIGS[depth]
    if not (isinstance(width, int | float) and width > 0):
        raise ConfigError("model.width", width, "expected a positive number")
    layers: list[nn.Module] = []
    for item in config:
        if item == "M":
            if min(h, w) < 2:
                raise ConfigError("model.config", list(config), f"too many max-pools for a {input_shape} input")
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
            continue
        if not isinstance(item, int) or item <= 0:
            raise ConfigError("model.config", list(config), "entries are channel counts or 'M'")
        ch = max(1, int(round(item * width)))
        layers.append(nn.Conv2d(c, ch, 3, padding=1))
        if batchnorm:
            layers.append(nn.BatchNorm2d(ch))
        layers.append(nn.ReLU())
        c = ch
    n_in = c * h * w
    head: list[nn.Module] = []
    for hidden in _positive_ints(classifier, "model.classifier") if classifier else []:
        head += [nn.Linear(n_in, hidden), nn.ReLU()]
        if dropout:
            head.append(nn.Dropout(dropout))
        n_in = hidden
    head.append(nn.Linear(n_in, _outputs(num_outputs, "model.num_outputs")))
    return VGG(nn.Sequential(*layers), nn.Sequential(*head))


@MODELS.register("vgg16")
def vgg16(batchnorm: bool = True, width: float = 1.0, classifier: Sequence[int] = (1024, 1024),
          input_shape: Sequence[int] | None = (3, 64, 64), num_outputs: int | None = 200) -> nn.Module:
    """VGG-16 with the paper's Tiny-ImageNet shapes: 64×64 input, classifier 2048→1024→1024→200."""
    return vgg(depth=16, width=width, batchnorm=batchnorm, classifier=classifier,
               input_shape=input_shape or (3, 64, 64), num_outputs=num_outputs or 200)


@MODELS.register("vgg16_narrow")
def vgg16_narrow(batchnorm: bool = True, width: float = 0.125, classifier: Sequence[int] = (128, 128),
                 input_shape: Sequence[int] | None = (3, 32, 32), num_outputs: int | None = 10) -> nn.Module:
    """VGG-16 layout at 1/8 width (8…64 channels, classifier 128→128): CPU-sized."""
    return vgg(depth=16, width=width, batchnorm=batchnorm, classifier=classifier,
               input_shape=input_shape or (3, 32, 32), num_outputs=num_outputs or 10)
