"""The JAX twin of a torch Problem: same loss, gradient, HVP (and ∇³L[v, v]) on the same flat θ.

Float64 throughout, except the float32 check.  Bounds from round-off (:func:`roundoff_bound`):
twin and torch each compute the same sums in their own order, so they differ by at most the
a-priori round-off of both — a few hundred eps on these small models (measured: a few eps), so a
wrong layer, layout or chunk weight (errors of order 1) cannot pass.  The torch side uses
double-backward HVPs (JAX uses forward-over-reverse), so the two paths share no differentiation
code.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from flowlab import losses, models
from flowlab.data import Data
from flowlab.errors import FlowlabError
from flowlab.problem import Problem

torch.set_num_threads(1)
jax = pytest.importorskip("jax")
from flowlab.jaxbackend import JaxProblem, jax_problem  # noqa: E402

EPS = float(np.finfo(np.float64).eps)


def roundoff_bound(p: Problem, passes: int = 4) -> float:
    """A-priori bound on the relative round-off of L, ∇L and Hv (``passes`` = 4: the forward pass,
    the backward pass and their tangents; 6 for ∇³L[v, v]) in float64, for twin and torch together.

    Higham: a sum of n terms is off by at most n·eps times the sum of the terms' magnitudes; at a
    random θ nothing cancels beyond O(1), so each pass through a layer adds at most (its sums'
    lengths)·eps relative.  The lengths: Linear — in_features (output), out_features (input
    gradient), batch rows (weight gradient); Conv2d — (in/groups)·kernel, (out/groups)·kernel,
    batch·positions; BatchNorm — batch·positions (statistics); pooling — the window; the loss —
    the batch (mean) and the classes (softmax); the chunks' weighted sum; a model without these
    layers (the quadratic) — its parameter count.  Bound: 2 (twin, torch) · passes · Σ lengths · eps."""
    lengths: list[int] = []

    def hook(m, inputs, out):
        x = inputs[0]
        if isinstance(m, nn.Linear):
            lengths.extend([m.in_features, m.out_features, x.numel() // x.shape[-1]])
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            lengths.extend([m.in_channels // m.groups * k, m.out_channels // m.groups * k, out.numel() // out.shape[1]])
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            lengths.append(x.numel() // x.shape[1])
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
            lengths.append(k[0] * k[1])

    module = copy.deepcopy(p.module)  # a forward pass updates BatchNorm's running statistics
    for m in module.modules():
        m.register_forward_hook(hook)
    (X, _), _ = next(iter(p.chunks()))
    with torch.no_grad():
        out = module(X)
    n_chunks = sum(1 for _ in p.chunks())
    lengths.extend([p.n, out.shape[-1] if out.ndim > 1 else 1, n_chunks])
    if len(lengths) == 3:  # no layer of the kinds above
        lengths.append(p.dim)
    return 2 * passes * sum(lengths) * EPS


def check_gaps(p: Problem, seed: int = 0, **options) -> tuple[float, float, float]:
    """Twin vs torch: loss, gradient and HVP each within :func:`roundoff_bound`."""
    found = gaps(p, seed, **options)
    bound = roundoff_bound(p)
    assert max(found) <= bound, (found, bound)
    return found


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def make_problem(module: nn.Module, loss, X, y, num_classes=None, chunk_size=None, dtype=torch.float64) -> Problem:
    module = module.to(dtype)
    return Problem(module, loss, Data(X, y, num_classes), dtype=dtype, chunk_size=chunk_size, hvp="double_backward")


def random_theta(p: Problem, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ = θ_init + N(0, 0.1²) (random, yet in the range where the model's layers are active) and a
    random direction v."""
    g = torch.Generator().manual_seed(seed)
    theta = p.theta0 + 0.1 * torch.randn(p.dim, generator=g, dtype=p.dtype)
    v = torch.randn(p.dim, generator=g, dtype=p.dtype)
    return theta, v


def torch_values(p: Problem, theta, v):
    loss, g = p.full_loss_and_grad(theta)
    return float(loss), g.clone(), p.full_hvp(theta, v).clone()


