"""Schedulers that drive a hyperparameter other than the lr (docs/hyperparameters.md).

Every optgen scheduler takes ``hyperparameter=`` (Note [Scheduling any hyperparameter] in
optgen/runtime/lr_scheduler_base.py).  Checked here: scheduled values against formulas written
out by hand, the optimizer's steps against torch's optimizer given the same values by hand, every
scheduler driving ``weight_decay`` exactly as it drives ``lr`` from the same start, tuple items
(``beta1``), Tensor values filled in place, state_dict round trips and the errors.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch

import optgen
from optgen import lr_scheduler as O
from optgen import swa_utils as OS

RTOL = 1e-12


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()" in value-only loops
        yield


def _params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]


def _loss(params):
    return sum((p ** 2).sum() + p.sin().sum() for p in params)


def test_weight_decay_cosine_and_lr_warmup_on_one_adamw():
    """Two schedulers, two hyperparameters, one AdamW: each value follows its own formula, and
    every step is torch's AdamW given those values by hand."""
    lr0, wd0, wd_min, T_max, warm, start = 1e-2, 0.1, 1e-3, 8, 4, 0.1
    ours_p, ref_p = _params(), _params()
    ours = optgen.AdamW(ours_p, lr=lr0, weight_decay=wd0)
    ref = torch.optim.AdamW(ref_p, lr=lr0, weight_decay=wd0)
    wd_sched = O.CosineAnnealingLR(ours, T_max=T_max, eta_min=wd_min, hyperparameter="weight_decay")
    lr_sched = O.LinearLR(ours, start_factor=start, total_iters=warm)
    for t in range(12):
        wd = wd_min + (wd0 - wd_min) * (1 + math.cos(math.pi * t / T_max)) / 2
        lr = lr0 * (start + (1 - start) * min(t, warm) / warm)
        group = ours.param_groups[0]
        assert group["weight_decay"] == pytest.approx(wd, rel=RTOL, abs=1e-15), t
        assert group["lr"] == pytest.approx(lr, rel=RTOL), t
        assert wd_sched.get_last_lr() == [group["weight_decay"]]  # get_last_lr: the driven values
        assert lr_sched.get_last_lr() == [group["lr"]]
        ref.param_groups[0].update(lr=group["lr"], weight_decay=group["weight_decay"])
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad()
            _loss(params).backward()
            opt.step()
        wd_sched.step()
        lr_sched.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert ours.param_groups[0]["initial_weight_decay"] == wd0
    assert ours.param_groups[0]["initial_lr"] == lr0


def test_lr_schedule_is_unchanged_by_a_weight_decay_schedule():
    """The lr scheduler next to a weight-decay one gives torch's lrs, bit for bit."""
    torch_opt = torch.optim.AdamW(_params(), lr=0.1, weight_decay=0.05)
    ours = optgen.AdamW(_params(), lr=0.1, weight_decay=0.05)
    theirs = torch.optim.lr_scheduler.OneCycleLR(torch_opt, max_lr=0.3, total_steps=30)
    O.StepLR(ours, step_size=3, gamma=0.5, hyperparameter="weight_decay")
    mine = O.OneCycleLR(ours, max_lr=0.3, total_steps=30)
    for _ in range(29):
        assert mine.get_last_lr() == theirs.get_last_lr()
        assert ours.param_groups[0]["betas"] == torch_opt.param_groups[0]["betas"]  # cycled momentum
        theirs.step()
        mine.step()


def test_beta1_schedule_on_adam_replaces_the_tuple_item():
    opt = optgen.Adam(_params(), lr=1e-3, betas=(0.8, 0.99))
    sched = O.LinearLR(opt, start_factor=0.5, end_factor=1.0, total_iters=4, hyperparameter="beta1")
    for t in range(7):
        betas = opt.param_groups[0]["betas"]
        assert type(betas) is tuple
        assert betas[0] == pytest.approx(0.8 * (0.5 + 0.5 * min(t, 4) / 4), rel=RTOL), t
        assert betas[1] == 0.99
        assert sched.get_last_lr() == [betas[0]]
        opt.zero_grad()
        _loss(opt.param_groups[0]["params"]).backward()
        opt.step()
        sched.step()
    assert opt.param_groups[0]["initial_beta1"] == 0.8
    assert "initial_lr" not in opt.param_groups[0]


def test_tensor_beta1_is_filled_in_place():
    b1, b2 = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64)
    opt = optgen.Adam(_params(), lr=1e-3, betas=(b1, b2), foreach=False)
    sched = O.ExponentialLR(opt, gamma=0.9, hyperparameter="beta1")
    for t in range(1, 4):
        opt.zero_grad()
        _loss(opt.param_groups[0]["params"]).backward()
        opt.step()
        sched.step()
        assert opt.param_groups[0]["betas"][0] is b1
        assert b1.item() == pytest.approx(0.9 ** (t + 1), rel=RTOL)
        assert b2.item() == 0.999
    last = sched.get_last_lr()[0]
    assert isinstance(last, torch.Tensor) and last is not b1  # a copy, as torch's get_last_lr


