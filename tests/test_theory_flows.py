"""Each flow's own law, integrated alongside it, holds along its trajectory to solver tolerance.

Bounds, relative to the group's scale s_A (float64, rtol 1e-10, atol 1e-12):
- scale and rescale: θ and the law's state Q_law are one ODE state, each component held to rtol per
  step; over this horizon the global error of a component stays below 10·rtol of its size (as in
  tests/test_flows_quadratic.py).  Q = ⟨θ, θ⟩_A is quadratic (2 × the relative error of θ_A) and
  s_A ≥ |Q|, so |Q − Q_law| / s_A ≤ (2 + 1)·10·rtol = 3e-9 (measured ≤ 1.6e-11).
- translation: S = ⟨1_A, θ⟩ − S_law is a LINEAR function of the state that obeys a linear ODE from
  0 (⟨1_A, ∇L⟩ = 0), and every Runge–Kutta method keeps linear invariants exactly, so only
  round-off is left: a few ε per field evaluation, ≤ 4ε·n_grad_evals (measured ≤ 3.1e-15, with
  ~700–1400 evaluations).
"""

import numpy as np
import pytest
import torch
from conftest import small_study

import flowlab

SGD_FLOWS = ["gradient_flow", "modified_loss", "modified_temporal", "modified_second_order"]
MOMENTUM_FLOWS = ["momentum_first_order", "momentum_second_order", "momentum_modified"]


RTOL, ATOL = 1e-10, 1e-12
EPS = float(np.finfo(np.float64).eps)


def _run(tmp_path, names, momentum, integrator="torchdiffeq:dopri5"):
    flows = [{"name": n, "integrator": integrator, "rtol": RTOL, "atol": ATOL} for n in names]
    # identity activations keep the field smooth (no ReLU kinks for the adaptive solver) and still
    # give rescale groups (BN affine pairs with the next layer's columns) besides scale and translation
    raw = small_study(model={"name": "mlp", "widths": [5, 4], "activation": "identity", "batchnorm": True},
                      data={"name": "digits", "n": 60},
                      optimizer={"lr": 0.1, "steps": 10, "weight_decay": 0.02, "momentum": momentum},
                      record={"every": 5}, flows=flows)
    study = flowlab.parse_study(raw)
    built = flowlab.build(study)
    for m in built.problem.module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-30  # exact scale symmetry (BN's ε breaks it slightly)
    return flowlab.Run(study, tmp_path / "o", built=built).execute().load()


@pytest.mark.parametrize("names, momentum, integrator", [
    (SGD_FLOWS, 0.0, "torchdiffeq:dopri5"),
    (MOMENTUM_FLOWS, 0.5, "torchdiffeq:dopri5"),
    (["modified_loss", "momentum_second_order"], 0.5, "diffrax:Tsit5"),  # the laws trace under jax.jit too
])
def test_flow_laws_hold_to_solver_tolerance(tmp_path, names, momentum, integrator):
    if integrator.startswith("diffrax"):
        pytest.importorskip("diffrax")
    ds = _run(tmp_path, names, momentum, integrator)
    assert set(ds.group_kind.values) == {"translation", "scale", "rescale"}
    assert all(s == "ok" for s in ds.status.values)
    scale = ds.group_scale.values
    tr = ds.group_kind.values == "translation"
    assert np.isnan(ds.flow_law.values[0]).all()  # sgd has no flow law
    for i in range(1, ds.sizes["dynamics"]):
        label = str(ds.dynamics.values[i])
        law, q = ds.flow_law.values[i], ds.quantity.values[i]
        err = np.abs(law - q) / scale
        assert err[:, ~tr].max() <= 30 * RTOL, (label, err[:, ~tr].max())
        assert err[:, tr].max() <= 4 * EPS * int(ds.n_grad_evals.values[i]), (label, err[:, tr].max())
        # and the law is not trivial: the quantities moved far more than that
        moved = np.abs(q[-1] - q[0]) / scale
        assert np.median(moved) > 1e-4