def jax_values(jp: JaxProblem, theta, v):
    th, vv = jp.theta(theta), jp.theta(v)
    both = jax.jit(lambda th, vv: (jp.ops.loss_and_grad(th), jp.ops.hvp(th, vv)))  # one compilation
    (loss, g), hv = both(th, vv)
    return float(loss), np.asarray(g), np.asarray(hv)


def gaps(p: Problem, seed: int = 0, **options) -> tuple[float, float, float]:
    theta, v = random_theta(p, seed)
    jp = JaxProblem(p, **options)
    t = torch_values(p, theta, v)
    j = jax_values(jp, theta, v)
    return rel(j[0], t[0]), rel(j[1], t[1].numpy()), rel(j[2], t[2].numpy())


def classification(shape, n=10, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g), classes


# name, builder, data shape, loss
CASES = {
    "quadratic_fig4": (lambda: models.quadratic(), "points", losses.identity),
    "quadratic_3d": (lambda: models.quadratic(A=[[3.0, 0.5, 0.1], [0.5, 2.0, -0.3], [0.1, -0.3, 1.0]],
                                              theta0=[1.0, -2.0, 0.5]), "points3", losses.identity),
    "linear": (lambda: models.linear(input_shape=(5,), num_outputs=3), (5,), losses.cross_entropy),
    "linear_nobias_mse": (lambda: models.linear(input_shape=(5,), num_outputs=3, bias=False), (5,), losses.mse),
    "deep_linear": (lambda: models.deep_linear(widths=[5, 4], input_shape=(4,), num_outputs=3), (4,), losses.mse),
    **{f"mlp_{act}": (lambda act=act: models.mlp(widths=[6, 5], activation=act, input_shape=(4,), num_outputs=3),
                      (4,), losses.cross_entropy) for act in models.ACTIVATIONS},
    "mlp_bn_relu": (lambda: models.mlp(widths=[6, 5], batchnorm=True, input_shape=(4,), num_outputs=3), (4,),
                    losses.cross_entropy),
    "mlp_bn_small": (lambda: models.mlp(widths=[4], batchnorm=True, input_shape=(4,), num_outputs=3), (4,),
                     losses.cross_entropy),
    "mlp_bn_tanh_nobias_mse": (lambda: models.mlp(widths=[6], batchnorm=True, activation="tanh", bias=False,
                                                  input_shape=(4,), num_outputs=3), (4,), losses.mse),
    **{f"cnn_{pool}_{'bn' if bn else 'plain'}": (
        lambda pool=pool, bn=bn: models.cnn(channels=[3, 4], batchnorm=bn, pool=pool, input_shape=(2, 6, 6),
                                            num_outputs=3), (2, 6, 6), losses.cross_entropy)
       for pool in ("max", "avg") for bn in (False, True)},
    "cnn_nopool_hidden_tanh": (lambda: models.cnn(channels=[3], pool="none", hidden=[5], activation="tanh",
                                                  kernel_size=5, input_shape=(1, 5, 5), num_outputs=3),
                               (1, 5, 5), losses.cross_entropy),
    "vgg_small_bn": (lambda: models.vgg(config=[4, "M", 6, "M"], classifier=[8], batchnorm=True,
                                        input_shape=(3, 4, 4), num_outputs=3), (3, 4, 4), losses.cross_entropy),
    "vgg_small_plain": (lambda: models.vgg(config=[4, 4, "M", 6, "M"], classifier=[8, 7], batchnorm=False,
                                           input_shape=(3, 5, 5), num_outputs=3), (3, 5, 5), losses.cross_entropy),
}


def build_case(name: str, chunk_size=None, n=10, dtype=torch.float64) -> Problem:
    builder, shape, loss = CASES[name]
    torch.manual_seed(0)
    module = builder()
    g = torch.Generator().manual_seed(1)
    if shape in ("points", "points3"):
        d = 2 if shape == "points" else 3
        X = torch.randn(n, d, generator=g)
        return make_problem(module, loss, X, torch.zeros(n), None, chunk_size, dtype)
    X, y, classes = classification(shape, n=n)
    return make_problem(module, loss, X, y, classes, chunk_size, dtype)


# The conv sweeps compile slowly on a CPU (float64 convolutions): one of each kind runs by default.
SLOW_CASES = {"cnn_max_plain", "cnn_avg_bn", "cnn_nopool_hidden_tanh", "vgg_small_plain"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                  for n in sorted(CASES)])
def test_twin_matches_torch(name):
    p = build_case(name)
    check_gaps(p)


