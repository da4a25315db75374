"""Group detection on networks written here (not the zoo): the detected groups must be exactly the
ones docs/theory.md#groups-in-real-networks defines — no missing, no false.  Each expected group is written out by hand from
the parameter shapes (W[c], b[c], W'[:, c], ...), independently of the detector.

The networks live in ``tests/helper_models.py`` (a plain module: the run tests name them as
``[model] name = "helper_models:..."``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helper_models import (
    LNMLP,
    RMSMLP,
    CatMLP,
    ComputedWeight,
    GNConv,
    GroupedConv,
    INConv,
    Shared,
    leaky_mlp,
    prelu_mlp,
    res_mlp,
    tanh_net,
    vgg_style,
    weight_norm_mlp,
)
from torch import nn

from flowlab.problem import ParamLayout
from flowlab.symmetry import detect

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


def test_instancenorm_per_channel_scale_and_affine_rescale():
    m = INConv()
    ii = ix(m)  # conv.weight (4, 1, 3, 3); InstanceNorm2d(4, affine); fc reads 4 × 6 × 6 = 144 columns
    expected = set([grp("scale", [ii["conv.weight"][c], ii["conv.bias"][c]]) for c in range(4)]
                   + rescale_units(ii, "inorm", "fc", 4, cols_per_unit=36) + translation(ii, "fc", 144))
    got, det = found(m, IMG)
    assert got == expected
    assert (det.groups.eps[det.groups.kinds == "scale"] == 1e-5).all()


def test_rmsnorm_whole_layer_scale_and_weight_only_rescale():
    m = RMSMLP(eps=1e-6)
    ii = ix(m)  # fc1 (6, 64) → RMSNorm(6): one scale group; rms.weight[c] has no bias partner
    expected = set([grp("scale", [ii["fc1.weight"], ii["fc1.bias"]])]
                   + [grp("rescale", [ii["rms.weight"][c]], [ii["fc2.weight"][:, c]]) for c in range(6)]
                   + translation(ii, "fc2", 6))
    got, det = found(m, IMG)
    assert got == expected
    assert (det.groups.eps[det.groups.kinds == "scale"] == 1e-6).all()


def test_prelu_passes_rescale_and_its_slopes_get_no_group():
    m = prelu_mlp()
    ii = ix(m)  # 1: Linear(64, 7), 2: PReLU(1), 3: Linear(7, 5), 4: PReLU(5), 5: Linear(5, 4)
    expected = set(rescale_units(ii, "1", "3", 7) + rescale_units(ii, "3", "5", 5) + translation(ii, "5", 5))
    got, det = found(m, IMG)
    assert got == expected
    slopes = {s.layer: s.reason for s in det.skipped if s.layer in ("2", "4")}
    assert set(slopes) == {"2", "4"} and all("prelu" in r for r in slopes.values()), det.skipped


def test_cat_ends_the_search_with_a_reason():
    m = CatMLP()
    ii = ix(m)
    # fc0's channel c is read by both branches: one group with both outgoing columns; the branches
    # fa, fb end in cat (mixing: no group, said why)
    expected = {grp("rescale", [ii["fc0.weight"][c], ii["fc0.bias"][c]], [ii["fa.weight"][:, c], ii["fb.weight"][:, c]])
                for c in range(6)} | set(translation(ii, "head", 5))
    got, det = found(m, IMG)
    assert got == expected
    reasons = {s.layer: s.reason for s in det.skipped}
    assert "cat" in reasons["fa"] and "cat" in reasons["fb"], det.skipped


def test_computed_weights_get_no_group_with_a_reason():
    m = ComputedWeight()
    ii = ix(m)
    # the middle layer's weight is tanh(raw) (computed): no group for it, none for fc1 that feeds it
    expected = set(rescale_units(ii, "fc2", "out", 4) + translation(ii, "out", 4))
    got, det = found(m, IMG)
    assert got == expected
    reasons = {s.layer: s.reason for s in det.skipped}
    assert "computed" in reasons["mid_bias"] and "not a plain parameter" in reasons["fc1"], det.skipped
    assert "raw" in reasons and "tanh" in reasons["raw"]


def test_weight_norm_parametrization_gets_no_group():
    m = weight_norm_mlp()
    ii = ix(m)  # 3.weight = g·v/|v| is computed from 3.parametrizations.weight.original0/1
    got, det = found(m, IMG)
    assert got == set(translation(ii, "5", 5))
    reasons = {s.layer: s.reason for s in det.skipped}
    assert "computed" in reasons["3"] and "not a plain parameter" in reasons["1"], det.skipped


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
