"""The contract between a generated kernel module and the runtime.

Every generated kernel module (generated/<spec>_<backend>.py) ends with one record,
``KERNEL = KernelModule(...)``, and the runtime reads nothing else from it: which function steps
the optimizer, which flags it takes, how it takes its tensors and hyperparameters.  A backend that
prints a new kind of kernel module fills in the same record; nothing is found by ``getattr``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KernelModule:
    #: ``step(**lists, **hyperparameters, **flags)``: one step of the optimizer over the kernel
    #: lists (``params``, ``grads``, one list per state and counter, by the names the spec gives
    #: them), the hyperparameters by keyword, and every flag in ``flags`` as a bool keyword
    step: Callable[..., None]
    #: the flag hyperparameters ``step`` takes (``amsgrad``, ``maximize``, …), in the spec's order
    flags: tuple[str, ...]
    #: True: ``step`` takes the lists of one (device, dtype) group at once (the runtime splits a
    #: param group); False: any param group as it is
    multi_tensor: bool
    #: hyperparameters ``step`` takes as given — a 1-element Tensor stays one (read on the device,
    #: or kept in autograd's graph); every other one is passed as a Python number
    tensor_scalars: frozenset[str] = frozenset()
    #: True: ``step`` also takes GradScaler's ``grad_scale`` and ``found_inf`` (None when not
    #: scaling) and applies them itself; False: the runtime unscales, or skips the step, first
    grad_scaler: bool = False
    #: True: ``step`` reads the counters (``step``) on the parameters' device, as torch's fused
    #: kernels keep them; the runtime moves counters made elsewhere there once
    counters_on_device: bool = False
    #: why the kernels cannot run on parameters of a dtype on this machine (a native library that
    #: does not build or load), None when they can; None: always runnable
    unusable: Callable[[Any], str | None] | None = None
    #: ``bind(**lists, **hyperparameters, **flags)``: the launch of ``step`` over these lists with
    #: its checks done once, to run again while they stay the same (Note [Cached steps] in
    #: runtime/step_cache.py), or None where they cannot be bound; None: no such fast path
    bind: Callable[..., Any] | None = None

    def run(self, group: dict, lists: dict, hyperparameters: dict, **extra) -> None:
        """One step over ``lists`` with the flags of param group ``group``."""
        self.step(**lists, **hyperparameters, **extra, **{f: bool(group[f]) for f in self.flags})
