"""flowlab's discrete run equals a hand-written torch.optim.SGD loop (float64, to round-off), with
torch's own batch order (a ``torch.utils.data`` sampler) and torch's own learning-rate schedulers.

flowlab's batch order (``flowlab.sgd.BatchSampler``) is defined as: a ``torch.Generator`` seeded with
``study.seed``; each epoch one ``torch.randperm(n, generator=g)``, cut into consecutive batches of S
(the short last batch dropped when ``drop_last``).  In ``torch.utils.data`` that is exactly
``BatchSampler(SubsetRandomSampler(range(n), generator=g), S, drop_last)``, iterated epoch after
epoch, which the reference loop below uses.  It is *not* ``DataLoader(shuffle=True, generator=g)``
(the loader draws its worker base seed from ``g`` first) and equals ``RandomSampler(generator=g)`` in
the first epoch only (``RandomSampler`` draws a second, empty permutation at the end of each epoch):
both facts are asserted below, so a change in torch or in flowlab shows.
"""

import numpy as np
import pytest
import torch
from conftest import small_study
from torch.optim import lr_scheduler
from torch.utils.data import BatchSampler as TorchBatchSampler
from torch.utils.data import DataLoader, RandomSampler, SubsetRandomSampler

import flowlab
from flowlab.schedules import build_schedule
from flowlab.sgd import BatchSampler, DiscreteSGD

EPS = float(np.finfo(np.float64).eps)

CASES = {
    "minibatch": dict(batch_size=25),
    "heavy_ball": dict(batch_size=25, momentum=0.9),
    "nesterov_wd": dict(batch_size=40, momentum=0.8, nesterov=True, weight_decay=1e-3),
    "dampening_wd": dict(batch_size=33, momentum=0.5, dampening=0.3, weight_decay=5e-3, drop_last=False,
                         schedule={"name": "step", "step_size": 40, "gamma": 0.5}),
    "full_batch_wd": dict(momentum=0.9, weight_decay=1e-2),
    "cosine": dict(batch_size=30, momentum=0.9, weight_decay=1e-3,
                   schedule={"name": "cosine", "lr_min": 0.01}),  # period defaults to the run's steps
    "warmup": dict(batch_size=25, momentum=0.5, schedule={"name": "warmup", "warmup_steps": 40}),
    "exponential": dict(batch_size=50, drop_last=False, schedule={"name": "exponential", "gamma": 0.99}),
}


def torch_scheduler(opt, schedule: dict, steps: int):
    """torch's own scheduler for a flowlab ``[optimizer.schedule]`` table (None: constant)."""
    name = schedule.get("name", "constant")
    if name == "constant":
        return None
    if name == "step":
        return lr_scheduler.StepLR(opt, step_size=schedule["step_size"], gamma=schedule["gamma"])
    if name == "exponential":
        return lr_scheduler.ExponentialLR(opt, gamma=schedule["gamma"])
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(opt, T_max=schedule.get("period", steps),
                                              eta_min=schedule.get("lr_min", 0.0))
    if name == "warmup":  # factor (k+1)/W for k < W: LinearLR from 1/W to 1 over W-1 steps
        w = schedule["warmup_steps"]
        return lr_scheduler.LinearLR(opt, start_factor=1 / w, end_factor=1.0, total_iters=w - 1)
    raise AssertionError(name)


def torch_batches(n: int, batch_size, seed: int, drop_last: bool):
    """Index batches from torch.utils.data's samplers, epoch after epoch (None: full batch)."""
    if batch_size is None:
        while True:
            yield None
    sampler = TorchBatchSampler(SubsetRandomSampler(range(n), generator=torch.Generator().manual_seed(seed)),
                                batch_size, drop_last)
    while True:
        yield from (torch.tensor(b) for b in sampler)


