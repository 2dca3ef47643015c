"""optgen.lr_scheduler against torch.optim.lr_scheduler (the oracle), step by step.

One table (CASES) drives the tests: every scheduler with a broad set of configurations, each run
for STEPS steps next to torch's on identical optimizers with two param groups of different lrs.
Compared at every step: get_last_lr(), every group's lr, and the cycled momentum / betas.
STEPS = 120 covers several periods of every periodic schedule in the table and runs past the end
of the finite ones (total_iters, T_max, milestones), where the recursions change form.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as T
from torch.optim import swa_utils as TS

import optgen
from optgen import lr_scheduler as O
from optgen import swa_utils as OS

STEPS = 120
RTOL = 1e-12   # float64 arithmetic on both sides; the derived recursions differ from torch's in rounding only


def _lambda_factor(epoch):  # a module-level function: torch's state_dict skips functions, as ours does
    return 0.97 ** epoch


class _Factor:
    """A callable object: its __dict__ goes into the state_dict (LambdaLR, MultiplicativeLR, CyclicLR)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x):
        return self.base ** x


#: (scheduler name, constructor kwargs, optimizer) — the optimizer decides momentum vs betas
CASES = [
    ("LambdaLR", dict(lr_lambda=_lambda_factor), "sgd"),
    ("LambdaLR", dict(lr_lambda=[_Factor(0.99), lambda e: 1 / (1 + e)]), "sgd"),
    ("MultiplicativeLR", dict(lr_lambda=lambda e: 0.98), "sgd"),
    ("MultiplicativeLR", dict(lr_lambda=[_Factor(0.999), lambda e: 0.9 if e % 10 == 0 else 1.0]), "adam"),
    ("StepLR", dict(step_size=7), "sgd"),
    ("StepLR", dict(step_size=1, gamma=0.97), "sgd"),
    ("StepLR", dict(step_size=30, gamma=0.5), "adam"),
    ("MultiStepLR", dict(milestones=[3, 10, 10, 50]), "sgd"),
    ("MultiStepLR", dict(milestones=(60, 30, 90), gamma=0.5), "adam"),
    ("MultiStepLR", dict(milestones=[], gamma=0.5), "sgd"),
    ("ConstantLR", dict(), "sgd"),
    ("ConstantLR", dict(factor=0.25, total_iters=40), "sgd"),
    ("ConstantLR", dict(factor=1.0, total_iters=3), "adam"),
    ("LinearLR", dict(), "sgd"),
    ("LinearLR", dict(start_factor=0.05, total_iters=40), "sgd"),
    ("LinearLR", dict(start_factor=1.0, end_factor=0.0, total_iters=100), "adam"),
    ("LinearLR", dict(start_factor=0.5, end_factor=0.25, total_iters=7), "sgd"),
    ("ExponentialLR", dict(gamma=0.95), "sgd"),
    ("ExponentialLR", dict(gamma=1.01), "adam"),
    ("PolynomialLR", dict(), "sgd"),
    ("PolynomialLR", dict(total_iters=50, power=2.0), "sgd"),
    ("PolynomialLR", dict(total_iters=100, power=0.5), "adam"),
    ("CosineAnnealingLR", dict(T_max=10), "sgd"),
    ("CosineAnnealingLR", dict(T_max=50, eta_min=1e-3), "sgd"),
    ("CosineAnnealingLR", dict(T_max=200, eta_min=0.02), "adam"),
    ("CosineAnnealingLR", dict(T_max=1), "sgd"),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1, step_size_up=10), "sgd"),
    ("CyclicLR", dict(base_lr=[0.01, 0.02], max_lr=[0.1, 0.3], step_size_up=7, step_size_down=13,
                      mode="triangular2"), "sgd"),
    ("CyclicLR", dict(base_lr=0.001, max_lr=0.1, step_size_up=5, mode="exp_range", gamma=0.99), "adam"),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1, step_size_up=5, scale_fn=_Factor(0.9), scale_mode="iterations"), "sgd"),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1, step_size_up=4, scale_fn=lambda c: 1 / c,
                      cycle_momentum=False), "adam"),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1, step_size_up=9, base_momentum=[0.7, 0.75],
                      max_momentum=0.95), "sgd"),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=STEPS), "sgd"),
    ("OneCycleLR", dict(max_lr=[0.1, 0.2], epochs=12, steps_per_epoch=10, anneal_strategy="linear"), "adam"),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=150, pct_start=0.25, three_phase=True, div_factor=10.0), "sgd"),
    ("OneCycleLR", dict(max_lr=0.5, total_steps=130, three_phase=True, anneal_strategy="linear",
                        cycle_momentum=False, final_div_factor=100.0), "sgd"),
    ("OneCycleLR", dict(max_lr=0.01, total_steps=200, base_momentum=[0.8, 0.85], max_momentum=0.9), "adam"),
    ("CosineAnnealingWarmRestarts", dict(T_0=10), "sgd"),
    ("CosineAnnealingWarmRestarts", dict(T_0=3, T_mult=2, eta_min=1e-3), "sgd"),
    ("CosineAnnealingWarmRestarts", dict(T_0=1, T_mult=3), "adam"),
    ("SWALR", dict(swa_lr=0.02), "sgd"),
    ("SWALR", dict(swa_lr=[0.02, 0.3], anneal_epochs=0, anneal_strategy="linear"), "sgd"),
    ("SWALR", dict(swa_lr=0.5, anneal_epochs=1), "adam"),
    ("SWALR", dict(swa_lr=0.05, anneal_epochs=30, anneal_strategy="linear"), "sgd"),
]

IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def make_optimizer(kind: str, cls=None):
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in range(2)]
    groups = [{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.05}]
    if cls is not None:
        return cls(groups, lr=0.1)
    if kind == "adam":
        return torch.optim.Adam(groups, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, momentum=0.9)


def scheduler_class(module, name):
    if name == "SWALR":
        return (TS if module is T else OS).SWALR
    return getattr(module, name)


def snapshot(optimizer, scheduler):
    """Everything a step decides: the scheduler's lrs and each group's lr and momentum."""
    out = [float(x) for x in scheduler.get_last_lr()]
    for g in optimizer.param_groups:
        out.append(float(g["lr"]))
        out.append(float(g["betas"][0]) if "betas" in g else float(g.get("momentum", 0.0)))
    return out


def assert_close(a, b, what):
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x, y, rel_tol=RTOL, abs_tol=1e-15), f"{what}: {a} != {b}"


def run_pair(name, kwargs, kind, steps=STEPS, metrics=None):
    """Runs torch's and optgen's scheduler side by side; yields (step, torch pair, optgen pair)."""
    pairs = []
    for module in (T, O):
        optimizer = make_optimizer(kind)
        pairs.append((optimizer, scheduler_class(module, name)(optimizer, **copy.copy(kwargs))))
    yield 0, pairs[0], pairs[1]
    for step in range(1, steps + 1):
        for optimizer, scheduler in pairs:
            optimizer.step()
            scheduler.step() if metrics is None else scheduler.step(metrics[step - 1])
        yield step, pairs[0], pairs[1]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("name, kwargs, kind", CASES, ids=IDS)
def test_sequence_matches_torch(name, kwargs, kind):
    for step, (topt, tsched), (oopt, osched) in run_pair(name, kwargs, kind):
        assert_close(snapshot(topt, tsched), snapshot(oopt, osched), f"{name} step {step}")
        assert tsched.last_epoch == osched.last_epoch


@pytest.mark.parametrize("name, kwargs, kind", CASES, ids=IDS)
def test_state_dict_has_torch_keys_and_round_trips(name, kwargs, kind):
    """Mid-schedule, torch's state loads into optgen's scheduler and optgen's into torch's, and
    both continue exactly as torch continues from its own checkpoint."""
    half = STEPS // 2
    *_, (_, (topt, tsched), (oopt, osched)) = run_pair(name, kwargs, kind, steps=half)
    assert set(tsched.state_dict()) == set(osched.state_dict())

    def resume(module, source_opt, source):
        optimizer = make_optimizer(kind)
        scheduler = scheduler_class(module, name)(optimizer, **copy.copy(kwargs))
        optimizer.load_state_dict(copy.deepcopy(source_opt.state_dict()))
        scheduler.load_state_dict(copy.deepcopy(source.state_dict()))
        return optimizer, scheduler

    for resumed in (resume(O, topt, tsched), resume(T, oopt, osched)):
        ref_opt, ref = resume(T, topt, tsched)
        for step in range(half, STEPS):
            for opt, sched in ((ref_opt, ref), resumed):
                opt.step()
                sched.step()
            assert_close(snapshot(ref_opt, ref), snapshot(*resumed), f"{name} resumed step {step}")


