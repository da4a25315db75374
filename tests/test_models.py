"""The model zoo: shapes inferred from data, seeded initialisation, the paper's VGG-16 shapes."""

import pytest
import torch
from torch import nn

import flowlab
from flowlab.models import MODELS, vgg16, vgg16_narrow


@pytest.mark.parametrize("name, options, data", [
    ("linear", {}, {"name": "digits", "n": 50}),
    ("deep_linear", {"widths": [7, 7]}, {"name": "digits", "n": 50}),
    ("mlp", {"widths": [9], "activation": "leaky_relu", "batchnorm": True}, {"name": "digits", "n": 50}),
    ("cnn", {"channels": [3, 4], "batchnorm": True, "pool": "avg"}, {"name": "digits", "n": 50, "image": True}),
    ("vgg", {"config": [16, "M", 32, "M"], "width": 0.25, "classifier": [16]}, {"name": "digits", "n": 50, "image": True}),
    ("quadratic", {"A": [[2.0, 0.5], [0.5, 1.0]], "theta0": [1.0, -1.0]}, {"name": "points"}),
])
def test_zoo_models_build_and_run(name, options, data):
    study = flowlab.parse_study({"study": {"seed": 5}, "model": {"name": name, **options}, "data": data,
                                 "optimizer": {"lr": 0.01, "steps": 2}})
    built = flowlab.build(study)
    p = built.problem
    loss, g = p.full_loss_and_grad(p.theta0)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and g.abs().sum() > 0
    again = flowlab.build(study).problem
    assert torch.equal(again.theta0, p.theta0)  # seeded, deterministic initialisation


def test_quadratic_is_the_closed_form():
    study = flowlab.parse_study({"model": {"name": "quadratic", "theta0": [1.0, 2.0]}, "data": {"name": "points"},
                                 "optimizer": {"lr": 0.1, "steps": 1}})
    p = flowlab.build(study).problem
    A = torch.tensor([[2.5, -1.5], [-1.5, 2.5]], dtype=torch.float64)
    th = torch.tensor([0.3, -0.7], dtype=torch.float64)
    # tolerances: a few roundings of O(1) numbers; atol/abs set (defaults 1e-8 / 1e-12 would dominate)
    assert float(p.full_loss(th)) == pytest.approx(float(0.5 * th @ A @ th), rel=4e-16, abs=0)
    assert torch.allclose(p.full_grad(th), A @ th, rtol=4e-16, atol=0)
    v = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert torch.allclose(p.full_hvp(th, v), A @ v, rtol=4e-16, atol=0)


def test_vgg16_has_the_papers_tiny_imagenet_shapes():
    torch.manual_seed(0)
    model = vgg16(batchnorm=True)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 1024), (1024, 1024), (1024, 200)]
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and convs[0].in_channels == 3 and convs[-1].out_channels == 512
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 13
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 200)
    narrow = vgg16_narrow()
    assert [m.out_channels for m in narrow.features if isinstance(m, nn.Conv2d)][:2] == [8, 8]
    assert sum(p.numel() for p in narrow.parameters()) < 400_000


def test_registry_lists_names_on_unknown_model():
    with pytest.raises(flowlab.ConfigError, match="known: .*cnn.*mlp.*vgg16"):
        MODELS.resolve("resnet", "model.name")
