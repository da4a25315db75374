"""flowlab's discrete run equals a hand-written torch.optim.SGD loop (float64, to round-off)."""

import pytest
import torch
from conftest import small_study

import flowlab
from flowlab.sgd import BatchSampler, DiscreteSGD

CASES = {
    "minibatch": dict(batch_size=25),
    "heavy_ball": dict(batch_size=25, momentum=0.9),
    "nesterov_wd": dict(batch_size=40, momentum=0.8, nesterov=True, weight_decay=1e-3),
    "dampening_wd": dict(batch_size=33, momentum=0.5, dampening=0.3, weight_decay=5e-3, drop_last=False),
    "full_batch_wd": dict(momentum=0.9, weight_decay=1e-2),
}


def _torch_loop(module, problem, cfg, seed, steps, lrs):
    opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(problem.n, cfg.batch_size, seed, cfg.drop_last)
    X, y = problem.X, problem.y
    for k in range(steps):
        for group in opt.param_groups:
            group["lr"] = float(lrs[k])
        idx = sampler.next()
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xb), yb).backward()
        opt.step()
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_torch_optim_sgd_on_user_model(case, user_module):
    steps, seed = 150, 4
    raw = small_study(study={"seed": seed}, model={"name": f"{user_module}.nets:net", "width": 12},
                      data={"name": "digits", "n": 300},
                      optimizer={"lr": 0.1, "steps": steps, "batch_size": None, **CASES[case]})
    if raw["optimizer"]["batch_size"] is None:
        del raw["optimizer"]["batch_size"]
    if case == "dampening_wd":
        raw["optimizer"]["schedule"] = {"name": "step", "step_size": 40, "gamma": 0.5}
    study = flowlab.parse_study(raw)
    built = flowlab.build(study)
    sgd = DiscreteSGD(built.problem, study.optimizer, built.lrs, seed)
    for _ in range(steps):
        sgd.evaluate()
        sgd.update()

    from userpkg.nets import net

    torch.manual_seed(seed)
    module = net(width=12).double()  # what a user writes: build, then cast
    theta0 = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    assert torch.equal(theta0, built.problem.theta0)
    expected = _torch_loop(module, built.problem, study.optimizer, seed, steps, built.lrs)
    moved = (expected - theta0).norm()
    assert moved > 0.1  # the runs went somewhere
    err = (sgd.theta - expected).abs().max().item()
    assert err <= 1e-12, err


def test_time_is_sum_of_learning_rates():
    raw = small_study(optimizer={"lr": 0.2, "steps": 30, "schedule": {"name": "exponential", "gamma": 0.9}})
    built = flowlab.build(flowlab.parse_study(raw))
    sgd = DiscreteSGD(built.problem, built.study.optimizer, built.lrs, 0)
    for _ in range(30):
        sgd.evaluate()
        sgd.update()
    assert sgd.time == pytest.approx(sum(0.2 * 0.9**k for k in range(30)), rel=1e-14)


def test_sampler_is_seeded_and_covers_each_epoch():
    a = BatchSampler(103, 10, seed=7)
    b = BatchSampler(103, 10, seed=7)
    c = BatchSampler(103, 10, seed=8)
    epoch_a = [a.next() for _ in range(10)]
    epoch_b = [b.next() for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(epoch_a, epoch_b))
    assert not torch.equal(epoch_a[0], c.next())
    seen = torch.cat(epoch_a)
    assert len(seen) == 100 and len(torch.unique(seen)) == 100  # drop_last: 3 examples left out this epoch
    assert not torch.equal(a.next(), epoch_a[0])  # next epoch is a new permutation


def test_sampler_keeps_the_short_batch_without_drop_last():
    s = BatchSampler(23, 10, seed=0, drop_last=False)
    sizes = [len(s.next()) for _ in range(3)]
    assert sizes == [10, 10, 3]


def test_full_batch_sampler():
    assert BatchSampler(50, None, 0).next() is None
    assert BatchSampler(50, 50, 0).next() is None


def test_recorder_sees_every_update(tmp_path):
    from flowlab.recording import Recorder

    class Spy(Recorder):
        def __init__(self):
            self.before, self.after = [], []

        def before_update(self, info):
            self.before.append((info.step, info.lr, info.theta.clone(), info.grad.clone(),
                                None if info.buf is None else info.buf.clone()))

        def after_update(self, info):
            self.after.append((info.step, info.theta.clone(), info.buf.clone()))

    raw = small_study(optimizer={"lr": 0.05, "steps": 12, "batch_size": 20, "momentum": 0.9, "weight_decay": 0.01},
                      record={"every": 5})
    spy = Spy()
    ds = flowlab.run(flowlab.parse_study(raw), tmp_path / "o", recorders=[spy])
    assert [s for s, *_ in spy.before] == list(range(12))
    beta, wd = 0.9, 0.01
    for (_k, lr, th, g, v), (_, th1, v1) in zip(spy.before, spy.after):
        d = g + wd * th
        v_expected = d if v is None else beta * v + d
        assert torch.allclose(v1, v_expected, rtol=0, atol=1e-15)
        assert torch.allclose(th1, th - lr * v1, rtol=0, atol=1e-15)
    # rows at steps 0, 5, 10 and the last one (12)
    assert ds.step.values.tolist() == [0, 5, 10, 12]
