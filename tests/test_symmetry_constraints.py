"""Gradient and Hessian constraints of every detected group, on random θ and random batches (float64),
and the projector's vectorised sums against plain per-group loops.

Tolerance 1e-10 (the issue's bound).  Round-off: a relative residual of a float64 inner product
of backpropagated quantities is a few ε·√n ≈ 1e-15…1e-14 here; a wrong group gives O(1)
(checked below, so the test can fail).
"""

from __future__ import annotations

import numpy as np
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
    bn_eps_defects,
    leaky_mlp,
    prelu_mlp,
    res_mlp,
    tanh_net,
    vgg_style,
)
from torch import nn

from flowlab.data import Data
from flowlab.problem import Problem
from flowlab.symmetry import Groups, GroupSpec, SymmetryProjector, check_constraints, detect_problem
from flowlab.symmetry.groups import build_user_blocks

TOL = 1e-10

MODELS = {
    "vgg_bn": lambda: vgg_style(batchnorm=True),
    "vgg": lambda: vgg_style(batchnorm=False),
    "leaky_mlp": leaky_mlp,
    "tanh": tanh_net,
    "residual": res_mlp,
    "layernorm": lambda: LNMLP(4),
    "groupnorm": lambda: GNConv(4),
    "grouped_conv": lambda: GroupedConv(4),
    "instancenorm": lambda: INConv(4),
    "rmsnorm": lambda: RMSMLP(4),
    "prelu": prelu_mlp,
    "cat": lambda: CatMLP(4),
    "computed_weight": lambda: ComputedWeight(4),
}