def test_momentum_step_schedule_on_sgd_and_the_steps_it_drives():
    ours_p, ref_p = _params(), _params()
    ours = optgen.SGD(ours_p, lr=0.05, momentum=0.9)
    ref = torch.optim.SGD(ref_p, lr=0.05, momentum=0.9)
    sched = O.StepLR(ours, step_size=2, gamma=0.5, hyperparameter="momentum")
    for t in range(7):
        assert ours.param_groups[0]["momentum"] == 0.9 * 0.5 ** (t // 2), t
        ref.param_groups[0]["momentum"] = 0.9 * 0.5 ** (t // 2)
        for opt, params in ((ours, ours_p), (ref, ref_p)):
            opt.zero_grad()
            _loss(params).backward()
            opt.step()
        sched.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_drives_torch_optimizers_by_optgen_spec_names():
    opt = torch.optim.Adam(_params(), lr=1e-3, betas=(0.9, 0.999))
    sched = O.MultiStepLR(opt, milestones=[2], gamma=0.5, hyperparameter="beta2")
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["betas"] == (0.9, 0.4995)


def _make(name, opt, hyperparameter):
    kwargs: dict[str, dict[str, Any]] = {
        "LambdaLR": dict(lr_lambda=lambda e: 0.9 ** e), "MultiplicativeLR": dict(lr_lambda=lambda e: 0.95),
        "StepLR": dict(step_size=2), "MultiStepLR": dict(milestones=[2, 5]), "ExponentialLR": dict(gamma=0.9),
        "ConstantLR": dict(factor=0.5, total_iters=3), "LinearLR": dict(start_factor=0.25, total_iters=5),
        "PolynomialLR": dict(total_iters=6, power=2.0), "CosineAnnealingLR": dict(T_max=5, eta_min=0.01),
        "CyclicLR": dict(base_lr=0.01, max_lr=0.2, step_size_up=3, cycle_momentum=False),
        "OneCycleLR": dict(max_lr=0.3, total_steps=12, cycle_momentum=False),
        "CosineAnnealingWarmRestarts": dict(T_0=3, T_mult=2), "WarmupCosineLR": dict(warmup_steps=2, total_steps=10),
        "WarmupStableDecayLR": dict(warmup_steps=2, decay_steps=3, total_steps=10),
        "InverseSqrtLR": dict(warmup_steps=2), "SWALR": dict(swa_lr=0.05, anneal_epochs=4),
    }
    if name == "ChainedScheduler":
        return O.ChainedScheduler([O.ExponentialLR(opt, 0.9, hyperparameter=hyperparameter),
                                   O.StepLR(opt, 2, hyperparameter=hyperparameter)])
    if name == "SequentialLR":
        return O.SequentialLR(opt, [O.ConstantLR(opt, 0.5, 2, hyperparameter=hyperparameter),
                                    O.ExponentialLR(opt, 0.9, hyperparameter=hyperparameter)], milestones=[3])
    if name == "ReduceLROnPlateau":
        return O.ReduceLROnPlateau(opt, patience=1, factor=0.5, hyperparameter=hyperparameter)
    cls = OS.SWALR if name == "SWALR" else getattr(O, name)
    return cls(opt, **kwargs[name], hyperparameter=hyperparameter)


ALL = [n for n in O.__all__ if n != "LRScheduler"] + ["SWALR"]


@pytest.mark.parametrize("name", ALL)
def test_every_scheduler_drives_weight_decay_as_it_drives_lr(name):
    """From the same start, the weight-decay sequence is the lr sequence exactly, the lr is left
    alone, and the state_dict says which is driven (the lr one's has no key: it is torch's)."""
    lr_opt = optgen.SGD(_params(), lr=0.1, weight_decay=0.0)
    wd_opt = optgen.SGD(_params(), lr=0.02, weight_decay=0.1)
    lr_sched, wd_sched = _make(name, lr_opt, "lr"), _make(name, wd_opt, "weight_decay")
    for step in range(11):
        assert wd_opt.param_groups[0]["weight_decay"] == lr_opt.param_groups[0]["lr"], (name, step)
        assert wd_sched.get_last_lr() == lr_sched.get_last_lr(), (name, step)
        assert wd_opt.param_groups[0]["lr"] == 0.02
        if name == "ReduceLROnPlateau":
            for s in (lr_sched, wd_sched):
                s.step(1.0)
        else:
            for s in (lr_sched, wd_sched):
                s.step()
    assert "hyperparameter" not in lr_sched.state_dict()
    assert wd_sched.state_dict()["hyperparameter"] == "weight_decay"


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "LambdaLR", "OneCycleLR", "SequentialLR", "ChainedScheduler",
                                  "ReduceLROnPlateau", "CosineAnnealingWarmRestarts"])
