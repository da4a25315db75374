"""Group detection on networks written here (not the zoo): the detected groups must be exactly the
ones docs/theory.md#groups-in-real-networks defines — no missing, no false.  Each expected group is written out by hand from
the parameter shapes (W[c], b[c], W'[:, c], ...), independently of the detector.

The model builders are also used as ``[model] name = "test_symmetry_models:..."`` by the run tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowlab.problem import ParamLayout
from flowlab.symmetry import detect

# ------------------------------------------------------------------------ models


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


# ------------------------------------------------------------ expected groups


def ix(model: nn.Module) -> dict[str, torch.Tensor]:
    """Flat-θ indices of each parameter, shaped like it (θ in named_parameters order)."""
    out, off = {}, 0
    for name, p in model.named_parameters():
        out[name] = torch.arange(off, off + p.numel()).view(p.shape)
        off += p.numel()
    return out


def grp(kind: str, plus, minus=()) -> tuple:
    def cat(ts):
        return frozenset(torch.cat([t.reshape(-1) for t in ts]).tolist()) if ts else frozenset()

    return (kind, cat(list(plus)), cat(list(minus)))


def found(model: nn.Module, X: torch.Tensor, loss=F.cross_entropy, y=None):
    y = torch.randint(0, 3, (X.shape[0],)) if y is None else y
    det = detect(model, X, loss, y)
    g = det.groups
    got = []
    for i in range(len(g)):
        idx, sign = g.members(i)
        got.append((str(g.kinds[i]), frozenset(idx[sign > 0].tolist()), frozenset(idx[sign < 0].tolist())))
    assert len(got) == len(set(got)), "a group was found twice"
    assert g.layout.size == ParamLayout.from_module(model).size
    return set(got), det


def rescale_units(ii, layer, nxt, n, cols_per_unit: int = 1):
    return [grp("rescale", [ii[f"{layer}.weight"][c], ii[f"{layer}.bias"][c]],
                [ii[f"{nxt}.weight"][:, c * cols_per_unit:(c + 1) * cols_per_unit]]) for c in range(n)]


def translation(ii, layer, n_in):
    return [grp("translation", [ii[f"{layer}.weight"][:, j]]) for j in range(n_in)] + \
        [grp("translation", [ii[f"{layer}.bias"]])]


IMG = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_vgg_style_without_batchnorm():
    m = vgg_style(batchnorm=False)
    ii = ix(m)
    expected = set(rescale_units(ii, "c1", "c2", 3) + rescale_units(ii, "c2", "fc1", 4, cols_per_unit=4)
                   + rescale_units(ii, "fc1", "fc2", 6) + translation(ii, "fc2", 6))
    got, _ = found(m, IMG)
    assert got == expected


def test_vgg_style_with_batchnorm():
    m = vgg_style(batchnorm=True)
    ii = ix(m)
    expected = set(
        [grp("scale", [ii["c1.weight"][c], ii["c1.bias"][c]]) for c in range(3)]
        + rescale_units(ii, "b1", "c2", 3)
        + [grp("scale", [ii["c2.weight"][c], ii["c2.bias"][c]]) for c in range(4)]
        + rescale_units(ii, "b2", "fc1", 4, cols_per_unit=4)
        + rescale_units(ii, "fc1", "fc2", 6) + translation(ii, "fc2", 6))
    got, det = found(m, IMG)
    assert got == expected
    assert det.groups.eps[det.groups.kinds == "scale"].min() == 1e-5  # scale groups know their norm's ε


def test_mlp_leaky_relu_with_dropout():
    m = leaky_mlp()
    ii = ix(m)
    expected = set(rescale_units(ii, "1", "4", 7) + rescale_units(ii, "4", "6", 5) + translation(ii, "6", 5))
    got, _ = found(m, IMG)
    assert got == expected


def test_tanh_layer_gets_no_group():
    m = tanh_net()
    ii = ix(m)
    expected = set(rescale_units(ii, "3", "5", 5) + translation(ii, "5", 5))
    got, det = found(m, IMG)
    assert got == expected
    assert any(s.layer == "1" and "tanh" in s.reason for s in det.skipped)


def test_residual_block_no_false_group():
    m = res_mlp()
    ii = ix(m)
    # only blk1's neurons sit between two layers with nothing else reading them
    expected = set(rescale_units(ii, "blk1", "blk2", 5) + translation(ii, "head", 6))
    got, det = found(m, IMG)
    assert got == expected
    reasons = {s.layer: s.reason for s in det.skipped}
    assert "add" in reasons["inp"] and "add" in reasons["blk2"]


def test_gelu_and_mse_loss():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.GELU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    ii = ix(m)
    y = torch.randn(IMG.shape[0], 2, dtype=IMG.dtype)
    def mse(out, t):
        return 0.5 * (out - t).pow(2).sum(1).mean()

    got, det = found(m, IMG, mse, y)
    assert got == set(rescale_units(ii, "3", "5", 4))  # no translation with a squared error, none after GELU
    assert any(s.kind == "translation" for s in det.skipped)


def test_layernorm_whole_layer_scale_and_affine_rescale():
    m = LNMLP()
    ii = ix(m)
    expected = set([grp("scale", [ii["fc1.weight"], ii["fc1.bias"]])] + rescale_units(ii, "ln", "fc2", 6)
                   + translation(ii, "fc2", 6))
    got, _ = found(m, IMG)
    assert got == expected


def test_groupnorm_per_group_of_channels():
    m = GNConv()
    ii = ix(m)
    expected = set([grp("scale", [ii["conv.weight"][0:2], ii["conv.bias"][0:2]]),
                    grp("scale", [ii["conv.weight"][2:4], ii["conv.bias"][2:4]])]
                   + rescale_units(ii, "gn", "fc", 4, cols_per_unit=36) + translation(ii, "fc", 4 * 36))
    got, _ = found(m, IMG)
    assert got == expected


def test_grouped_convolution_outgoing_weights():
    m = GroupedConv()
    ii = ix(m)
    Wb = ii["b.weight"]  # (4, 2, 3, 3): output channels 0-1 read inputs 0-1, outputs 2-3 read inputs 2-3
    expected = {grp("rescale", [ii["a.weight"][c], ii["a.bias"][c]], [Wb[2 * (c // 2):2 * (c // 2) + 2, c % 2]])
                for c in range(4)}
    expected |= {grp("rescale", [ii["b.weight"][c]], [ii["fc.weight"][:, 16 * c:16 * (c + 1)]]) for c in range(4)}
    expected |= set(translation(ii, "fc", 64))
    got, _ = found(m, IMG)
    assert got == expected


def test_shared_weights_get_no_group():
    m = Shared()
    ii = ix(m)
    got, det = found(m, IMG)
    assert got == set(translation(ii, "out", 8))
    assert {s.layer for s in det.skipped} >= {"fc1", "sq"}


@pytest.mark.parametrize("batchnorm", [True, False])
def test_zoo_vgg16_narrow_counts(batchnorm):
    from flowlab.models import vgg16_narrow

    m = vgg16_narrow(batchnorm=batchnorm)
    X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    det = detect(m, X, F.cross_entropy, torch.tensor([0, 1, 2]))
    g = det.groups
    convs = [mod for mod in m.features if isinstance(mod, nn.Conv2d)]
    channels = sum(c.out_channels for c in convs)
    hidden = sum(fc.out_features for fc in m.classifier if isinstance(fc, nn.Linear)) - 10
    last_in = [fc for fc in m.classifier if isinstance(fc, nn.Linear)][-1].in_features
    assert (g.kinds == "scale").sum() == (channels if batchnorm else 0)
    assert (g.kinds == "rescale").sum() == channels + hidden
    assert (g.kinds == "translation").sum() == last_in + 1
