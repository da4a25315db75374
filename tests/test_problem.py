"""Problem: flat-θ layout, loss/grad/hvp against autograd on the module, chunked full batches."""

import math

import pytest
import torch
from torch import nn

from flowlab.data import Data
from flowlab.losses import cross_entropy, mse
from flowlab.models import cnn, mlp
from flowlab.problem import ParamLayout, Problem


def _data(n=60, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Data(torch.randn(n, d, generator=g, dtype=torch.float64),
                torch.randint(0, classes, (n,), generator=g), classes)


def _problem(model=None, data=None, **kw):
    torch.manual_seed(0)
    data = data or _data()
    model = model or mlp(widths=[8, 8], activation="tanh", input_shape=data.input_shape, num_outputs=3)
    return Problem(model, kw.pop("loss", cross_entropy), data, dtype=torch.float64, **kw)


def test_layout_is_parameters_to_vector_order():
    torch.manual_seed(0)
    model = mlp(widths=[5, 4], batchnorm=True, input_shape=(3,), num_outputs=2)
    expected = nn.utils.parameters_to_vector(model.parameters()).detach().double()
    p = Problem(model, cross_entropy, _data(d=3, classes=2), dtype=torch.float64)
    assert torch.equal(p.theta0, expected)
    names = [n for n, _ in model.named_parameters()]
    assert p.layout.names == names
    assert "2.running_mean" not in p.layout  # buffers are not parameters
    for e in p.layout.entries:
        assert torch.equal(p.theta0[e.slice].view(e.shape), dict(model.named_parameters())[e.name].detach())
    round_trip = ParamLayout.from_dict(p.layout.to_dict())
    assert round_trip.names == p.layout.names and round_trip.size == p.dim
    assert torch.equal(p.layout.flatten(p.layout.unflatten(p.theta0)), p.theta0)
    assert p.layout.name_of(p.layout.entries[1].offset) == names[1]


def test_grad_matches_autograd_on_a_copy_of_the_module():
    import copy

    p = _problem()
    theta = p.theta0 + 0.1 * torch.randn(p.dim, dtype=torch.float64)
    ref = copy.deepcopy(p.module)
    with torch.no_grad():
        nn.utils.vector_to_parameters(theta.clone(), ref.parameters())
    idx = torch.arange(10, 40)
    loss = cross_entropy(ref(p.X[idx]), p.y[idx])
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = torch.cat([g.reshape(-1) for g in grads])
    l2, g2 = p.loss_and_grad(theta, p.batch(idx))
    assert torch.equal(g2, expected) and float(l2) == float(loss.detach())
    assert float(p.loss(theta, p.batch(idx))) == float(loss.detach())
    # the functional form agrees (it is what torch.func transforms see)
    th = theta.clone().requires_grad_(True)
    (g3,) = torch.autograd.grad(p.functional_loss(th, p.batch(idx)), th)
    assert torch.allclose(g3, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["forward_over_reverse", "double_backward", "auto"])
def test_hvp_matches_central_differences(method):
    p = _problem(hvp=method)
    theta = p.theta0.clone()
    v = torch.randn(p.dim, dtype=torch.float64)
    v /= v.norm()
    hv = p.hvp(theta, v, p.batch())

    def fd(eps):
        return (p.grad(theta + eps * v, p.batch()) - p.grad(theta - eps * v, p.batch())) / (2 * eps)

    # Richardson-extrapolated central differences: truncation O(eps⁴) ~ 1e-12, round-off ~ 1e-16/eps ~ 1e-13
    eps = 1e-3
    richardson = (4 * fd(eps / 2) - fd(eps)) / 3
    assert (hv - richardson).norm() / hv.norm() < 1e-10
    assert p.hvp_method in ("forward_over_reverse", "double_backward")


def test_hvp_is_symmetric():
    p = _problem()
    u, v = torch.randn(p.dim, dtype=torch.float64), torch.randn(p.dim, dtype=torch.float64)
    a = torch.dot(u, p.hvp(p.theta0, v, p.batch()))
    b = torch.dot(v, p.hvp(p.theta0, u, p.batch()))
    assert abs(a - b) <= 1e-12 * (abs(a) + abs(b))


def test_full_batch_chunks_equal_one_batch():
    whole = _problem()
    chunked = _problem(chunk_size=7)
    assert len(list(chunked.chunks())) == math.ceil(60 / 7)
    theta = whole.theta0 + 0.05
    l1, g1 = whole.full_loss_and_grad(theta)
    l2, g2 = chunked.full_loss_and_grad(theta)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-15 * g1.abs().max() * 10)
    assert abs(float(l1) - float(l2)) < 1e-14
    assert abs(float(chunked.full_loss(theta)) - float(l1)) < 1e-14
    v = torch.randn(whole.dim, dtype=torch.float64)
    assert torch.allclose(whole.full_hvp(theta, v), chunked.full_hvp(theta, v), rtol=1e-12, atol=1e-14)


