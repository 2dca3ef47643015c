"""Scalar hoisting: scalars that depend only on hyperparameters move out of the per-tensor loop.

A scalar assignment is *per-tensor* when it reads a counter (torch's per-parameter ``step``), a
tensor through a reduction (``norm(param)``, ``size(param, 0)``) or another per-tensor scalar;
those stay in the loop (a list per group in the foreach backend).
Every other scalar is computed once per param group, before the loop, in the program preamble —
so ``1 - beta1`` costs one Python operation per step, not one per tensor.
"""
from __future__ import annotations

import sympy

from optgen.ir.nodes import Program, Role


def hoist_scalars(program: Program) -> Program:
    per_tensor = _per_tensor_scalars(program)
    preamble, body = [], []
    for a in program.body:
        role = program.roles[a.target]
        if role is not Role.SCALAR or a.target in per_tensor:
            body.append(a)
        elif a.guard == sympy.true and not any(n == b.target for b in body for n in a.reads()):
            preamble.append(a)
        else:
            body.append(a)
    return program.with_body(body, preamble=program.preamble + tuple(preamble),
                             per_tensor=frozenset(per_tensor))


def _per_tensor_scalars(program: Program) -> set[str]:
    """The scalar locals that differ per tensor: one assignment of which reads a counter, a tensor
    (norm(param), size(param, 0)) or such a scalar, in its value or its guard.  A property of the
    name, not of one assignment: ``n = 1.0`` then ``if step > 1: n = 1 + norm(u)`` is one list in
    the foreach kernel from its first assignment on (it printed one number ``n`` for the group and
    assigned it tensor by tensor, every tensor reading the last one's)."""
    per_tensor: set[str] = set()
    changed = True
    while changed:  # a later assignment may make an earlier-read name per tensor
        changed = False
        for a in program.body:
            if program.roles[a.target] is Role.SCALAR and a.target not in per_tensor and any(
                    program.roles[n] is Role.COUNTER or program.roles[n].is_tensor or n in per_tensor
                    for n in a.reads()):
                per_tensor.add(a.target)
                changed = True
    return per_tensor
