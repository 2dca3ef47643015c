"""The bases of optgen's generated learning-rate schedulers: torch's ``LRScheduler`` and what is not a formula.

generated/lr_scheduler.py (rendered from specs/schedulers/ by optgen/schedules/render.py through
templates/scheduler/) imports everything it uses from here:

- :class:`LRScheduler` is ``torch.optim.lr_scheduler.LRScheduler`` itself: the initial step,
  ``last_epoch``, ``get_last_lr``, ``step`` / ``step(epoch)``, ``state_dict`` /
  ``load_state_dict`` and the check that ``optimizer.step()`` ran before ``scheduler.step()``
  are torch's code (Note [optgen's schedulers are torch's]);
- :class:`CyclicLRBase`, :class:`OneCycleLRBase`, :class:`WarmRestartsBase` give the generated
  CyclicLR, OneCycleLR and CosineAnnealingWarmRestarts what is procedure, not formula (torch's
  constructors step for step, restart bookkeeping, state_dicts without callables);
- the small helpers the generated ``get_lr`` bodies call (Tensor learning rates are copied, never
  aliased, and filled in place, as torch does);
- :class:`HyperparameterScheduler`, the base of every generated scheduler: torch's
  ``LRScheduler`` that drives any hyperparameter (Note [Scheduling any hyperparameter]).

The schedulers that are not formulas live in optgen/runtime/lr_scheduler.py.

Note [optgen's schedulers are torch's]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every optgen scheduler subclasses ``torch.optim.lr_scheduler.LRScheduler`` (ReduceLROnPlateau
torch's ``ReduceLROnPlateau``), because trainers decide by ``isinstance``: Lightning rejects any
other scheduler and, like HF Trainer, calls ``step(metrics)`` only on a ReduceLROnPlateau.  A
generated scheduler overrides only what its spec decides (``__init__``'s signature and checks,
``get_lr``, ``_get_closed_form_lr``), so its ``state_dict()`` is torch's (every attribute but the
optimizer, with torch's attribute names) and loads into torch's scheduler and back, and torch's
ChainedScheduler / SequentialLR drive optgen's schedulers through torch's own ``_initial_step``
and ``_update_lr``.

Note [Scheduling any hyperparameter]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Every optgen scheduler takes ``hyperparameter=`` (default ``"lr"``): the name of the numeric
hyperparameter it drives, a tuple item by its spec name (``"beta1"``: Note [Hyperparameters by
name] in optgen/runtime/hyperparameters.py).  Several schedulers may drive different
hyperparameters of one optimizer.  The schedule code is written once, for ``lr``: it reads the
groups through ``self._groups()``, which is the optimizer's own ``param_groups`` for ``lr`` — so
the default runs torch's code on torch's objects, bit for bit — and otherwise
:class:`~optgen.runtime.hyperparameters.DrivenGroup` views that show the driven value as ``"lr"``
and ``initial_lr`` as ``initial_<name>``.  :class:`HyperparameterScheduler` replaces the two
places where torch's base reads the groups itself (``__init__``, ``_update_lr``) for another
hyperparameter, and calls torch's for ``lr``.  What changes with the name:

- ``base_lrs``, ``get_last_lr()`` and ``get_lr()`` hold the driven values (the names are torch's);
- ``hyperparameter`` is an attribute only when it is not ``"lr"``, so it is in ``state_dict()``
  exactly then: an lr scheduler's state is torch's (and loads into torch's scheduler), and a
  state without the key drives ``lr``.  Loading the state of a scheduler that drives another
  hyperparameter is a ValueError;
- CyclicLR / OneCycleLR's ``cycle_momentum`` (momentum cycled against the lr) is a ValueError
  for another hyperparameter: drive the momentum with a scheduler of its own.
"""
from __future__ import annotations

import math
import types
import warnings
import weakref
from functools import partial, wraps
from typing import Any, Protocol

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from optgen.runtime.hyperparameters import driven_groups, resolve

__all__ = ["LRScheduler", "HyperparameterScheduler", "CyclicLRBase", "OneCycleLRBase", "WarmRestartsBase"]


# -- helpers on param groups (torch's semantics: Tensor lrs are copied, never aliased) -------------
def _format_param(name: str, optimizer: Optimizer, param: Any) -> list:
    """One value per param group: a list/tuple must match the groups, a scalar is repeated."""
    if isinstance(param, (list, tuple)):
        if len(param) != len(optimizer.param_groups):
            raise ValueError(
                f"{name} must have the same length as optimizer.param_groups. "
                f"{name} has {len(param)} values, param_groups has {len(optimizer.param_groups)}."
            )
    else:
        param = [param] * len(optimizer.param_groups)
    return [p.clone() if isinstance(p, Tensor) else p for p in param]