@pytest.mark.parametrize("name,chunk,n", [("mlp_bn_small", 4, 10), ("quadratic_3d", 3, 10),
                                          pytest.param("mlp_bn_relu", 5, 10, marks=pytest.mark.slow),
                                          pytest.param("cnn_max_bn", 3, 11, marks=pytest.mark.slow)])
def test_chunked_full_batch_matches_torch(name, chunk, n):
    p = build_case(name, chunk_size=chunk, n=n)
    jp = JaxProblem(p)
    assert jp.chunk_sizes() == [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    check_gaps(p)


def test_chunking_changes_a_batchnorm_loss():
    """Control: with BatchNorm the chunked loss differs from the one-batch loss, so the chunked
    agreement above really checks the chunk semantics."""
    one, chunked = build_case("mlp_bn_small"), build_case("mlp_bn_small", chunk_size=4)
    theta, _ = random_theta(one, 0)
    a = JaxProblem(one).ops.loss(JaxProblem(one).theta(theta))
    b = JaxProblem(chunked).ops.loss(JaxProblem(chunked).theta(theta))
    assert rel(a, b) > 1e-6


def decomposed_batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                          eps=1e-5):
    """F.batch_norm in training mode from primitives.  torch's fused batch_norm gives wrong derivatives
    from the third order on (pytorch/pytorch#186256: its double backward treats the batch statistics
    as constants), so the torch reference for ∇³L uses this instead."""
    assert training and running_mean is None
    axes = [0] + list(range(2, x.ndim))
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * weight.reshape(shape) + bias.reshape(shape) if weight is not None else y


def torch_d3(p: Problem, theta, v) -> torch.Tensor:
    """∇³L[v, v] by torch.func: jvp (along v) of the forward-over-reverse HVP, summed over chunks."""
    total = torch.zeros_like(theta)
    for batch, w in p.chunks():
        def hv(th, batch=batch):
            g = torch.func.grad(lambda t: p.functional_loss(t, batch))
            return torch.func.jvp(g, (th,), (v,))[1]

        total += w * torch.func.jvp(hv, (theta,), (v,))[1]
    return total


@pytest.mark.parametrize("name,chunk", [("mlp_tanh", None), ("quadratic_3d", None),
                                        pytest.param("mlp_bn_relu", 4, marks=pytest.mark.slow),
                                        pytest.param("cnn_avg_bn", None, marks=pytest.mark.slow)])
def test_third_derivative_matches_torch(name, chunk, monkeypatch):
    p = build_case(name, chunk_size=chunk)
    theta, v = random_theta(p, 3)
    jp = JaxProblem(p)
    d3 = np.asarray(jp.ops.d3(jp.theta(theta), jp.theta(v)))
    bound = roundoff_bound(p, passes=6)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", decomposed_batch_norm)
    ref = torch_d3(p, theta, v).numpy()
    if name.startswith("quadratic"):  # a quadratic has ∇³L = 0
        assert np.abs(d3).max() == 0.0 and np.abs(ref).max() == 0.0
    else:
        assert np.linalg.norm(ref) > 0 and rel(d3, ref) <= bound, (rel(d3, ref), bound)


def test_third_derivative_through_batchnorm(monkeypatch):
    """BatchNorm, chunked: ∇³L[v, v] against (1) torch.func on a BatchNorm made of primitives and
    (2) Richardson-extrapolated central differences of the torch HVP along v (no third-order
    autodiff at all): error c·h⁴ + O(eps/h)|Hv|; c·h⁴ ≈ (16/15)|R(h) − R(h/2)| (one more
    Richardson level), allowed twice over, plus 10× the round-off of the differences."""
    p = build_case("mlp_bn_tanh_nobias_mse", chunk_size=4)
    theta, v = random_theta(p, 3)
    v = v / torch.linalg.vector_norm(v)
    jp = JaxProblem(p)
    d3 = np.asarray(jp.ops.d3(jp.theta(theta), jp.theta(v)))

    def central(h):
        return ((p.full_hvp(theta + h * v, v) - p.full_hvp(theta - h * v, v)) / (2 * h)).numpy()

    def richardson(h):
        return (4 * central(h / 2) - central(h)) / 3

    h = 1e-2
    fd, fd_half = richardson(h), richardson(h / 2)
    hv = p.full_hvp(theta, v).numpy()
    allowed = 2 * (16 / 15) * np.linalg.norm(fd - fd_half) + 10 * EPS * np.linalg.norm(hv) / (h / 2)
    assert np.linalg.norm(d3 - fd) <= allowed, (np.linalg.norm(d3 - fd), allowed)
    assert allowed <= 1e-6 * np.linalg.norm(fd)  # control: far below the quantity checked
    bound = roundoff_bound(p, passes=6)
    monkeypatch.setattr(torch.nn.functional, "batch_norm", decomposed_batch_norm)
    ref = torch_d3(p, theta, v).numpy()
    assert rel(d3, ref) <= bound, (rel(d3, ref), bound)