def _torch_loop(module, X, y, cfg, seed, steps):
    """torch.optim.SGD, stepped by torch's scheduler, on batches from torch's samplers; returns the
    final parameters and the learning rate of every step."""
    opt = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    sched = torch_scheduler(opt, cfg.schedule.to_dict(), steps)
    batches = torch_batches(len(X), cfg.batch_size, seed, cfg.drop_last)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        idx = next(batches)
        xb, yb = (X, y) if idx is None else (X[idx], y[idx])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xb), yb).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach(), np.array(lrs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_torch_optim_sgd_on_user_model(case, user_module):
    steps, seed = 150, 4
    raw = small_study(study={"seed": seed}, model={"name": f"{user_module}.nets:net", "width": 12},
                      data={"name": "digits", "n": 300},
                      optimizer={"lr": 0.1, "steps": steps, "batch_size": None, **CASES[case]})
    if raw["optimizer"]["batch_size"] is None:
        del raw["optimizer"]["batch_size"]
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
    expected, torch_lrs = _torch_loop(module, built.problem.X, built.problem.y, study.optimizer, seed, steps)
    # torch's schedulers recur (η_k from η_{k-1}): ~1 rounding per step against flowlab's closed forms
    np.testing.assert_allclose(built.lrs, torch_lrs, rtol=steps * EPS, atol=0)
    if "schedule" in CASES[case]:
        assert np.ptp(torch_lrs) > 0.1 * torch_lrs.max()  # the schedule did change η
    moved = (expected - theta0).norm()
    assert moved > 0.1  # the runs went somewhere
    err = (sgd.theta - expected).abs().max().item()
    assert err <= 1e-12, err


def _torch_lrs(make, lr: float, steps: int) -> np.ndarray:
    """η_k read from an optimizer whose scheduler ``make(opt)`` is stepped once after every step."""
    param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


@pytest.mark.parametrize("name, options, make", [
    ("step", {"step_size": 7, "gamma": 0.5}, lambda o: lr_scheduler.StepLR(o, step_size=7, gamma=0.5)),
    ("exponential", {"gamma": 0.97}, lambda o: lr_scheduler.ExponentialLR(o, gamma=0.97)),
    ("cosine", {}, lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=200)),  # period: the run's steps
    ("cosine", {"period": 200, "lr_min": 0.01}, lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=200, eta_min=0.01)),
    ("warmup", {"warmup_steps": 37},
     lambda o: lr_scheduler.LinearLR(o, start_factor=1 / 37, end_factor=1.0, total_iters=36)),
    ("warmup", {"warmup_steps": 2}, lambda o: lr_scheduler.LinearLR(o, start_factor=0.5, end_factor=1.0, total_iters=1)),
], ids=["step", "exponential", "cosine_default_period", "cosine_lr_min", "warmup_37", "warmup_2"])
def test_schedules_equal_torchs_schedulers(name, options, make):
    """η_k of each built-in schedule = torch's scheduler stepped once per optimizer step."""
    steps, lr = 200, 0.3
    ours = build_schedule(name, lr, options, steps)
    theirs = _torch_lrs(make, lr, steps)
    np.testing.assert_allclose(ours, theirs, rtol=steps * EPS, atol=0)
    assert np.ptp(theirs) > 0.1 * lr


def test_cosine_holds_lr_min_after_its_period():
    """One period (torch's CosineAnnealingLR rises again after T_max; flowlab's stays at lr_min)."""
    lr, lr_min, period, steps = 0.3, 0.02, 50, 120
    ours = build_schedule("cosine", lr, {"period": period, "lr_min": lr_min}, steps)
    theirs = _torch_lrs(lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=period, eta_min=lr_min), lr, period + 1)
    np.testing.assert_allclose(ours[: period + 1], theirs, rtol=period * EPS, atol=0)
    assert ours[period] == lr_min and np.all(ours[period:] == lr_min)


def test_batch_order_is_torchs_subset_random_sampler():
    """flowlab's batches = torch.utils.data's BatchSampler(SubsetRandomSampler(..., generator)) over
    several epochs, with and without drop_last; RandomSampler agrees in the first epoch only and
    DataLoader(shuffle=True, generator) not at all (module docstring)."""
    n, size, seed, epochs = 23, 5, 3, 4
    for drop_last, per_epoch in ((True, 4), (False, 5)):
        ours = BatchSampler(n, size, seed, drop_last)
        got = [ours.next().tolist() for _ in range(per_epoch * epochs)]
        reference = torch_batches(n, size, seed, drop_last)
        assert got == [next(reference).tolist() for _ in range(per_epoch * epochs)]
        assert [len(b) for b in got[:per_epoch]] == ([5] * 4 if drop_last else [5] * 4 + [3])
        random_sampler = TorchBatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(seed)),
                                           size, drop_last)
        first, second = list(random_sampler), list(random_sampler)
        assert first == got[:per_epoch] and second != got[per_epoch: 2 * per_epoch]
    loader = DataLoader(range(n), batch_size=size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    assert [b.tolist() for b in loader] != got[:4]


def test_time_is_sum_of_learning_rates():
    raw = small_study(optimizer={"lr": 0.2, "steps": 30, "schedule": {"name": "exponential", "gamma": 0.9}})
    built = flowlab.build(flowlab.parse_study(raw))
    sgd = DiscreteSGD(built.problem, built.study.optimizer, built.lrs, 0)
    for _ in range(30):
        sgd.evaluate()
        sgd.update()
    # rel alone would keep approx's default abs=1e-12 (≈ 5e-13 relative here): set abs=0
    assert sgd.time == pytest.approx(sum(0.2 * 0.9**k for k in range(30)), rel=1e-14, abs=0)


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
