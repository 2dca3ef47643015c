"""Learning-rate schedulers: a drop-in for ``torch.optim.lr_scheduler`` (torch 2.13).

    import optgen
    opt = optgen.AdamW(model.parameters(), lr=3e-4)
    sched = optgen.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10_000)

The schedulers that are formulas of the step count are generated from specs/schedulers/*.toml
(generated/lr_scheduler.py: StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR,
CosineAnnealingLR, CyclicLR, OneCycleLR, CosineAnnealingWarmRestarts, and WarmupCosineLR,
WarmupStableDecayLR, InverseSqrtLR which torch lacks) on the bases in
optgen/runtime/lr_scheduler_base.py; the others are torch's classes (optgen/runtime/lr_scheduler.py:
LambdaLR, MultiplicativeLR, ChainedScheduler, SequentialLR, ReduceLROnPlateau — see Note [Which
schedulers are not generated] there).  Every one is a ``torch.optim.lr_scheduler.LRScheduler``
(Note [optgen's schedulers are torch's]): they drive torch.optim optimizers as well as optgen's,
trainers that check ``isinstance`` accept them, and their state_dicts load into torch's
schedulers and back.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from optgen import _generated
from optgen.runtime.lr_scheduler import ChainedScheduler, LambdaLR, MultiplicativeLR, ReduceLROnPlateau, SequentialLR
from optgen.runtime.lr_scheduler_base import LRScheduler  # torch's own

_generated.load()  # the generated package (in-tree or installed), then its scheduler module
_generated_schedulers = importlib.import_module(f"{_generated.NAME}.lr_scheduler")

#: every scheduler class generated from specs/schedulers/, by name (SWALR is in optgen.swa_utils)
GENERATED = {name: getattr(_generated_schedulers, name) for name in _generated_schedulers.__all__}
globals().update({name: cls for name, cls in GENERATED.items() if name != "SWALR"})

if TYPE_CHECKING:  # the generated schedulers above, as the type checker sees them
    def __getattr__(name: str) -> Any: ...

__all__ = ["LRScheduler", "LambdaLR", "MultiplicativeLR", "ChainedScheduler", "SequentialLR",
           "ReduceLROnPlateau", *(name for name in GENERATED if name != "SWALR")]