#: step(epoch) with fractional and out-of-order epochs: the closed form, where torch has one
EPOCH_CASES = [
    ("StepLR", dict(step_size=3, gamma=0.5), [1, 2, 2.5, 3, 7, 4, 10.0, 0]),
    ("MultiStepLR", dict(milestones=[2, 5]), [1, 2, 3.5, 5, 0, 6]),
    ("ExponentialLR", dict(gamma=0.9), [0.5, 1, 2.25, 10, 3]),
    ("LinearLR", dict(start_factor=0.2, total_iters=8), [0.5, 3, 7.5, 20, 1]),
    ("ConstantLR", dict(factor=0.5, total_iters=4), [1, 3.9, 4, 4.5, 2]),
    ("PolynomialLR", dict(total_iters=10, power=2.0), [0.5, 5, 9.5, 12, 3]),
    ("CosineAnnealingLR", dict(T_max=10, eta_min=0.01), [0.5, 5, 9.5, 12.25, 3]),
    ("CosineAnnealingWarmRestarts", dict(T_0=4, T_mult=2), [0.5, 3.7, 4, 11.9, 12, 13.5, 30, 2]),
    ("CosineAnnealingWarmRestarts", dict(T_0=5), [0.1, 4.99, 5, 7.5, 26.25, 1]),
    ("SWALR", dict(swa_lr=0.01, anneal_epochs=5), [1, 2, 3.5, 8]),
]


@pytest.mark.parametrize("name, kwargs, epochs", EPOCH_CASES, ids=[c[0] for c in EPOCH_CASES])
def test_step_with_epoch(name, kwargs, epochs):
    pairs = []
    for module in (T, O):
        optimizer = make_optimizer("sgd")
        pairs.append((optimizer, scheduler_class(module, name)(optimizer, **kwargs)))
    for epoch in epochs:
        for optimizer, scheduler in pairs:
            optimizer.step()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scheduler.step(epoch)
            if name != "CosineAnnealingWarmRestarts":  # torch's own step() there does not warn
                assert any("epoch parameter" in str(w.message) for w in caught)
        assert_close(snapshot(*pairs[0]), snapshot(*pairs[1]), f"{name} step({epoch})")
        # a plain step after a fractional epoch continues from wherever it left
        for optimizer, scheduler in pairs:
            optimizer.step()
            scheduler.step()
        assert_close(snapshot(*pairs[0]), snapshot(*pairs[1]), f"{name} step() after step({epoch})")


PLATEAU = [
    dict(), dict(mode="max", factor=0.5, patience=2), dict(threshold_mode="abs", threshold=0.05, cooldown=3),
    dict(mode="max", threshold_mode="abs", patience=0, min_lr=[0.01, 0.001]), dict(factor=0.9, patience=1, eps=1e-3),
    dict(min_lr=0.02, patience=3, cooldown=1),
]


@pytest.mark.parametrize("kwargs", PLATEAU)
def test_reduce_lr_on_plateau(kwargs):
    generator = torch.Generator().manual_seed(0)
    # a metric that improves, stalls, wobbles and improves again; some of it as 0-dim Tensors
    numbers = [1.0 / (1 + i) if i < 20 else 0.05 + 0.01 * float(torch.rand((), generator=generator))
               for i in range(STEPS)]
    metrics = [torch.tensor(m) if i % 3 == 0 else m for i, m in enumerate(numbers)]
    for step, (topt, tsched), (oopt, osched) in run_pair("ReduceLROnPlateau", kwargs, "sgd", metrics=metrics):
        assert_close(snapshot(topt, tsched), snapshot(oopt, osched), f"step {step}")
        assert (tsched.best, tsched.num_bad_epochs, tsched.cooldown_counter) == \
               (osched.best, osched.num_bad_epochs, osched.cooldown_counter)
    assert set(tsched.state_dict()) == set(osched.state_dict())
    reloaded = O.ReduceLROnPlateau(make_optimizer("sgd"), **kwargs)
    reloaded.load_state_dict(tsched.state_dict())
    assert reloaded.best == tsched.best and reloaded._is_better(reloaded.best - 1, reloaded.best) == \
        tsched._is_better(tsched.best - 1, tsched.best)


