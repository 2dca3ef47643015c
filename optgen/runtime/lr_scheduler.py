"""The schedulers that are not formulas of the step count: torch's own classes, under optgen's name.

The formula schedulers (StepLR, CosineAnnealingLR, …) are generated from specs/schedulers/ into
generated/lr_scheduler.py on the bases in optgen/runtime/lr_scheduler_base.py;
:mod:`optgen.lr_scheduler` exports both.

Note [Which schedulers are not generated]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A spec describes a schedule as a closed-form lr(t) from which optgen derives the chainable form.
That is impossible for:

- LambdaLR, MultiplicativeLR: the factor is a user callable, opaque to the compiler;
- ReduceLROnPlateau: the lr depends on the metrics passed to ``step``, not on the step count;
- ChainedScheduler, SequentialLR: they compose other schedulers; there is no formula of their own.

With nothing for optgen to derive, each is torch's class (Note [optgen's schedulers are torch's]
in lr_scheduler_base.py): a subclass that adds nothing, so the behaviour, errors, warnings and
``state_dict`` are torch's by construction, and ``isinstance`` answers as trainers expect
(``ReduceLROnPlateau`` is a ``torch.optim.lr_scheduler.ReduceLROnPlateau``).  The composites
drive generated schedulers through torch's ``_initial_step`` / ``_update_lr``, which the
generated ones inherit.
"""
from __future__ import annotations

from torch.optim import lr_scheduler as _torch

__all__ = ["LambdaLR", "MultiplicativeLR", "ChainedScheduler", "SequentialLR", "ReduceLROnPlateau"]


class LambdaLR(_torch.LambdaLR):
    """lr = initial lr × ``lr_lambda(epoch)``: torch's LambdaLR (a user callable; Note [Which
    schedulers are not generated])."""


class MultiplicativeLR(_torch.MultiplicativeLR):
    """lr ×= ``lr_lambda(epoch)`` every step: torch's MultiplicativeLR (a user callable)."""


class ChainedScheduler(_torch.ChainedScheduler):
    """Steps several chainable schedulers together: torch's ChainedScheduler (it composes others)."""


class SequentialLR(_torch.SequentialLR):
    """Runs schedulers one after another, switching at milestones: torch's SequentialLR (it composes others)."""


class ReduceLROnPlateau(_torch.ReduceLROnPlateau):
    """Divides the lr by ``1/factor`` when a metric stops improving: torch's ReduceLROnPlateau
    (the lr depends on the metrics passed to ``step(metrics)``, not on the step count)."""