def test_state_dict_round_trip_mid_schedule(name):
    def run(opt, sched, steps):
        for _ in range(steps):
            opt.step()
            sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()

    ref_opt = optgen.AdamW(_params(), lr=1e-3, weight_decay=0.1)
    ref = _make(name, ref_opt, "weight_decay")
    run(ref_opt, ref, 4)
    saved_opt, saved = copy.deepcopy(ref_opt.state_dict()), copy.deepcopy(ref.state_dict())
    opt = optgen.AdamW(_params(), lr=1e-3, weight_decay=0.1)
    resumed = _make(name, opt, "weight_decay")
    opt.load_state_dict(saved_opt)
    resumed.load_state_dict(saved)
    for step in range(6):
        run(ref_opt, ref, 1)
        run(opt, resumed, 1)
        assert opt.param_groups[0]["weight_decay"] == ref_opt.param_groups[0]["weight_decay"], step
        assert resumed.get_last_lr() == ref.get_last_lr(), step


def test_loading_another_hyperparameter_s_state_is_an_error():
    opt = optgen.Adam(_params(), lr=1e-3, weight_decay=0.1)
    wd = O.ExponentialLR(opt, gamma=0.9, hyperparameter="weight_decay")
    lr = O.ExponentialLR(opt, gamma=0.9)
    b1 = O.ExponentialLR(opt, gamma=0.9, hyperparameter="beta1")
    with pytest.raises(ValueError, match="drives 'weight_decay' into ExponentialLR, which drives 'lr'"):
        lr.load_state_dict(wd.state_dict())
    with pytest.raises(ValueError, match="drives 'lr' into ExponentialLR, which drives 'weight_decay'"):
        wd.load_state_dict(lr.state_dict())
    with pytest.raises(ValueError, match="drives 'beta1'"):
        wd.load_state_dict(b1.state_dict())
    torch_state = torch.optim.lr_scheduler.ExponentialLR(torch.optim.Adam(_params()), gamma=0.9).state_dict()
    with pytest.raises(ValueError, match="drives 'lr'"):
        b1.load_state_dict(torch_state)


def test_unknown_hyperparameter_lists_the_schedulable_ones():
    opt = optgen.Adam(_params())
    with pytest.raises(ValueError, match=r"Adam has no hyperparameter 'momentum' to schedule; its schedulable "
                                         r"hyperparameters are: lr, beta1, beta2, eps, weight_decay$"):
        O.StepLR(opt, step_size=2, hyperparameter="momentum")
    with pytest.raises(ValueError, match="'betas'"):  # the tuple itself has no single value
        O.LambdaLR(opt, lambda e: 1.0, hyperparameter="betas")
    with pytest.raises(ValueError, match="'amsgrad'"):  # a flag is not a number
        O.ReduceLROnPlateau(opt, hyperparameter="amsgrad")
    with pytest.raises(TypeError, match="must be a str"):
        O.ExponentialLR(opt, gamma=0.9, hyperparameter=3)
    assert "initial_momentum" not in opt.param_groups[0]  # nothing was written before the error


def test_composites_need_one_hyperparameter():
    opt = optgen.AdamW(_params())
    wd = O.ExponentialLR(opt, gamma=0.9, hyperparameter="weight_decay")
    lr = O.ExponentialLR(opt, gamma=0.9)
    with pytest.raises(ValueError, match="drive the same hyperparameter.*'weight_decay', 'lr'"):
        O.ChainedScheduler([wd, lr])
    with pytest.raises(ValueError, match="drive the same hyperparameter"):
        O.SequentialLR(opt, [wd, lr], milestones=[2])


@pytest.mark.parametrize("make", [
    lambda opt: O.OneCycleLR(opt, max_lr=0.1, total_steps=10, hyperparameter="weight_decay"),
    lambda opt: O.CyclicLR(opt, 0.01, 0.1, hyperparameter="dampening"),
])
def test_cycled_momentum_needs_the_lr(make):
    with pytest.raises(ValueError, match="needs cycle_momentum=False"):
        make(optgen.SGD(_params(), lr=0.1, momentum=0.9, weight_decay=0.1))


def test_resuming_without_initial_value_names_it():
    opt = optgen.SGD(_params(), lr=0.1, weight_decay=0.1)
    with pytest.raises(KeyError, match="initial_weight_decay"):
        O.StepLR(opt, step_size=2, last_epoch=3, hyperparameter="weight_decay")