# -- composition ------------------------------------------------------------------------------------
def _stack(module, optimizer):
    return [module.ExponentialLR(optimizer, gamma=0.9), module.MultiStepLR(optimizer, milestones=[30, 80], gamma=0.1)]


def test_stacked_schedulers_compose_like_torch():
    """torch's documented example: ExponentialLR and MultiStepLR stepping one optimizer."""
    runs = []
    for module in (T, O):
        optimizer = make_optimizer("sgd")
        schedulers = _stack(module, optimizer)
        lrs = []
        for _ in range(100):
            optimizer.step()
            for s in schedulers:
                s.step()
            lrs.append([g["lr"] for g in optimizer.param_groups])
        runs.append(lrs)
    for step, (a, b) in enumerate(zip(*runs, strict=True)):
        assert_close(a, b, f"step {step}")
    assert math.isclose(runs[1][99][0], 0.1 * 0.9 ** 100 * 0.01, rel_tol=1e-12)  # the factors multiply


def _chained(module, optimizer):
    return module.ChainedScheduler([module.ConstantLR(optimizer, factor=0.1, total_iters=2),
                                    module.ExponentialLR(optimizer, gamma=0.9),
                                    module.CosineAnnealingLR(optimizer, T_max=40, eta_min=0.001)])


def _sequential(module, optimizer):
    return module.SequentialLR(optimizer, [module.LinearLR(optimizer, start_factor=0.1, total_iters=10),
                                           module.CosineAnnealingLR(optimizer, T_max=50),
                                           module.StepLR(optimizer, step_size=5, gamma=0.5)], milestones=[10, 60])


def _sequential_nested(module, optimizer):
    # (a ChainedScheduler after a milestone fails in torch too: it has no get_lr for _update_lr(0))
    return module.SequentialLR(optimizer, [module.ChainedScheduler([module.ExponentialLR(optimizer, gamma=0.95),
                                                                    module.MultiStepLR(optimizer, [20, 40])]),
                                           module.ConstantLR(optimizer, factor=0.5, total_iters=5)],
                               milestones=[50])


@pytest.mark.parametrize("build", [_chained, _sequential, _sequential_nested])
def test_composites_match_torch(build):
    pairs = []
    for module in (T, O):
        optimizer = make_optimizer("sgd")
        pairs.append((optimizer, build(module, optimizer)))
    for step in range(STEPS):
        assert_close(snapshot(*pairs[0]), snapshot(*pairs[1]), f"step {step}")
        for optimizer, scheduler in pairs:
            optimizer.step()
            scheduler.step()
    assert set(pairs[0][1].state_dict()) == set(pairs[1][1].state_dict())
    # the composite's state (with the nested schedulers') loads into a fresh one of the other kind
    fresh_opt = make_optimizer("sgd")
    fresh = build(O, fresh_opt)
    fresh.load_state_dict(pairs[0][1].state_dict())
    fresh_opt.load_state_dict(pairs[0][0].state_dict())
    for step in range(20):
        for optimizer, scheduler in (pairs[0], (fresh_opt, fresh)):
            optimizer.step()
            scheduler.step()
        assert_close([g["lr"] for g in pairs[0][0].param_groups], [g["lr"] for g in fresh_opt.param_groups],
                     f"resumed step {step}")


def test_torch_composites_drive_optgen_schedulers_and_back():
    """torch's ChainedScheduler over optgen's schedulers, and optgen's SequentialLR over torch's."""
    ref_opt, mixed_opt, mixed2_opt = (make_optimizer("sgd") for _ in range(3))
    ref = T.ChainedScheduler([T.ExponentialLR(ref_opt, gamma=0.9), T.StepLR(ref_opt, step_size=3)])
    mixed = T.ChainedScheduler([O.ExponentialLR(mixed_opt, gamma=0.9), O.StepLR(mixed_opt, step_size=3)])
    mixed2 = O.ChainedScheduler([T.ExponentialLR(mixed2_opt, gamma=0.9), O.StepLR(mixed2_opt, step_size=3)])
    for step in range(40):
        lrs = [[g["lr"] for g in o.param_groups] for o in (ref_opt, mixed_opt, mixed2_opt)]
        assert_close(lrs[0], lrs[1], f"step {step}")
        assert_close(lrs[0], lrs[2], f"step {step}")
        for o, s in ((ref_opt, ref), (mixed_opt, mixed), (mixed2_opt, mixed2)):
            o.step()
            s.step()


