"""optgen's schedulers are torch's scheduler types, so trainers that dispatch on isinstance accept them.

Lightning rejects a scheduler that is not a ``torch.optim.lr_scheduler.LRScheduler`` (or
``ReduceLROnPlateau``) and, like HF Trainer, calls ``step(metrics)`` on a ReduceLROnPlateau and
``step()`` on anything else, deciding by ``isinstance``.  ``trainer_loop`` below does what they do.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as T
from torch.optim import swa_utils as TS

import optgen
from optgen import lr_scheduler as O
from optgen import swa_utils as OS

RTOL = 1e-12
SCHEDULERS = [name for name in O.__all__ if name != "LRScheduler"] + ["SWALR"]


def _cls(name: str) -> type:
    return OS.SWALR if name == "SWALR" else getattr(O, name)


def test_every_scheduler_is_listed():
    assert set(SCHEDULERS) >= {"LambdaLR", "ReduceLROnPlateau", "SequentialLR", "OneCycleLR", "InverseSqrtLR"}
    assert len(SCHEDULERS) == 19


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_class_is_a_torch_lr_scheduler(name):
    assert issubclass(_cls(name), T.LRScheduler)
    if name == "ReduceLROnPlateau":
        assert issubclass(_cls(name), T.ReduceLROnPlateau)


def test_base_is_torchs():
    assert O.LRScheduler is T.LRScheduler


def _optimizer(module):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    return params, module.SGD(params, lr=0.1, momentum=0.9)


def _instances(optimizer):
    """One instance of every scheduler on ``optimizer`` (constructed, not stepped)."""
    def sub():
        return O.ExponentialLR(optimizer, gamma=0.9)

    kwargs: dict[str, dict[str, Any]] = {
        "LambdaLR": dict(lr_lambda=lambda e: 0.9 ** e), "MultiplicativeLR": dict(lr_lambda=lambda e: 0.9),
        "StepLR": dict(step_size=2), "MultiStepLR": dict(milestones=[2]), "ExponentialLR": dict(gamma=0.9),
        "CosineAnnealingLR": dict(T_max=5), "CyclicLR": dict(base_lr=0.01, max_lr=0.1),
        "OneCycleLR": dict(max_lr=0.1, total_steps=10), "CosineAnnealingWarmRestarts": dict(T_0=3),
        "WarmupCosineLR": dict(warmup_steps=2, total_steps=10), "WarmupStableDecayLR":
        dict(warmup_steps=2, decay_steps=3, total_steps=10), "InverseSqrtLR": dict(warmup_steps=2),
        "SWALR": dict(swa_lr=0.05),
    }
    for name in SCHEDULERS:
        if name == "ChainedScheduler":
            yield name, O.ChainedScheduler([sub()])
        elif name == "SequentialLR":
            yield name, O.SequentialLR(optimizer, [sub(), sub()], milestones=[2])
        else:
            yield name, _cls(name)(optimizer, **kwargs.get(name, {}))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_instances_are_torch_lr_schedulers(name):
    _, optimizer = _optimizer(optgen)
    scheduler = dict(_instances(optimizer))[name]
    assert isinstance(scheduler, T.LRScheduler)
    assert isinstance(scheduler, T.ReduceLROnPlateau) == (name == "ReduceLROnPlateau")


def trainer_loop(params, optimizer, scheduler, epochs=12):
    """A Lightning/HF-style loop: validate the type, then step by isinstance; returns the lrs."""
    if not isinstance(scheduler, (T.LRScheduler, T.ReduceLROnPlateau)):
        raise TypeError(f"The provided lr scheduler `{type(scheduler).__name__}` doesn't follow "
                        "PyTorch's LRScheduler API")
    lrs = []
    for epoch in range(epochs):
        loss = (params[0] ** 2).sum() if epoch < 3 else torch.tensor(1.0, dtype=torch.float64)
        optimizer.zero_grad()
        loss.backward() if loss.requires_grad else None
        optimizer.step()
        if isinstance(scheduler, T.ReduceLROnPlateau):
            scheduler.step(loss.detach())  # a plateau after epoch 3
        else:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("name", ["ReduceLROnPlateau", "OneCycleLR", "SequentialLR", "LambdaLR", "SWALR"])
def test_trainer_style_loop_matches_torch(name):
    """optgen's optimizer and scheduler in the trainer loop give torch's learning rates."""
    runs = []
    for opt_module, sched_module, swa in ((torch.optim, T, TS), (optgen, O, OS)):
        params, optimizer = _optimizer(opt_module)
        if name == "ReduceLROnPlateau":
            scheduler = sched_module.ReduceLROnPlateau(optimizer, patience=1, factor=0.5)
        elif name == "OneCycleLR":
            scheduler = sched_module.OneCycleLR(optimizer, max_lr=0.2, total_steps=12)
        elif name == "SequentialLR":
            scheduler = sched_module.SequentialLR(optimizer, [sched_module.LinearLR(optimizer, 0.1, total_iters=3),
                                                              sched_module.StepLR(optimizer, 2)], milestones=[3])
        elif name == "LambdaLR":
            scheduler = sched_module.LambdaLR(optimizer, lambda e: 1 / (1 + e))
        else:
            scheduler = swa.SWALR(optimizer, swa_lr=0.05, anneal_epochs=4)
        runs.append((trainer_loop(params, optimizer, scheduler), params[0].detach().clone()))
    # the generated recursions round differently from torch's (test_scheduler_parity.py's RTOL)
    for theirs, ours in zip(runs[0][0], runs[1][0], strict=True):
        assert math.isclose(theirs, ours, rel_tol=RTOL, abs_tol=1e-15), (runs[0][0], runs[1][0])
    if name == "ReduceLROnPlateau":
        assert runs[1][0] == runs[0][0] and runs[1][0][-1] < runs[1][0][0]  # the plateau reduced the lr
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=RTOL, atol=1e-15)