def _param_groups_val_list(optimizer: Optimizer, key: str) -> list:
    """``group[key]`` of every group, Tensors cloned (so callers cannot alias the optimizer's)."""
    return [group[key].clone() if isinstance(group[key], Tensor) else group[key]
            for group in optimizer.param_groups]


def _group_values(groups: list, key: str = "lr") -> list:
    """``group[key]`` of every group (or driven-group view), Tensors cloned."""
    return [group[key].clone() if isinstance(group[key], Tensor) else group[key] for group in groups]


def _update_param_group_val(param_group: dict, key: str, val: float | Tensor) -> None:
    """Sets ``param_group[key]``; a Tensor entry is filled in place (its identity is kept)."""
    if isinstance(param_group[key], Tensor):
        value = val.squeeze() if isinstance(val, Tensor) and val.dim() != 0 else val
        param_group[key].fill_(value)
    else:
        param_group[key] = val


def _warn_get_lr_called_within_step(scheduler: LRScheduler) -> None:
    """torch's warning for ``get_lr()`` called by the user (outside ``step``), pointing at the caller."""
    if not scheduler._get_lr_called_within_step:
        warnings.warn("To get the last learning rate computed by the scheduler, please use `get_last_lr()`.",
                      UserWarning, stacklevel=3)


class _enable_get_lr_call:
    """Marks ``get_lr`` calls made by ``step`` (a direct call warns: use ``get_last_lr()``)."""

    def __init__(self, scheduler: LRScheduler):
        self.scheduler = scheduler

    def __enter__(self):
        self.scheduler._get_lr_called_within_step = True
        return self

    def __exit__(self, *exc):
        self.scheduler._get_lr_called_within_step = False


class _CyclesMomentum(Protocol):
    use_beta1: bool  # CyclicLR, OneCycleLR: whether the optimizer's momentum is betas[0]


def _set_momentum(scheduler: _CyclesMomentum, group: dict, momentum: float) -> None:
    """Cycled momentum goes to ``betas[0]`` for Adam-like optimizers, else to ``momentum``."""
    if scheduler.use_beta1:
        group["betas"] = (momentum, *group["betas"][1:])
    else:
        group["momentum"] = momentum


# -- any hyperparameter (Note [Scheduling any hyperparameter]) -------------------------------------
def check_state_drives(scheduler: Any, state_dict: dict[str, Any]) -> None:
    """A state dict loads only into a scheduler that drives the same hyperparameter."""
    theirs, ours = state_dict.get("hyperparameter", "lr"), getattr(scheduler, "hyperparameter", "lr")
    if theirs != ours:
        raise ValueError(f"cannot load the state of a scheduler that drives {theirs!r} into "
                         f"{type(scheduler).__name__}, which drives {ours!r}")


def drive(scheduler: Any, optimizer: Any, hyperparameter: str) -> None:
    """The first line of every constructor: checks the name (a ValueError lists the optimizer's
    names) and records it, as an attribute only when it is not ``"lr"``."""
    if hyperparameter == "lr":
        return
    if isinstance(optimizer, Optimizer):  # (anything else is torch's TypeError, raised later)
        resolve(optimizer, hyperparameter)
    elif not isinstance(hyperparameter, str):
        raise TypeError(f"hyperparameter must be a str, not {type(hyperparameter).__name__}")
    scheduler.hyperparameter = hyperparameter


class HyperparameterScheduler(LRScheduler):
    """torch's ``LRScheduler`` driving ``self.hyperparameter`` (Note [Scheduling any hyperparameter]):
    for ``"lr"`` it is torch's code; for another name the two methods that read the groups
    themselves run on driven-group views."""

    hyperparameter: str = "lr"

    def _groups(self, optimizer: Optimizer | None = None) -> list:
        """The param groups as this scheduler sees them: the optimizer's own for lr, else views."""
        optimizer = self.optimizer if optimizer is None else optimizer
        if self.hyperparameter == "lr":  # (every step: the common case first)
            return optimizer.param_groups
        return driven_groups(optimizer, self.hyperparameter)

    def _current_values(self) -> list:
        """The driven value of every group, Tensors cloned (a step that keeps them)."""
        return _group_values(self._groups())

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if self.hyperparameter == "lr":
            super().__init__(optimizer, last_epoch)
            return
        # torch's LRScheduler.__init__, on the driven groups
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        groups = self._groups()
        if last_epoch == -1:
            for group in groups:
                initial = group["lr"]
                group.setdefault("initial_lr", initial.clone() if isinstance(initial, Tensor) else initial)
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_{self.hyperparameter}' is not specified in param_groups[{i}] "
                                   "when resuming scheduler with last_epoch >= 0.")
        self.base_lrs = _group_values(groups, "initial_lr")
        self.last_epoch = last_epoch
        _track_step_called(self)
        self._initial_step()

    def _update_lr(self, epoch: int | None = None) -> None:
        if self.hyperparameter == "lr":
            super()._update_lr(epoch)
            return
        # torch's LRScheduler._update_lr, on the driven groups
        with _enable_get_lr_call(self):
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
        groups = self._groups()
        for group, value in zip(groups, values, strict=True):
            _update_param_group_val(group, "lr", value)
        self._last_lr = _group_values(groups)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_drives(self, state_dict)
        super().load_state_dict(state_dict)


