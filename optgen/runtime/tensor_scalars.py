"""What differentiable kernels call where a scalar may be a number or a 0-dim tensor.

In a ``differentiable=True`` step a scalar such as ``sqrt(bias_correction2)`` or the ``-step_size``
of ``param.addcdiv(...)`` may be computed from a Tensor ``lr`` or from a counter kept as a tensor
(Note [differentiable=True] in optgen/backends/differentiable.py).  ``math.sqrt`` would turn it
into a number and cut the gradient, and torch's ``alpha=``/``value=`` take numbers only.  A
number, or a tensor autograd does not track, takes the plain kernel's path — ``math``, the fused
torch op — so a differentiable step computes the plain step's bits; a tensor that requires grad
takes the same arithmetic as separate, recorded ops.
"""
from __future__ import annotations

import math

import torch


def sqrt(x):
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def exp(x):
    return x.exp() if isinstance(x, torch.Tensor) else math.exp(x)


def log(x):
    return x.log() if isinstance(x, torch.Tensor) else math.log(x)


def _recorded(value) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def _number(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def add(x: torch.Tensor, y: torch.Tensor, alpha) -> torch.Tensor:
    """``x.add(y, alpha=alpha)``."""
    return x.add(y.mul(alpha)) if _recorded(alpha) else x.add(y, alpha=_number(alpha))


def addcmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value) -> torch.Tensor:
    """``x.addcmul(a, b, value=value)``."""
    return x.add(a.mul(b).mul(value)) if _recorded(value) else x.addcmul(a, b, value=_number(value))


def addcdiv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value) -> torch.Tensor:
    """``x.addcdiv(a, b, value=value)``."""
    return x.add(a.div(b).mul(value)) if _recorded(value) else x.addcdiv(a, b, value=_number(value))