def test_batchnorm_runs_in_train_mode_and_hvp_leaves_running_stats_alone():
    data = Data(torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (32,)), 4)
    torch.manual_seed(0)
    p = _problem(model=cnn(channels=[4], batchnorm=True, input_shape=(1, 8, 8), num_outputs=4), data=data)
    bn = p.module[1]
    bn.eps = 1e-14  # BN's ε is what makes scale invariance approximate; make it negligible here
    before = bn.running_mean.clone()
    v = torch.ones(p.dim, dtype=torch.float64)
    p.hvp(p.theta0, v, p.batch())
    p.full_loss_and_grad(p.theta0)
    p.d3(p.theta0, v, p.batch())
    assert torch.equal(bn.running_mean, before)  # only the discrete run updates running statistics
    p.loss_and_grad_(p.theta0, p.batch(), update_stats=True)
    assert not torch.equal(bn.running_mean, before)
    # train mode: the loss uses batch statistics, so it does not depend on running statistics
    l1 = p.loss(p.theta0, p.batch())
    bn.running_mean.add_(10.0)
    assert float(p.loss(p.theta0, p.batch())) == float(l1)
    # scale invariance of the channel feeding BN (a direct consequence of batch statistics)
    theta = p.theta0.clone()
    w, b = p.layout["0.weight"], p.layout["0.bias"]
    theta[w.slice] *= 3.0
    theta[b.slice] *= 3.0
    assert abs(float(p.loss(theta, p.batch())) - float(l1)) < 1e-12


def test_mse_and_float32():
    data = Data(torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64), None)
    torch.manual_seed(0)
    p = Problem(mlp(widths=[5], input_shape=(4,), num_outputs=2), mse, data, dtype=torch.float32)
    assert p.theta0.dtype == torch.float32 and p.X.dtype == torch.float32
    loss, g = p.full_loss_and_grad(p.theta0)
    out = p.module(p.X)
    # ½ squared error summed over outputs, mean over the batch: float32 round-off of a 40-term sum
    assert torch.allclose(loss, 0.5 * ((out - p.y) ** 2).sum(1).mean(), rtol=40 * 2.0**-24, atol=0)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_auto_chunk_size_fits_the_free_memory(monkeypatch):
    """``data.chunk_size = "auto"`` (issue 12 item 4): as many examples per chunk as fit in half the
    free memory at CHUNK_PASS_FACTOR × the per-example bytes of a gradient pass; the whole dataset
    when it fits.  Chunks change no full-batch number (beyond round-off) on a model without
    BatchNorm; with BatchNorm, splitting is warned (each chunk has its own statistics)."""
    import flowlab.problem as problem_mod

    whole = _problem()
    per = whole.example_bytes()
    # outputs of the leaf modules of the tanh MLP on 6 inputs: 8 + 8 + 8 + 8 + 3 (+ a flatten), kept twice
    assert 2 * 8 * (8 + 8 + 8 + 8 + 3) <= per <= 2 * 8 * (8 + 8 + 8 + 8 + 3 + 6 + 1)
    need = per * Problem.CHUNK_PASS_FACTOR / Problem.CHUNK_MEMORY_FRACTION
    assert whole.auto_chunk_size(free_bytes=need * 1e6) == 60  # fits: one chunk
    assert whole.auto_chunk_size(free_bytes=need * 13.5) == 13
    assert whole.auto_chunk_size(free_bytes=1.0) == 1

    monkeypatch.setattr(problem_mod, "free_memory", lambda device: need * 9.2)
    auto = _problem(chunk_size="auto")
    assert auto.chunk_auto and auto.chunk_size == 9 and len(list(auto.chunks())) == math.ceil(60 / 9)
    assert auto.counts["grad"] == 0  # the probe is not counted
    theta = whole.theta0 + 0.05
    l1, g1 = whole.full_loss_and_grad(theta)
    l2, g2 = auto.full_loss_and_grad(theta)
    assert torch.allclose(g1, g2, rtol=0, atol=1e-14 * g1.abs().max())
    assert abs(float(l1) - float(l2)) < 1e-14

    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match="BatchNorm"):
        _problem(model=bn, chunk_size="auto")
    with pytest.raises(ValueError, match="data.chunk_size"):
        _problem(chunk_size="big")