def _track_step_called(scheduler: LRScheduler) -> None:
    """torch's wrapper of ``optimizer.step`` that records it ran (its warning when
    ``scheduler.step()`` comes first), installed once per optimizer, as torch's constructor does."""
    opt = scheduler.optimizer
    if hasattr(opt.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = weakref.ref(opt)
    func = opt.step.__func__  # type: ignore[attr-defined]

    @wraps(func)
    def wrapper(*args, **kwargs):
        o = opt_ref()
        o._opt_called = True  # type: ignore[union-attr]
        return func.__get__(o, o.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


# -- bases of generated schedulers: the parts that are procedure, not formula ----------------------
def _check_momentum_support(optimizer: Optimizer) -> bool:
    """Whether cycled momentum goes to ``betas[0]`` (True) or ``momentum``; raises if neither exists."""
    if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
        raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
    return "betas" in optimizer.defaults


def _start_momentum(scheduler: _CyclesMomentum, optimizer: Optimizer, base_momentums: list,
                    max_momentums: list) -> None:
    """A fresh cycle starts at max_momentum; both bounds are recorded in each group, as torch does."""
    for m_momentum, b_momentum, group in zip(max_momentums, base_momentums, optimizer.param_groups, strict=True):
        _set_momentum(scheduler, group, m_momentum)
        group["max_momentum"] = m_momentum
        group["base_momentum"] = b_momentum


def _check_cycle_momentum(scheduler: HyperparameterScheduler, cycle_momentum: bool) -> None:
    """Momentum cycled against the lr has no meaning for a scheduler that drives something else."""
    if cycle_momentum and scheduler.hyperparameter != "lr":
        raise ValueError(f"cycle_momentum=True cycles the momentum against the learning rate; a "
                         f"{type(scheduler).__name__} that drives {scheduler.hyperparameter!r} needs "
                         "cycle_momentum=False (drive the momentum with a scheduler of its own)")


class CyclicLRBase(HyperparameterScheduler):
    """What CyclicLR needs besides its formula: per-group bounds, the scale-function policy and
    momentum set-up (torch's constructor, step for step), and a state_dict without callables."""

    def __init__(self, optimizer: Optimizer, base_lr, max_lr, step_size_up, step_size_down, mode, gamma,
                 scale_fn, scale_mode, cycle_momentum, base_momentum, max_momentum, last_epoch) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        base_lrs = _format_param("base_lr", optimizer, base_lr)
        if last_epoch == -1:
            for lr, group in zip(base_lrs, self._groups(optimizer), strict=True):
                _update_param_group_val(group, "lr", lr)
        self.max_lrs = _format_param("max_lr", optimizer, max_lr)
        step_size_up = float(step_size_up)
        step_size_down = float(step_size_down) if step_size_down is not None else step_size_up
        self.total_size = step_size_up + step_size_down
        self.step_ratio = step_size_up / self.total_size
        if mode not in ["triangular", "triangular2", "exp_range"] and scale_fn is None:
            raise ValueError("mode is invalid and scale_fn is None")
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode
        self._init_scale_fn()
        self.cycle_momentum = cycle_momentum
        _check_cycle_momentum(self, cycle_momentum)
        if cycle_momentum:
            self.use_beta1 = _check_momentum_support(optimizer)
            self.base_momentums = _format_param("base_momentum", optimizer, base_momentum)
            self.max_momentums = _format_param("max_momentum", optimizer, max_momentum)
            if last_epoch == -1:
                _start_momentum(self, optimizer, self.base_momentums, self.max_momentums)
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _init_scale_fn(self) -> None:
        if self._scale_fn_custom is not None:
            return
        if self.mode == "triangular":
            self._scale_fn_ref = self._triangular_scale_fn
            self.scale_mode = "cycle"
        elif self.mode == "triangular2":
            self._scale_fn_ref = self._triangular2_scale_fn
            self.scale_mode = "cycle"
        elif self.mode == "exp_range":
            self._scale_fn_ref = partial(self._exp_range_scale_fn, self.gamma)
            self.scale_mode = "iterations"

    def scale_fn(self, x) -> float:
        """The amplitude scaling: the user's ``scale_fn`` or the one ``mode`` names."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        return self._scale_fn_ref(x)

    @staticmethod
    def _triangular_scale_fn(x: float) -> float:
        return 1.0

    @staticmethod
    def _triangular2_scale_fn(x: float) -> float:
        return 1 / (2.0 ** (x - 1))

    @staticmethod
    def _exp_range_scale_fn(gamma: float, x: float) -> float:
        return gamma**x

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_scale_fn_ref", None)  # a bound method or partial: rebuilt on load
        fn = state.pop("_scale_fn_custom")
        state["_scale_fn_custom"] = None
        if fn is not None and not isinstance(fn, types.FunctionType):
            state["_scale_fn_custom"] = fn.__dict__.copy()  # a callable object's state is kept
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fn = state_dict.pop("_scale_fn_custom")
        super().load_state_dict(state_dict)
        if fn is not None:
            self._scale_fn_custom.__dict__.update(fn)
        self._init_scale_fn()


class OneCycleLRBase(HyperparameterScheduler):
    """What OneCycleLR needs besides its formula: torch's constructor (validation, the phase table
    that torch's state_dict carries, per-group lrs and momentum set-up)."""

    def __init__(self, optimizer: Optimizer, max_lr, total_steps, epochs, steps_per_epoch, pct_start,
                 anneal_strategy, cycle_momentum, base_momentum, max_momentum, div_factor, final_div_factor,
                 three_phase, last_epoch) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        if total_steps is not None:
            if total_steps <= 0 or not isinstance(total_steps, int):
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
            self.total_steps = total_steps
        elif epochs is not None and steps_per_epoch is not None:
            if not isinstance(epochs, int) or epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
                raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
            self.total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
        # The phase table: torch keeps it in the state_dict, and the generated get_lr reads its ends.
        up = {"start_lr": "initial_lr", "end_lr": "max_lr", "start_momentum": "max_momentum",
              "end_momentum": "base_momentum"}
        if three_phase:
            self._schedule_phases = [
                {"end_step": float(pct_start * self.total_steps) - 1, **up},
                {"end_step": float(2 * pct_start * self.total_steps) - 2, "start_lr": "max_lr",
                 "end_lr": "initial_lr", "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
                {"end_step": self.total_steps - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
                 "start_momentum": "max_momentum", "end_momentum": "max_momentum"},
            ]
        else:
            self._schedule_phases = [
                {"end_step": float(pct_start * self.total_steps) - 1, **up},
                {"end_step": self.total_steps - 1, "start_lr": "max_lr", "end_lr": "min_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
            ]
        if pct_start < 0 or pct_start > 1 or not isinstance(pct_start, float):
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ["cos", "linear"]:
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        self._anneal_func_type = anneal_strategy
        max_lrs = _format_param("max_lr", self.optimizer, max_lr)
        if last_epoch == -1:
            for i, group in enumerate(self._groups()):
                group["initial_lr"] = max_lrs[i] / div_factor
                group["max_lr"] = max_lrs[i]
                group["min_lr"] = group["initial_lr"] / final_div_factor
        self.cycle_momentum = cycle_momentum
        _check_cycle_momentum(self, cycle_momentum)
        if self.cycle_momentum:
            self.use_beta1 = _check_momentum_support(optimizer)
            max_momentums = _format_param("max_momentum", optimizer, max_momentum)
            base_momentums = _format_param("base_momentum", optimizer, base_momentum)
            if last_epoch == -1:
                _start_momentum(self, optimizer, base_momentums, max_momentums)
        super().__init__(optimizer, last_epoch)


class WarmRestartsBase(HyperparameterScheduler):
    """What CosineAnnealingWarmRestarts needs besides its formula: the restart bookkeeping.

    The position in the current cycle (``T_cur``) and the cycle length (``T_i``) are *state*:
    ``step()`` adds 1 to ``T_cur`` even after a fractional ``step(epoch)``, so the lr is not a
    function of ``last_epoch`` and the generated ``get_lr`` reads ``T_cur`` / ``T_i`` instead.
    ``step(epoch)`` sets them from their closed form.
    """

    T_0: int
    T_mult: int
    T_cur: float
    T_i: float

    def step(self, epoch: float | None = None) -> None:
        """Steps by one (restarting when a cycle ends), or jumps to a possibly fractional ``epoch``."""
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            if epoch < 0:
                raise ValueError(f"Expected non-negative epoch, but got {epoch}")
            if epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    # the restart index n solves T_0 (T_mult^n - 1) / (T_mult - 1) <= epoch
                    n = int(math.log((epoch / self.T_0 * (self.T_mult - 1) + 1), self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult**n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** (n)
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
        self.last_epoch = math.floor(epoch)
        with _enable_get_lr_call(self):
            groups = self._groups()
            for group, lr in zip(groups, self.get_lr(), strict=True):
                _update_param_group_val(group, "lr", lr)
        self._last_lr = _group_values(groups)