def test_ops_interface():
    p = build_case("quadratic_3d", chunk_size=4)
    jp = JaxProblem(p)
    theta, v = random_theta(p, 5)
    th, vv = jp.theta(theta), jp.theta(v)
    ops = jp.ops
    loss, g = ops.loss_and_grad(th)
    assert float(ops.loss(th)) == pytest.approx(float(loss), rel=1e-14, abs=0)
    np.testing.assert_allclose(np.asarray(ops.grad(th)), np.asarray(g), rtol=1e-14, atol=0)
    assert ops.hvp(th, vv).shape == (p.dim,)
    assert ops.grad(th).dtype == np.float64
    # the functions trace inside an outer jit (as an integrator uses them), with only + − * and scalars
    field = jax.jit(lambda t: -ops.grad(t) - 0.05 * ops.hvp(t, ops.grad(t)))
    assert np.all(np.isfinite(np.asarray(field(th))))
    back = jp.to_torch(g)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64 and back.device == p.device


def test_control_detects_a_wrong_layer():
    """Control: the comparison does see a one-parameter difference (LeakyReLU slope 0.01 vs 0.02)."""
    p = build_case("mlp_leaky_relu")
    theta, v = random_theta(p, 0)
    jp = JaxProblem(p)
    for m in p.module.modules():
        if isinstance(m, nn.LeakyReLU):
            m.negative_slope = 0.2
    t = torch_values(p, theta, v)
    j = jax_values(jp, theta, v)
    assert rel(j[1], t[1].numpy()) > 1e-6


def test_float32_twin_is_as_accurate_as_torch_float32():
    """Float32: the twin's error against the float64 result is of the size of torch float32's own
    (within a factor 10, plus 10 ulp for the case where torch happens to be exact)."""
    eps32 = float(np.finfo(np.float32).eps)
    for name in ("mlp_tanh",):
        p64 = build_case(name)
        theta, v = random_theta(p64, 7)
        ref = torch_values(p64, theta, v)
        p32 = build_case(name, dtype=torch.float32)
        t32 = torch_values(p32, theta.float(), v.float())
        jp = JaxProblem(p32)
        assert jp.ops.grad(jp.theta(theta)).dtype == np.float32
        j32 = jax_values(jp, theta.float(), v.float())
        for i in range(3):
            mine = rel(j32[i], np.asarray(ref[i]))
            theirs = rel(np.asarray(t32[i]), np.asarray(ref[i]))
            assert mine <= 10 * theirs + 10 * eps32, (name, i, mine, theirs)


def test_user_model_without_twin_gets_a_clear_error():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) ** 2

    X, y, c = classification((4,))
    p = make_problem(Custom(), losses.cross_entropy, X, y, c)
    with pytest.raises(FlowlabError, match="no JAX twin.*Custom.*torchdiffeq"):
        JaxProblem(p)


def test_unsupported_parts_are_named():
    X, y, c = classification((4,))
    seq = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Linear(5, 3))
    with pytest.raises(FlowlabError, match=r"Dropout '1' has p=0.5.*torchdiffeq"):
        JaxProblem(make_problem(seq, losses.cross_entropy, X, y, c))
    seq = nn.Sequential(nn.Linear(4, 5), nn.ELU(), nn.Linear(5, 3))
    with pytest.raises(FlowlabError, match=r"layer '1' is a torch.nn.modules.activation.ELU"):
        JaxProblem(make_problem(seq, losses.cross_entropy, X, y, c))
    seq = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(FlowlabError, match="loss .*half_ce.* has no JAX twin"):
        def half_ce(out, target):
            return 0.5 * losses.cross_entropy(out, target)

        JaxProblem(make_problem(seq, half_ce, X, y, c))


