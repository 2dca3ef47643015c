"""What a schedule spec says, validated and located: immutable records, no behaviour.

A schedule spec (specs/schedulers/*.toml, format in docs/schedule-format.md) describes one
learning-rate scheduler: its constructor (signature, defaults, checks) and its learning rate as
a closed-form formula lr(t) of the step count t.  :mod:`optgen.schedules.derive` turns the
formula into torch's two forms, :mod:`optgen.schedules.render` into a class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from optgen.errors import Location

#: the step count every formula is a function of, and the base learning rate of each group
T = sympy.Symbol("t", integer=True)
BASE_LR = sympy.Symbol("base_lr", real=True)
#: the group's current learning rate, in the chainable form (printed as group["lr"])
CURRENT_LR = sympy.Symbol("lr", real=True)

#: constructor arguments every scheduler may take, with torch's defaults
RUNTIME_OPTIONS: dict[str, Any] = {"last_epoch": -1}

#: a hyperparameter without a default (a required positional argument)
REQUIRED = object()


@dataclass(frozen=True)
class Hyperparameter:
    """A constructor argument."""

    name: str
    default: Any                 # the Python default (REQUIRED: none; None for `optional`)
    annotation: str              # printed in the signature
    attribute: str | None        # the scheduler attribute it is stored in (torch's name); None: not stored
    convert: str | None          # "Counter": stored as collections.Counter(value) (MultiStepLR's milestones)
    choices: tuple[str, ...]     # for a string: the values it may take (conditions compare against them)
    positive: bool               # an assumption the derivation may use (PolynomialLR's power)
    loc: Location

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class PerGroup:
    """A value that differs per param group: a list attribute of the scheduler or a group key."""

    name: str                    # the name formulas use
    kind: str                    # "list" (self.<where>[i]) | "group" (group["<where>"])
    where: str
    loc: Location


@dataclass(frozen=True)
class Attribute:
    """A scheduler attribute formulas read (set by a runtime base or by [state]), as Python text."""

    name: str
    python: str                  # e.g. "self._schedule_phases[0]['end_step']" (allow-listed, printed)
    call: int | None             # a method taking this many arguments (CyclicLR's scale_fn), else a value
    loc: Location


@dataclass(frozen=True)
class Check:
    """``if when and not (ok): raise kind(message)``, in the constructor or at each step."""

    ok: str                      # Python text (allow-listed)
    message: str                 # an f-string body
    kind: str
    when: str | None
    loc: Location


@dataclass(frozen=True)
class Function:
    """A helper of the formulas, e.g. OneCycleLR's ``anneal(start, end, pct)``; printed as a method."""

    name: str
    args: tuple[sympy.Symbol, ...]
    body: sympy.Expr
    loc: Location


@dataclass(frozen=True)
class Definition:
    """``name = formula`` in [schedule]: a named intermediate value, or lr / momentum itself."""

    name: str
    expr: sympy.Expr
    text: str                    # as written (comments in the generated code)
    loc: Location


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule spec file, parsed and checked for shape."""

    name: str
    path: str
    source: str                  # the file's text (its hash goes into the generated header)
    doc: str
    paper: str
    torch_name: str | None       # the torch class reproduced ("StepLR", "swa_utils.SWALR"), if any
    signature: tuple[str, ...]   # constructor arguments after `optimizer`
    hyperparameters: dict[str, Hyperparameter]
    checks: tuple[Check, ...]            # constructor validation
    step_checks: tuple[Check, ...]       # validation at every get_lr (OneCycleLR's step limit)
    base: str                    # the runtime base class (optgen.runtime.lr_scheduler_base)
    base_init: bool              # the base's constructor takes every argument (CyclicLR, OneCycleLR)
    chainable: bool              # get_lr is the derived recursion (else the closed form itself)
    closed_form: bool            # has _get_closed_form_lr (torch: the chainable ones but SWALR)
    initial_step: str            # "keep" | "recursive": the constructor's step when resuming
    epoch_zero: str              # "closed" | "recursive": get_lr at t = 0 outside the constructor
    counter: str                 # "last_epoch" | "step_count": what t is
    per_group: dict[str, PerGroup]
    attributes: dict[str, Attribute]
    state: dict[str, str]        # attribute → Python initialiser over constructor arguments
    functions: dict[str, Function]
    definitions: tuple[Definition, ...]  # named intermediate values, in order
    lr: Definition
    momentum: Definition | None
    choices: dict[str, tuple[str, str]] = field(default_factory=dict)  # boolean symbol → (name, value)
    assumptions: tuple = ()      # relations the checks guarantee (sympy relationals), for the derivation
