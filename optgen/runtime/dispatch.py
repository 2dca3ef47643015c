"""Choosing an implementation for a param group, the way torch does and with torch's errors.

Like ``torch.optim``, ``foreach=None`` and ``fused=None`` mean "pick the fastest that applies":

- CPU: the for-loop.  torch makes the same choice; measured here (BENCHMARKS.md) torch's own
  foreach is 1.3–2× *slower* than its for-loop on CPU, because each ``_foreach_*`` op streams
  every tensor through the cache once.
- CUDA and other foreach-capable devices: foreach.

``foreach=True`` / ``fused=True`` force one.  ``optimizer.implementation = "forloop"`` (or any
name in the class's ``implementations``) overrides the choice for every group; tests and
``optgen bench`` use it to reach each backend by name.
"""
from __future__ import annotations

import torch

#: device types where torch's foreach kernels are real multi-tensor kernels
FOREACH_DEVICES = {"cuda", "xpu", "hpu", "mtia"}


def choose(optimizer, group: dict, params: list[torch.Tensor]) -> str:
    forced = getattr(optimizer, "implementation", None)
    if forced is not None:
        if forced not in optimizer.implementations:
            raise ValueError(f"unknown implementation {forced!r} for {type(optimizer).__name__}; "
                             f"available: {', '.join(optimizer.implementations)}")
        return forced
    if group.get("fused"):
        raise RuntimeError(f"optgen.{type(optimizer).__name__} has no fused implementation for these "
                           "parameters yet; use foreach=True, or fused=None to pick automatically")
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is None and not group.get("differentiable") and params \
            and all(p.device.type in FOREACH_DEVICES for p in params):
        return "foreach"
    return "forloop"


def check_options(optimizer, defaults: dict) -> None:
    """torch's constructor errors for the runtime options (raised after the param groups exist)."""
    if defaults.get("fused"):
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