def test_user_sequential_of_supported_layers_has_a_twin():
    """Any model built only from supported layers works, including shared parameters and Dropout(0)."""
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)
    seq = nn.Sequential(nn.Linear(4, 5), nn.Softplus(beta=2.0, threshold=1.0), shared, nn.GELU(approximate="tanh"),
                        shared, nn.Dropout(0.0), nn.Sigmoid(), nn.Linear(5, 3))
    X, y, c = classification((4,))
    p = make_problem(seq, losses.cross_entropy, X, y, c)
    assert len(p.layout) == 6  # the shared layer's parameters appear once
    check_gaps(p)


@pytest.mark.slow
def test_conv_geometry_variants():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=1), nn.ReLU(),
                        nn.Conv2d(4, 4, 2, padding="same", groups=2, bias=False), nn.BatchNorm2d(4, eps=1e-3),
                        nn.Tanh(), nn.MaxPool2d(3, stride=2, padding=1), nn.AvgPool2d(2, padding=1, count_include_pad=False),
                        nn.Flatten(), nn.Linear(16, 3))
    X, y, c = classification((2, 7, 7))
    p = make_problem(seq, losses.cross_entropy, X, y, c)
    check_gaps(p)


@pytest.mark.parametrize("conv", ["lax", "im2col"])
def test_both_convolution_forms_match_torch(conv):
    """Stride, padding, dilation, a 1x1 and a non-square kernel: the lax convolution and the im2col
    matrix product (the CPU default, fast inside the diffrax kernel's loop) agree with torch."""
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)), nn.ReLU(),
                        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 2, 3, padding="same", dilation=2),
                        nn.Flatten(), nn.LazyLinear(3))
    X, y, c = classification((2, 7, 6))
    seq(X)  # materialise the lazy layer
    seq = nn.Sequential(*[m if not isinstance(m, nn.Linear) else nn.Linear(m.in_features, 3) for m in seq])
    p = make_problem(seq, losses.cross_entropy, X, y, c)
    check_gaps(p, conv=conv)


def test_unknown_convolution_form_is_named():
    torch.manual_seed(0)
    p = make_problem(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), losses.cross_entropy,
                     *classification((1, 3, 3), classes=2))
    with pytest.raises(FlowlabError, match="conv = 'fft'.*auto, lax, im2col"):
        JaxProblem(p, conv="fft")


def test_twin_from_a_built_study_is_cached():
    from flowlab import build, parse_study

    study = parse_study({"study": {"dtype": "float64", "device": "cpu"},
                         "model": {"name": "mlp", "widths": [8], "activation": "tanh"},
                         "data": {"name": "digits", "n": 60, "chunk_size": 25},
                         "optimizer": {"lr": 0.1, "steps": 1}})
    p = build(study).problem
    jp = jax_problem(p)
    assert jax_problem(p) is jp and jp.chunk_sizes() == [25, 25, 10]
    assert jp.device.platform == "cpu"
    check_gaps(p)


