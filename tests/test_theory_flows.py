"""Each flow's own law, integrated alongside it, holds along its trajectory to solver tolerance."""

import numpy as np
import pytest
import torch
from conftest import small_study

import flowlab

SGD_FLOWS = ["gradient_flow", "modified_loss", "modified_temporal", "modified_second_order"]
MOMENTUM_FLOWS = ["momentum_first_order", "momentum_second_order", "momentum_modified"]


def _run(tmp_path, names, momentum, integrator="torchdiffeq:dopri5"):
    flows = [{"name": n, "integrator": integrator, "rtol": 1e-10, "atol": 1e-12} for n in names]
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
    assert np.isnan(ds.flow_law.values[0]).all()  # sgd has no flow law
    for i in range(1, ds.sizes["dynamics"]):
        law, q = ds.flow_law.values[i], ds.quantity.values[i]
        err = np.abs(law - q) / scale
        assert err.max() <= 1e-7, (str(ds.dynamics.values[i]), err.max())
        # and the law is not trivial: the quantities moved far more than that
        moved = np.abs(q[-1] - q[0]) / scale
        assert np.median(moved) > 1e-4
