"""Scalar hoisting: scalars that depend only on hyperparameters move out of the per-tensor loop.

A scalar assignment is *per-tensor* when it reads a counter (torch's per-parameter ``step``), a
tensor through a reduction (``norm(param)``, ``size(param, 0)``) or another per-tensor scalar; those stay in the loop (a list per group in the foreach backend).
Every other scalar is computed once per param group, before the loop, in the program preamble —
so ``1 - beta1`` costs one Python operation per step, not one per tensor.
"""
from __future__ import annotations

import sympy

from optgen.ir.nodes import Program, Role


def hoist_scalars(program: Program) -> Program:
    per_tensor: set[str] = set()
    preamble, body = [], []
    for a in program.body:
        role = program.roles[a.target]
        if role is not Role.SCALAR:
            body.append(a)
            continue
        reads = a.reads()
        # Per tensor: it reads a counter, a tensor (norm(param), size(param, 0)) or such a scalar.
        if any(program.roles[n] is Role.COUNTER or program.roles[n].is_tensor or n in per_tensor for n in reads):
            per_tensor.add(a.target)
            body.append(a)
        elif a.guard == sympy.true and not any(n == b.target for b in body for n in reads):
            preamble.append(a)
        else:
            body.append(a)
    return program.with_body(body, preamble=program.preamble + tuple(preamble),
                             per_tensor=frozenset(per_tensor))