X64_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import torch
    import jax
    from flowlab import losses, models
    from flowlab.data import Data
    from flowlab.problem import Problem
    from flowlab.jaxbackend import JaxProblem

    def problem(dtype):
        torch.manual_seed(0)
        m = models.mlp(widths=[4], activation="tanh", input_shape=(3,), num_outputs=2).to(dtype)
        g = torch.Generator().manual_seed(1)
        X, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
        return Problem(m, losses.cross_entropy, Data(X, y, 2), dtype=dtype)

    out = {"x64_at_start": bool(jax.config.jax_enable_x64)}
    p32 = problem(torch.float32)
    j32 = JaxProblem(p32)
    g32 = np.asarray(j32.ops.grad(j32.theta(p32.theta0)))
    out["x64_after_float32_twin"] = bool(jax.config.jax_enable_x64)
    out["float32_dtypes"] = [str(g32.dtype), str(j32.X.dtype)]
    p64 = problem(torch.float64)
    j64 = JaxProblem(p64)
    g64 = np.asarray(j64.ops.grad(j64.theta(p64.theta0)))
    out["x64_after_float64_twin"] = bool(jax.config.jax_enable_x64)
    out["float64_dtype"] = str(g64.dtype)
    ref = p64.full_loss_and_grad(p64.theta0)[1].numpy()
    out["float64_gap"] = float(np.linalg.norm(g64 - ref) / np.linalg.norm(ref))
    again = JaxProblem(p32)  # a float32 twin built after the switch, and the first one re-run
    for g in (np.asarray(again.ops.grad(again.theta(p32.theta0))), np.asarray(j32.ops.grad(j32.theta(p32.theta0)))):
        out.setdefault("float32_after", []).append([str(g.dtype), bool(np.array_equal(g, g32))])
    print(json.dumps(out))
""")


def test_x64_switch_is_turned_on_by_float64_twins_only():
    """JAX's float64 switch is global to the process, so it is checked in a fresh one: off at
    start, still off after a float32 twin, on after a float64 twin (whose gradient is float64:
    within float64 round-off of torch's, 64·eps — a float32 computation would be ~1e-7 off), and a
    float32 twin — built before or after the switch — still computes in float32, bit for bit as
    before it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    run = subprocess.run([sys.executable, "-c", X64_SCRIPT], capture_output=True, text=True, env=env, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["x64_at_start"] is False and out["x64_after_float32_twin"] is False, out
    assert out["float32_dtypes"] == ["float32", "float32"], out
    assert out["x64_after_float64_twin"] is True and out["float64_dtype"] == "float64", out
    assert out["float64_gap"] <= 64 * np.finfo(np.float64).eps, out
    assert out["float32_after"] == [["float32", True], ["float32", True]], out


def test_conv_auto_selects_im2col_on_cpu_and_lax_elsewhere():
    """conv = "auto": im2col matrix products where the platform is the CPU, lax convolutions on any
    other platform (a GPU); the selection is by the platform argument, so no GPU is needed to
    check it.  Grouped convolutions always take lax; lax and im2col given explicitly win."""
    from flowlab.jaxbackend.twin import model_twin

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                        nn.Linear(4 * 3 * 3, 3)).double()
    x = np.asarray(torch.randn(2, 2, 5, 5, dtype=torch.float64).numpy())
    theta = np.concatenate([q.detach().reshape(-1).numpy() for q in seq.parameters()])

    def lax_convs(**options) -> int:
        jaxpr = jax.make_jaxpr(model_twin(seq, **options))(theta, x)
        return str(jaxpr).count("conv_general_dilated")

    assert lax_convs(conv="auto", platform="cpu") == 1  # only the grouped one
    assert lax_convs(conv="auto", platform="gpu") == 2
    assert lax_convs(conv="auto", platform="cuda") == 2
    assert lax_convs(conv="im2col", platform="gpu") == 1 and lax_convs(conv="lax", platform="cpu") == 2
    # a twin built for a Problem passes its JAX device's platform (the CPU here): im2col
    p = make_problem(seq, losses.cross_entropy, torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 0]), 3)
    jp = JaxProblem(p)
    assert jp.device.platform == "cpu"
    assert str(jax.make_jaxpr(jp.apply)(jp.theta(p.theta0), jp.X)).count("conv_general_dilated") == 1


def test_package_import_does_not_import_jax():
    code = "import sys, flowlab.jaxbackend; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16_narrow", "vgg16_narrow_plain", "vgg16_tiny"])
def test_vgg16_twins(name):
    builders = {
        "vgg16_narrow": lambda: models.vgg16_narrow(num_outputs=3),
        "vgg16_narrow_plain": lambda: models.vgg16_narrow(batchnorm=False, num_outputs=3),
        "vgg16_tiny": lambda: models.vgg16(width=1 / 32, classifier=(16, 16), input_shape=(3, 32, 32), num_outputs=3),
    }
    torch.manual_seed(0)
    module = builders[name]()
    X, y, c = classification((3, 32, 32), n=6)
    p = make_problem(module, losses.cross_entropy, X, y, c, chunk_size=4)
    check_gaps(p)