def test_optgen_optimizers_with_optgen_and_torch_schedulers():
    """optgen's schedulers drive optgen's optimizers (momentum cycling reaches Adam's betas), and
    torch's schedulers drive optgen's optimizers too."""
    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]

    for sched_module in (O, T):
        runs = []
        for opt_cls in (torch.optim.Adam, optgen.Adam):
            ps = params()
            optimizer = opt_cls(ps, lr=0.01)
            scheduler = sched_module.OneCycleLR(optimizer, max_lr=0.05, total_steps=60)
            trace = []
            for _ in range(59):
                ps[0].grad = torch.sin(ps[0].detach())
                optimizer.step()
                scheduler.step()
                trace.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
            runs.append((trace, ps[0].detach().clone()))
        assert_close([x for pair in runs[0][0] for x in pair], [x for pair in runs[1][0] for x in pair], "trace")
        torch.testing.assert_close(runs[0][1], runs[1][1])


def test_tensor_learning_rate_is_filled_in_place():
    """A Tensor lr keeps its identity (filled in place) and get_last_lr returns copies, as in torch."""
    outs = []
    for module in (T, O):
        lr = torch.tensor(0.1, dtype=torch.float64)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
        scheduler = module.ExponentialLR(optimizer, gamma=0.5)
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is lr
        last = scheduler.get_last_lr()[0]
        assert isinstance(last, torch.Tensor) and last is not lr
        outs.append(float(lr))
    assert outs[0] == outs[1] == 0.05


# -- warnings and errors ----------------------------------------------------------------------------
def _warnings_of(module, action):
    optimizer = make_optimizer("sgd")
    scheduler = module.StepLR(optimizer, step_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action(optimizer, scheduler)
    return [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("action", [
    lambda o, s: s.step(),                                   # scheduler.step() before optimizer.step()
    lambda o, s: (o.step(), s.step()),                       # the right order: no warning
    lambda o, s: s.get_lr(),                                 # get_lr outside step: use get_last_lr()
    lambda o, s: (o.step(), s.step(3)),                      # the deprecated epoch argument
], ids=["step-before-optimizer", "right-order", "get_lr", "epoch"])
def test_warnings_match_torch(action):
    assert _warnings_of(T, action) == _warnings_of(O, action)


def test_overridden_optimizer_step_warns_like_torch():
    out = []
    for module in (T, O):
        optimizer = make_optimizer("sgd")
        scheduler = module.ExponentialLR(optimizer, gamma=0.9)
        optimizer.step = lambda *a, **k: None  # replaced after the scheduler wrapped it
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scheduler.step()
        out.append([str(w.message) for w in caught])
    assert out[0] == out[1] and "overridden" in out[0][0]


#: (scheduler, kwargs that torch rejects); the optimizer is the two-group SGD unless noted
BAD_ARGUMENTS = [
    ("StepLR", dict(step_size=2), "not an optimizer"),
    ("ConstantLR", dict(factor=1.5), None),
    ("ConstantLR", dict(factor=-0.1), None),
    ("LinearLR", dict(start_factor=0), None),
    ("LinearLR", dict(start_factor=1.5), None),
    ("LinearLR", dict(end_factor=2.0), None),
    ("LambdaLR", dict(lr_lambda=[lambda e: 1.0]), None),
    ("MultiplicativeLR", dict(lr_lambda=[1.0, 2.0]), None),
    ("MultiplicativeLR", dict(lr_lambda=[lambda e: 1.0]), None),
    ("ReduceLROnPlateau", dict(factor=1.0), None),
    ("ReduceLROnPlateau", dict(mode="average"), None),
    ("ReduceLROnPlateau", dict(threshold_mode="relative"), None),
    ("ReduceLROnPlateau", dict(min_lr=[0.1]), None),
    ("ReduceLROnPlateau", dict(), "not an optimizer"),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1, mode="sine"), None),
    ("CyclicLR", dict(base_lr=[0.01], max_lr=0.1), None),
    ("CyclicLR", dict(base_lr=0.01, max_lr=[0.1, 0.2, 0.3]), None),
    ("CyclicLR", dict(base_lr=0.01, max_lr=0.1), "no momentum"),
    ("OneCycleLR", dict(max_lr=0.1), None),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=0), None),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10.5), None),
    ("OneCycleLR", dict(max_lr=0.1, epochs=0, steps_per_epoch=3), None),
    ("OneCycleLR", dict(max_lr=0.1, epochs=2, steps_per_epoch=-3), None),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10, pct_start=1.5), None),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10, pct_start=1), None),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10, anneal_strategy="cosine"), None),
    ("OneCycleLR", dict(max_lr=[0.1], total_steps=10), None),
    ("OneCycleLR", dict(max_lr=0.1, total_steps=10), "no momentum"),
    ("CosineAnnealingWarmRestarts", dict(T_0=0), None),
    ("CosineAnnealingWarmRestarts", dict(T_0=2.5), None),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=0), None),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, T_mult=1.5), None),
    ("CosineAnnealingWarmRestarts", dict(T_0=5, eta_min="0"), None),
    ("SWALR", dict(swa_lr=0.1, anneal_strategy="exp"), None),
    ("SWALR", dict(swa_lr=0.1, anneal_epochs=-1), None),
    ("SWALR", dict(swa_lr=0.1, anneal_epochs=2.0), None),
    ("SWALR", dict(swa_lr=[0.1]), None),
    ("StepLR", dict(step_size=2, last_epoch=3), None),        # resuming needs initial_lr in the groups
]


