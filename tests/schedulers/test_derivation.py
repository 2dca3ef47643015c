"""The derived chainable form against the closed form, and optgen's own schedules against
independent references.

For every chainable spec, get_lr (the recursion optgen derived) must reproduce the closed form
step by step; for the schedules torch lacks, the closed form itself is checked against plain
Python written here from the papers' definitions (not from the specs).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from optgen import lr_scheduler as O
from optgen import swa_utils
from optgen.schedules.build import load_schedules
from optgen.schedules.derive import derive

SPECS = {s.name: s for s in load_schedules()}
STEPS = 150


def lrs_by_recursion_and_closed_form(cls, kwargs, steps=STEPS):
    """(lrs from step(), lrs from the closed form at each t) for a two-group optimizer."""
    def optimizer():
        return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
                                {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.03}], momentum=0.9)
    o1, o2 = optimizer(), optimizer()
    s1, s2 = cls(o1, **kwargs), cls(o2, **kwargs)
    recursive, closed = [s1.get_last_lr()], [s2.get_last_lr()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(1, steps):
            o1.step()
            s1.step()
            o2.step()
            s2.step(t)
            recursive.append(s1.get_last_lr())
            closed.append(s2.get_last_lr())
    return recursive, closed


#: chainable schedulers: (name, kwargs); the torch ones are also covered against torch
RECURSION_CASES = [
    ("StepLR", dict(step_size=4, gamma=0.7)), ("MultiStepLR", dict(milestones=[5, 5, 40])),
    ("ConstantLR", dict(factor=0.2, total_iters=13)),
    ("LinearLR", dict(start_factor=0.3, end_factor=0.6, total_iters=50)),
    ("ExponentialLR", dict(gamma=0.98)), ("PolynomialLR", dict(total_iters=60, power=3.0)),
    ("CosineAnnealingLR", dict(T_max=30, eta_min=0.004)), ("CosineAnnealingLR", dict(T_max=7)),
    ("WarmupCosineLR", dict(warmup_steps=10, total_steps=100)),
    ("WarmupCosineLR", dict(warmup_steps=0, total_steps=60, eta_min=1e-3)),
    ("WarmupCosineLR", dict(warmup_steps=20, total_steps=21, warmup_start_factor=0.1)),
    ("WarmupStableDecayLR", dict(warmup_steps=10, decay_steps=30, total_steps=100)),
    ("WarmupStableDecayLR", dict(warmup_steps=5, decay_steps=50, total_steps=120, decay_shape="linear", eta_min=1e-3)),
    ("WarmupStableDecayLR", dict(warmup_steps=0, decay_steps=1, total_steps=40, decay_shape="cosine")),
    ("InverseSqrtLR", dict(warmup_steps=10)), ("InverseSqrtLR", dict(warmup_steps=1, warmup_start_factor=0.5)),
]


@pytest.mark.parametrize("name, kwargs", RECURSION_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(RECURSION_CASES)])
def test_recursion_reproduces_closed_form(name, kwargs):
    recursive, closed = lrs_by_recursion_and_closed_form(getattr(O, name), kwargs)
    for t, (a, b) in enumerate(zip(recursive, closed, strict=True)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"t={t}"


# -- independent references for the schedules torch lacks ------------------------------------------
def warmup_cosine(t, base, warmup_steps, total_steps, warmup_start_factor=0.0, eta_min=0.0):
    if t < warmup_steps:
        return base * (warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps)
    progress = min(1.0, (t - warmup_steps) / (total_steps - warmup_steps))
    return eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd(t, base, warmup_steps, decay_steps, total_steps, decay_shape="1-sqrt", warmup_start_factor=0.0, eta_min=0.0):
    if t < warmup_steps:
        return base * (warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps)
    start = total_steps - decay_steps
    if t < start:
        return base
    x = min(1.0, (t - start) / decay_steps)
    factor = {"linear": 1 - x, "cosine": 0.5 * (1 + math.cos(math.pi * x)), "1-sqrt": 1 - math.sqrt(x)}[decay_shape]
    return eta_min + (base - eta_min) * factor


def inverse_sqrt(t, base, warmup_steps, warmup_start_factor=0.0):
    if t < warmup_steps:
        return base * (warmup_start_factor + (1 - warmup_start_factor) * t / warmup_steps)
    return base * math.sqrt(warmup_steps) / math.sqrt(t)


REFERENCES: dict[str, Callable[..., float]] = {"WarmupCosineLR": warmup_cosine, "WarmupStableDecayLR": wsd,
                                               "InverseSqrtLR": inverse_sqrt}


@pytest.mark.parametrize("name, kwargs", [c for c in RECURSION_CASES if c[0] in REFERENCES],
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(RECURSION_CASES) if c[0] in REFERENCES])
def test_new_schedules_against_references(name, kwargs):
    recursive, _ = lrs_by_recursion_and_closed_form(getattr(O, name), kwargs)
    for t, lrs in enumerate(recursive):
        expected = [REFERENCES[name](t, base, **kwargs) for base in (0.1, 0.03)]
        assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15), f"t={t}"


def test_new_schedules_chain_with_others():
    """The derived recursion composes: WarmupCosineLR stacked with a constant decay multiplies."""
    runs = []
    for stacked in (False, True):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedulers = [O.WarmupCosineLR(optimizer, warmup_steps=5, total_steps=50, warmup_start_factor=0.1)]
        if stacked:
            schedulers.append(O.ExponentialLR(optimizer, gamma=0.99))
        lrs = []
        for _ in range(40):
            optimizer.step()
            for s in schedulers:
                s.step()
            lrs.append(optimizer.param_groups[0]["lr"])
        runs.append(lrs)
    for t, (alone, stacked) in enumerate(zip(*runs, strict=True), start=1):
        if t <= 5:  # in the warm-up the recursion is a pure ratio: the factors multiply exactly
            assert stacked == pytest.approx(alone * 0.99 ** t, rel=1e-12)


@pytest.mark.parametrize("bad, message", [
    (dict(warmup_steps=-1, total_steps=10), "Expected non-negative integer warmup_steps, but got -1"),
    (dict(warmup_steps=10, total_steps=10), "Expected integer total_steps greater than warmup_steps (10), but got 10"),
    (dict(warmup_steps=1, total_steps=10, warmup_start_factor=2.0),
     "Expected warmup_start_factor between 0 and 1, but got 2.0"),
])
def test_new_schedule_checks(bad, message):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"):
        O.WarmupCosineLR(optimizer, **bad)
    with pytest.raises(ValueError, match="decay_shape must be one of"):
        O.WarmupStableDecayLR(optimizer, warmup_steps=1, decay_steps=2, total_steps=5, decay_shape="exp")
    with pytest.raises(ValueError, match="Expected positive integer warmup_steps, but got 0"):
        O.InverseSqrtLR(optimizer, warmup_steps=0)


# -- the derivation itself ------------------------------------------------------------------------
def test_derived_forms_read_like_torchs():
    """The recursions come out in torch's own shapes."""
    step = derive(SPECS["StepLR"]).describe()
    assert "Eq(Mod(t, step_size), 0): lr(t) = lr(t-1) * gamma" in step
    assert derive(SPECS["ExponentialLR"]).describe()[1] == "t >= 1: lr(t) = lr(t-1) * gamma"
    cosine = derive(SPECS["CosineAnnealingLR"])
    (branch,) = cosine.branches
    assert branch.step.kind == "affine" and str(branch.step.anchor) == "eta_min"
    assert branch.step.guard_delta is not None  # f(t-1) = 0 at odd multiples of T_max: additive there
    linear = derive(SPECS["LinearLR"])
    assert [b.step.kind for b in linear.branches] == ["scale", "keep"]
    constant = derive(SPECS["ConstantLR"])
    assert [(b.interval.describe(), b.step.kind) for b in constant.branches] == [("t == total_iters", "scale"),
                                                                                ("always", "keep")]
    swa = derive(SPECS["SWALR"])
    assert swa.branches[0].step.kind == "affine" and str(swa.branches[0].step.anchor) == "swa_lr"


def test_impossible_derivations_say_why():
    assert "does not depend on base_lr" in (derive(SPECS["OneCycleLR"]).why_not or "")
    assert "not a function of t" in (derive(SPECS["CosineAnnealingWarmRestarts"]).why_not or "")
    cyclic = derive(SPECS["CyclicLR"])  # exists (affine around max_lr) but torch's get_lr is closed
    assert cyclic.why_not is None and not SPECS["CyclicLR"].chainable


def test_generated_module_is_current_and_compiles():
    from optgen.schedules.render import render_module

    path = Path(__file__).resolve().parents[2] / "generated" / "lr_scheduler.py"
    assert path.read_text() == render_module(list(SPECS.values()))
    assert "sympy" not in path.read_text()


def test_importing_optgen_schedulers_loads_no_compiler():
    import subprocess
    import sys

    code = ("import sys, optgen, optgen.lr_scheduler, optgen.swa_utils; "
            "print(any(m == 'sympy' or m.startswith('sympy.') or m.startswith('optgen.schedules') "
            "for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_swalr_is_the_generated_class():
    assert swa_utils.SWALR.__module__.endswith("lr_scheduler")
