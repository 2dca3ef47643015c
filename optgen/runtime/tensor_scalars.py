"""What differentiable kernels call where a scalar may be a number or a 0-dim tensor.

In a ``differentiable=True`` step a scalar such as ``sqrt(bias_correction2)`` or the ``-step_size``
of ``param.addcdiv(...)`` may be computed from a Tensor ``lr`` or from a counter kept as a tensor
(Note [differentiable=True] in optgen/backends/differentiable.py).  ``math.sqrt`` would turn it
into a number and cut the gradient, and torch's ``alpha=``/``value=`` take numbers only.  A
number, or a tensor autograd does not track, takes the plain kernel's path — ``math``, the fused
torch op — so a differentiable step computes the plain step's bits; a tensor that requires grad
takes the same arithmetic as separate, recorded ops.

Note [Counters under torch.compile]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The for-loop and foreach kernels read a counter (``step``) with ``counter_value(step_t)``: eagerly
that is ``step_t.item()``, a Python number, so the step's scalar arithmetic (bias corrections) runs
in double precision on the host, bit for bit as torch's eager kernels compute it.  While
torch.compile traces the step, ``.item()`` is a host sync dynamo cannot trace (a graph break, or,
inside the kernel's loop over tensors, the whole kernel left to eager), so there it returns the
0-dim tensor itself, and the scalar arithmetic becomes traced tensor ops in the counter's dtype —
what torch's compiled step does (``torch.optim.optimizer._get_value``).  The kernels' scalar
functions (``sqrt``, ``exp``, ``log``) take either, and so do the foreach ops that take a list of
scalars as tensors (``_foreach_mul_(xs, [t0, t1])`` is the list-of-tensors overload); the two whose
per-tensor ``value`` list has no such overload while tracing (a stacked tensor is refused under
FakeTensor on the CPU, which is why torch's compiled step takes its ``capturable`` path) are
``foreach_addcmul_`` / ``foreach_addcdiv_`` here: the foreach op eagerly, one op per tensor while
tracing (the compiler fuses them again).  A norm read as a scalar (Lamb's trust ratio, Adafactor's
relative step) is ``norm(x)``: ``x.norm().item()`` eagerly, the 0-dim tensor while tracing.  A
branch on such a value is taken by ``torch.where`` while tracing (Note [Branches on traced scalars]
in optgen/backends/python_base.py).
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


def clamp(x: torch.Tensor, min=None, max=None) -> torch.Tensor:  # noqa: A002 (torch's keyword names)
    """``x.clamp(min=min, max=max)``; torch takes bounds all numbers or all tensors, so with a
    Tensor bound a number one becomes a 0-dim tensor (same values; gradients reach the Tensor)."""
    if not isinstance(min, torch.Tensor) and not isinstance(max, torch.Tensor):
        return x.clamp(min=min, max=max)

    def bound(b):
        return b if b is None or isinstance(b, torch.Tensor) else torch.tensor(b, dtype=x.dtype, device=x.device)
    return x.clamp(min=bound(min), max=bound(max))


def counter_value(counter: torch.Tensor):
    """A counter's value for the step's scalar arithmetic (Note [Counters under torch.compile])."""
    if torch.compiler.is_compiling():
        return counter
    return counter.item()


def norm(x: torch.Tensor):
    """``x``'s 2-norm for the step's scalar arithmetic: a number eagerly (``.item()``, as the kernels
    always read it), the 0-dim tensor while torch.compile traces the step, where ``.item()`` would
    break the graph (Note [Counters under torch.compile])."""
    if torch.compiler.is_compiling():
        return x.norm()
    return x.norm().item()


def foreach_addcmul_(xs: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], values: list) -> None:
    """``torch._foreach_addcmul_(xs, a, b, values)``, where ``values`` may hold 0-dim tensors."""
    if values and isinstance(values[0], torch.Tensor):
        for x, a_i, b_i, value in zip(xs, a, b, values, strict=True):
            x.addcmul_(a_i, b_i, value=value)
    else:
        torch._foreach_addcmul_(xs, a, b, values)


def foreach_addcdiv_(xs: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], values: list) -> None:
    """``torch._foreach_addcdiv_(xs, a, b, values)``, where ``values`` may hold 0-dim tensors."""
    if values and isinstance(values[0], torch.Tensor):
        for x, a_i, b_i, value in zip(xs, a, b, values, strict=True):
            x.addcdiv_(a_i, b_i, value=value)
    else:
        torch._foreach_addcdiv_(xs, a, b, values)