def _error(module, name, kwargs, variant):
    if variant == "not an optimizer":
        optimizer = object()
    elif variant == "no momentum":
        optimizer = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))])
    else:
        optimizer = make_optimizer("sgd")
    try:
        scheduler_class(module, name)(optimizer, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("name, kwargs, variant", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_like_torch(name, kwargs, variant):
    expected = _error(T, name, kwargs, variant)
    assert expected is not None
    assert _error(O, name, kwargs, variant) == expected


def test_step_past_total_steps_raises_like_torch():
    errors = []
    for module in (T, O):
        optimizer = make_optimizer("sgd")
        scheduler = module.OneCycleLR(optimizer, max_lr=0.1, total_steps=5)
        with pytest.raises(ValueError) as info:
            for _ in range(6):
                optimizer.step()
                scheduler.step()
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("bad", ["empty", "plateau", "other optimizer"])
def test_composite_errors_match_torch(bad):
    def attempt(module):
        optimizer, other = make_optimizer("sgd"), make_optimizer("sgd")
        scheds = {"empty": [], "plateau": [module.ReduceLROnPlateau(optimizer)],
                  "other optimizer": [module.StepLR(optimizer, 2), module.StepLR(other, 2)]}[bad]
        out: list[tuple[type[Exception], str] | None] = []
        for make in (lambda: module.ChainedScheduler(scheds, optimizer),
                     lambda: module.SequentialLR(optimizer, scheds, milestones=[1] * max(0, len(scheds) - 1))):
            try:
                make()
                out.append(None)
            except (ValueError, TypeError) as e:
                out.append((type(e), str(e).split(" has <")[0]))
        return out

    assert attempt(T) == attempt(O)


def test_signatures_match_torch():
    import inspect

    for name in [c[0] for c in CASES] + ["ReduceLROnPlateau", "ChainedScheduler", "SequentialLR"]:
        theirs = inspect.signature(scheduler_class(T, name).__init__).parameters
        ours = dict(inspect.signature(scheduler_class(O, name).__init__).parameters)
        if name not in ("ChainedScheduler", "SequentialLR"):  # (they drive what their schedulers drive)
            # torch's, plus the hyperparameter driven (docs/hyperparameters.md), keyword-only
            extra = ours.pop("hyperparameter")
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default == "lr", name
        assert list(ours) == list(theirs), name
        for p in theirs:
            assert ours[p].default == theirs[p].default, (name, p)
