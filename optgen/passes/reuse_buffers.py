"""Temporary-buffer reuse: ``x = x.f(...)`` on a tensor this step already owns becomes ``x.f_(...)``.

Within one statement :mod:`~optgen.passes.select_ops` already mutates the temporaries it creates.
Across statements this pass does the same: after ``grad = grad.neg()`` (maximize) the name
``grad`` holds a buffer of our own, so the weight-decay statement becomes
``grad.add_(param, alpha=weight_decay)`` instead of allocating a second copy — the same trick
torch's foreach Adam plays by hand.  Ownership is lost when a tensor is aliased (``grad =
momentum_buffer``) and is only kept past a guarded statement if it held before it, too.
"""
from __future__ import annotations

import sympy

from optgen.ir.ops import OpProgram, Step, TensorOp


def _reuse(ops: tuple[TensorOp, ...], owned: set[str]) -> tuple[tuple[TensorOp, ...], set[str]]:
    owned = set(owned)
    out = []
    for op in ops:
        if op.fn == "alias":
            owned.discard(op.out)
            owned.discard(op.self_)
        elif not op.in_place and op.out == op.self_ and op.self_ in owned and op.fn not in ("clone",):
            op = op.with_fn(op.fn + "_")
        elif not op.in_place:
            owned.add(op.out)
        out.append(op)
    return tuple(out), owned


def reuse_buffers(program: OpProgram) -> OpProgram:
    owned: set[str] = set()
    steps = []
    for step in program.steps:
        if step.kind != "tensor" or step.first_ops is not None:
            steps.append(step)
            continue
        ops, after = _reuse(step.ops, owned)
        owned = after if step.guard == sympy.true else owned & after
        if step.target not in after:
            owned.discard(step.target)
        steps.append(Step(step.kind, step.target, step.guard, step.text, step.loc, ops, step.expr,
                          step.first_ops, step.per_tensor))
    return OpProgram(program.name, program.flags, program.preamble, tuple(steps), program.tensors,
                     program.counters, program.scalars, program.lazy_states)