def _problem(build, seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(24, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=gen)
    return Problem(build(), F.cross_entropy, Data(X, y, 4), dtype=torch.float64, hvp="double_backward")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_constraints_at_round_off(name):
    p = _problem(MODELS[name])
    groups = detect_problem(p).groups
    assert len(groups) > 0
    gen = torch.Generator().manual_seed(7)
    worst_g, worst_h = 0.0, 0.0
    for trial in range(2):  # random θ and random batches
        theta = p.theta0 + 0.5 * torch.randn(p.dim, generator=gen, dtype=torch.float64)
        batch = p.batch(torch.randperm(p.n, generator=gen)[:8])
        res = check_constraints(p, groups, theta, batch, hessian_per_layer=0, tolerance=TOL, seed=trial)
        assert not np.isnan(res.hessian).any()  # every group's Hessian identity was checked
        worst_g, worst_h = max(worst_g, res.gradient.max()), max(worst_h, res.hessian.max())
        assert res.ok, (name, res.by_layer())
    assert worst_g <= TOL and worst_h <= TOL
    print(f"{name}: {len(groups)} groups, max gradient residual {worst_g:.1e}, max Hessian residual {worst_h:.1e}")


def test_batchnorm_eps_makes_scale_groups_approximate():
    """With the real ε = 1e-5 each scale residual is the closed form of helper_models.bn_eps_defects
    (ε/(σ²+ε)·γ⟨∂L/∂out, ŷ⟩, far above round-off); check() sets ε ≈ 0 and gets round-off.

    Bounds: the measured and closed-form residuals are two float64 evaluations of one inner product
    normalised by |g_A||θ_A|, so they differ by round-off, a few ε·√n ≈ 1e-15 (n ≤ 37 members);
    atol 1e-14 (measured 5e-16).  The Hessian residual is at most |∇ρ|/|g_A| (its denominator
    h|s_A| + |r_A| ≥ |r_A| = |g_A|)."""
    p = _problem(lambda: vgg_style(batchnorm=True, dropout=0.0))  # no dropout: one function of θ
    groups = detect_problem(p).groups
    scale = groups.kinds == "scale"
    exact = check_constraints(p, groups, hessian_per_layer=0)
    loose = check_constraints(p, groups, hessian_per_layer=0, exact=False)
    assert exact.gradient[scale].max() <= TOL and exact.hessian[scale].max() <= TOL
    p.load(p.theta0)
    predicted, hess_bound = bn_eps_defects(p.module, p.X, p.y)
    assert list(groups.layers[scale]) == ["c1"] * 3 + ["c2"] * 4 and list(groups.units[scale]) == [0, 1, 2, 0, 1, 2, 3]
    np.testing.assert_allclose(loose.gradient[scale], predicted, rtol=0, atol=1e-14)
    assert predicted.min() > 1e3 * TOL  # the ε effect is far above round-off
    assert (loose.hessian[scale] <= hess_bound * (1 + 1e-12)).all()
    # the other kinds do not depend on ε: at round-off either way
    assert loose.gradient[~scale].max() <= TOL and np.nanmax(loose.hessian[~scale]) <= TOL
    assert any("ε > 0" in n for n in loose.notes)


def _user_groups(p: Problem, specs: list[GroupSpec]) -> Groups:
    return Groups(p.layout, build_user_blocks(specs, p.layout))


def test_wrong_groups_are_flagged():
    """Declared groups that are not symmetries must fail the check (the check can catch a wrong group)."""
    p = _problem(tanh_net)
    wrong = _user_groups(p, [
        GroupSpec("rescale", "tanh-neuron", incoming=("1.weight[i, :]", "1.bias[i]"), outgoing=("3.weight[:, i]",)),
        GroupSpec("scale", "no-norm", params=("3.weight[0]", "3.bias[0]")),
        GroupSpec("translation", "hidden", params=("3.weight[:, 0]",)),
    ])
    right = _user_groups(p, [GroupSpec("rescale", "relu", incoming=("3.weight[i]", "3.bias[i]"), outgoing=("5.weight[:, i]",))])
    res = check_constraints(p, wrong, hessian_per_layer=0)
    assert res.flagged.all() and res.gradient.min() > 1e-3
    assert check_constraints(p, right, hessian_per_layer=0).ok


def _naive(groups: Groups, x: np.ndarray, y: np.ndarray | None = None, signed_translation: bool = False):
    """Per-group loops: the reference for the projector."""
    out = np.zeros(len(groups))
    for g in range(len(groups)):
        idx, sign = (t.numpy() for t in groups.members(g))
        if groups.kinds[g] == "translation":
            out[g] = x[idx].sum() if y is None else (x[idx] * y[idx]).sum()
        else:
            out[g] = (sign * x[idx] * (x[idx] if y is None else y[idx])).sum()
    return out


def test_projector_matches_per_group_loops():
    p = _problem(lambda: vgg_style(batchnorm=True))
    groups = detect_problem(p).groups
    extra = build_user_blocks([GroupSpec("scale", "user", params=("fc1.weight[2, 1:5]", "c2.bias[0]"))], p.layout)
    groups = groups.extend(extra)
    proj = SymmetryProjector(groups)
    gen = torch.Generator().manual_seed(3)
    thetas = torch.randn(3, p.dim, generator=gen, dtype=torch.float64)
    v = torch.randn(p.dim, generator=gen, dtype=torch.float64)
    Q = proj.quantities(thetas)
    assert Q.shape == (3, len(groups))
    for b in range(3):
        th = thetas[b].numpy()
        naive_q = _naive(groups, th)
        assert np.allclose(Q[b].numpy(), naive_q, rtol=1e-13, atol=1e-13)
        assert np.allclose(proj.quantities(thetas[b]).numpy(), naive_q, rtol=1e-13, atol=1e-13)
    th, vv = thetas[0].numpy(), v.numpy()
    t = groups.kinds == "translation"
    P, V, U = (a.numpy() for a in proj.momentum_terms(thetas[0], v))
    assert np.allclose(P[~t], _naive(groups, th, vv)[~t], rtol=1e-13, atol=1e-13) and (P[t] == 0).all()
    assert np.allclose(V[~t], _naive(groups, vv)[~t], rtol=1e-13, atol=1e-13) and (V[t] == 0).all()
    assert np.allclose(U[t], _naive(groups, vv)[t], rtol=1e-13, atol=1e-13) and (U[~t] == 0).all()
    G = proj.grad_terms(v).numpy()
    assert np.allclose(G[~t], _naive(groups, vv)[~t], rtol=1e-13, atol=1e-13) and (G[t] == 0).all()
    norms = proj.norms_sq(v).numpy()
    ref = np.array([(vv[groups.members(g)[0].numpy()] ** 2).sum() for g in range(len(groups))])
    assert np.allclose(norms, ref, rtol=1e-13, atol=0)  # sums of squares: no cancellation
    # float32 input is summed in float64
    q32 = proj.quantities(thetas[0].float()).numpy()
    assert np.allclose(q32, _naive(groups, thetas[0].float().double().numpy()), rtol=1e-12, atol=1e-12)
    assert groups.sizes[-1] == 5 and groups.kinds[-1] == "scale" and groups.layers[-1] == "user"


def test_user_group_specs_and_errors():
    from flowlab.errors import ConfigError

    p = _problem(leaky_mlp)
    blocks = build_user_blocks([GroupSpec("rescale", "", incoming=("1.weight[i, :]", "1.bias[i]"),
                                          outgoing=("4.weight[:, i]",))], p.layout)
    g = Groups(p.layout, blocks)
    assert len(g) == 7 and g.layers[0] == "1" and (g.sizes == 64 + 1 + 5).all()
    detected = detect_problem(p).groups
    same = detected.select(detected.layers == "1")
    for i in range(7):  # the user spec reproduces the detected groups of layer 1
        assert set(g.members(i)[0].tolist()) == set(same.members(i)[0].tolist())
    for bad, msg in [
        (GroupSpec("scale", params=("nope.weight",)), "no parameter"),
        (GroupSpec("scale", params=("1.weight[99]",)), "out of range"),
        (GroupSpec("scale", params=("1.weight[0]", "1.weight[0, 0]")), "twice"),
        (GroupSpec("rescale", incoming=("1.weight[i]",), outgoing=("4.weight[:, i]", "4.bias[i]")), "runs over"),
        (GroupSpec("scale", params=("1.weight[x]",)), "cannot read"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            build_user_blocks([bad], p.layout)


def test_exclude_and_detect_off():
    from flowlab.symmetry import build_groups, parse_symmetry

    p = _problem(lambda: vgg_style(batchnorm=True))
    full = build_groups(p)
    no_scale = build_groups(p, parse_symmetry({"exclude": ["scale:*", "fc2"]}))
    assert set(no_scale.kinds) == {"rescale"}
    assert len(no_scale) == len(full) - (full.kinds == "scale").sum() - (full.layers == "fc2").sum()
    only_user = build_groups(p, parse_symmetry({"detect": False, "groups": [
        {"kind": "translation", "params": ["fc2.bias"]}]}))
    assert len(only_user) == 1 and only_user.kinds[0] == "translation" and only_user.origins[0] == "user"


def test_projector_on_module_without_groups():
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.Tanh(), nn.Linear(3, 2))
    p = Problem(m, lambda o, t: 0.5 * (o - t).pow(2).sum(1).mean(),
                Data(torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), None),
                dtype=torch.float64)
    groups = detect_problem(p).groups
    assert len(groups) == 0
    assert SymmetryProjector(groups).quantities(p.theta0).shape == (0,)
