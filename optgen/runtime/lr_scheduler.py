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
in lr_scheduler_base.py): a subclass that adds only the ``hyperparameter=`` it drives (Note
[Scheduling any hyperparameter]; with the default ``"lr"`` every method is torch's), so the
behaviour, errors, warnings and ``state_dict`` are torch's by construction, and ``isinstance``
answers as trainers expect (``ReduceLROnPlateau`` is a ``torch.optim.lr_scheduler.ReduceLROnPlateau``).
The composites drive generated schedulers through torch's ``_initial_step`` / ``_update_lr``,
which the generated ones inherit; they drive the hyperparameter their schedulers drive (all the same one:
``get_last_lr()`` returns its values), and for another than ``lr`` their constructors do on the
driven groups what torch's do on ``group["lr"]``.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any

from torch.optim import lr_scheduler as _torch

from optgen.runtime.hyperparameters import driven_groups
from optgen.runtime.lr_scheduler_base import (
    HyperparameterScheduler,
    _group_values,
    _update_param_group_val,
    _warn_get_lr_called_within_step,
    check_state_drives,
    drive,
)

__all__ = ["LambdaLR", "MultiplicativeLR", "ChainedScheduler", "SequentialLR", "ReduceLROnPlateau"]


# torch's class first: its constructor's super().__init__ reaches HyperparameterScheduler's
class LambdaLR(_torch.LambdaLR, HyperparameterScheduler):
    """lr = initial lr × ``lr_lambda(epoch)``: torch's LambdaLR (a user callable; Note [Which
    schedulers are not generated])."""

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1, *, hyperparameter: str = "lr") -> None:
        drive(self, optimizer, hyperparameter)
        super().__init__(optimizer, lr_lambda, last_epoch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_drives(self, state_dict)
        super().load_state_dict(state_dict)


class MultiplicativeLR(_torch.MultiplicativeLR, HyperparameterScheduler):
    """lr ×= ``lr_lambda(epoch)`` every step: torch's MultiplicativeLR (a user callable)."""

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1, *, hyperparameter: str = "lr") -> None:
        drive(self, optimizer, hyperparameter)
        super().__init__(optimizer, lr_lambda, last_epoch)

    def get_lr(self) -> list:
        if self.hyperparameter == "lr":
            return super().get_lr()
        _warn_get_lr_called_within_step(self)  # torch's get_lr, on the driven groups
        if self._is_initial:
            return self._current_values()
        return [group["lr"] * lmbda(self.last_epoch)
                for lmbda, group in zip(self.lr_lambdas, self._groups(), strict=True)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_drives(self, state_dict)
        super().load_state_dict(state_dict)


def _one_hyperparameter(composite: str, schedulers) -> str:
    """The hyperparameter every scheduler of a composite drives (its ``get_last_lr()`` values)."""
    names = list(dict.fromkeys(getattr(s, "hyperparameter", "lr") for s in schedulers))
    if len(names) > 1:
        raise ValueError(f"{composite} expects all schedulers to drive the same hyperparameter (its "
                         f"get_last_lr() returns its values), but got {', '.join(map(repr, names))}; "
                         "step schedulers of different hyperparameters separately")
    return names[0] if names else "lr"


class ChainedScheduler(_torch.ChainedScheduler):
    """Steps several chainable schedulers together: torch's ChainedScheduler (it composes others)."""

    hyperparameter = "lr"

    def __init__(self, schedulers, optimizer=None) -> None:
        super().__init__(schedulers, optimizer)
        name = _one_hyperparameter(type(self).__name__, self._schedulers)
        if name != "lr":
            self.hyperparameter = name
            self._last_lr = _group_values(driven_groups(self._schedulers[-1].optimizer, name))

    def step(self) -> None:  # type: ignore[override]
        super().step()
        if self.hyperparameter != "lr":
            self._last_lr = _group_values(driven_groups(self._schedulers[-1].optimizer, self.hyperparameter))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_drives(self, state_dict)
        super().load_state_dict(state_dict)


class SequentialLR(_torch.SequentialLR):
    """Runs schedulers one after another, switching at milestones: torch's SequentialLR (it composes others)."""

    hyperparameter = "lr"

    def __init__(self, optimizer, schedulers, milestones, last_epoch: int = -1) -> None:
        name = _one_hyperparameter(type(self).__name__, schedulers)
        if name == "lr":
            super().__init__(optimizer, schedulers, milestones, last_epoch)
            return
        # torch's constructor, resetting the driven hyperparameter instead of group["lr"]
        for i, scheduler in enumerate(schedulers):
            if isinstance(scheduler, _torch.ReduceLROnPlateau):
                raise ValueError(f"{type(self).__name__} does not support `ReduceLROnPlateau` scheduler as it "
                                 "requires additional kwargs to be specified when calling `step`, "
                                 f"but got one at index {i} in the given schedulers sequence.")
            if optimizer != scheduler.optimizer:
                raise ValueError(f"{type(self).__name__} expects all schedulers to belong to the same optimizer, "
                                 f"but got scheduler {type(scheduler).__name__} at index {i} has "
                                 f"{scheduler.optimizer}, which is different from {type(optimizer).__name__}.")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError("Sequential Schedulers expects number of schedulers provided to be one more than the "
                             f"number of milestone points, but got number of schedulers {len(schedulers)} and the "
                             f"number of milestones to be equal to {len(milestones)}")
        self.hyperparameter = name
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in driven_groups(optimizer, name):
            _update_param_group_val(group, "lr", group["initial_lr"])
        self.recursive_undo()
        idx = bisect_right(self._milestones, 0)
        self._schedulers[idx]._initial_step()
        self._last_lr = schedulers[idx].get_last_lr()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_drives(self, state_dict)
        super().load_state_dict(state_dict)


class ReduceLROnPlateau(_torch.ReduceLROnPlateau):
    """Divides the lr by ``1/factor`` when a metric stops improving: torch's ReduceLROnPlateau
    (the lr depends on the metrics passed to ``step(metrics)``, not on the step count).  With
    ``hyperparameter=``, it reduces that one, and ``min_lr`` is its floor."""

    hyperparameter = "lr"

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0, eps=1e-8, *, hyperparameter: str = "lr") -> None:
        drive(self, optimizer, hyperparameter)
        super().__init__(optimizer, mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps)
        self._record_last()

    def _record_last(self) -> None:
        if self.hyperparameter != "lr":
            self._last_lr = _group_values(driven_groups(self.optimizer, self.hyperparameter))

    def step(self, metrics, epoch=None) -> None:  # type: ignore[override]
        super().step(metrics, epoch)
        self._record_last()

    def _reduce_lr(self, epoch) -> None:
        if self.hyperparameter == "lr":
            super()._reduce_lr(epoch)
            return
        groups = driven_groups(self.optimizer, self.hyperparameter)
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(f"The number of param groups in the `optimizer` ({len(groups)}) differs from "
                                   f"when `ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due "
                                   "to a new param group being added to the optimizer. Please modify the "
                                   "`min_lrs` field to match the length of the `optimizer` param groups.")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, floor in zip(groups, self.min_lrs, strict=True):
            old = float(group["lr"])
            new = max(old * self.factor, floor)
            if old - new > self.eps:
                _update_param_group_val(group, "lr", new)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_drives(self, state_dict)
        super().load_state_dict(state_dict)
