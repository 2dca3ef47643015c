"""Temporary-buffer reuse: never hold two buffers where torch's hand-written code holds one.

Four rules, each a place torch's foreach optimizers save memory by hand:

1. **In place on what we own.**  After ``grad = -grad`` (maximize) the name ``grad`` holds a
   buffer of our own, so the weight-decay statement becomes ``grad.add_(param, ...)`` instead of
   allocating a second copy.  Ownership is tracked as a *condition*: after
   ``if weight_decay != 0: grad = grad + weight_decay * param`` the buffer is ours exactly when
   ``weight_decay != 0``.  An out-of-place update of a name owned under some conditions only is
   split in two: in place under them, a copy otherwise (``grad`` is the user's ``.grad``, which an
   optimizer must never write).
2. **Aliases are not owned.**  ``grad = momentum_buffer`` binds without a copy; writing through
   either name would change the state, so neither is owned afterwards.
3. **Free temporaries after their last use.**  A ``release`` step (``del grads`` in foreach code)
   follows the last read of a temporary when more allocations come after it — torch's
   ``del device_grads`` in ``_multi_tensor_adam``.
4. **The last reader of a buffer of ours may work in it.**  In Adamax's
   ``maximum(beta2 * exp_inf, abs(grad) + eps)`` nothing reads ``grad`` afterwards, so when it is
   our copy (maximize, weight decay) ``abs`` runs in place on it — torch's
   ``torch._foreach_abs_(grouped_grads)`` — instead of allocating another buffer.  Uncertain
   ownership splits the statement as in rule 1.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Set as AbstractSet

import sympy

from optgen.ir.guards import implies, simplify_guard
from optgen.ir.ops import OpProgram, Step, TensorOp

MASKS = {"gt", "lt", "ge", "le", "eq", "ne"}  # ops whose result is a boolean mask
#: ops with no in-place form: masks, shape-changing reductions, intrinsics, binding and copying
NO_IN_PLACE = MASKS | {"norm", "mean", "where", "newton_schulz", "clone", "alias", "full_like"}


def _takeovers(step: Step, later: AbstractSet[str]) -> dict[int, str]:
    """Rule 4: op index → the name whose buffer that op may work in, as its last reader."""
    found = {}
    for i, op in enumerate(step.ops):
        if not op.in_place and op.out != op.self_ and op.out.startswith("_t") and op.fn not in NO_IN_PLACE \
                and op.in_place_ok and op.self_ not in later \
                and not any(op.self_ in op_reads(o) for o in step.ops[i + 1:]):
            found[i] = op.self_
    return found


def _conflicting(step: Step, owned: dict[str, sympy.Basic], later: AbstractSet[str] = frozenset()) -> str | None:
    """A name this step rewrites out of place whose ownership is uncertain under its guard."""
    takeovers = _takeovers(step, later)
    for i, op in enumerate(step.ops):
        if (not op.in_place and op.out == op.self_ or i in takeovers) and op.fn not in NO_IN_PLACE \
                and op.in_place_ok:
            cond = owned.get(op.self_, sympy.false)
            if cond != sympy.false and not implies(step.guard, cond) \
                    and not implies(step.guard, sympy.Not(cond)):
                return op.self_
    return None


def _rewrite(ops: tuple[TensorOp, ...], guard, owned: dict[str, sympy.Basic], takeovers: dict[int, str]):
    """The step's ops with in-place forms where the buffer is surely ours; the new ownership."""
    owned = dict(owned)
    out = []
    renamed: dict[str, str] = {}  # rule 4: a temporary now living in the buffer it was computed from
    for i, op in enumerate(ops):
        if renamed:
            op = _renamed(op, renamed)
        if i in takeovers and implies(guard, owned.get(op.self_, sympy.false)):
            renamed[op.out] = op.self_
            out.append(dataclasses.replace(op, out=op.self_, fn=op.fn + "_"))
            continue
        if op.fn == "alias":
            owned[op.out] = sympy.false
            owned[op.self_] = sympy.false
        elif not op.in_place and op.out == op.self_ and op.fn not in NO_IN_PLACE and op.in_place_ok \
                and implies(guard, owned.get(op.self_, sympy.false)):
            op = op.with_fn(op.fn + "_")
        elif not op.in_place:
            owned[op.out] = sympy.false if op.fn in MASKS else sympy.true
        out.append(op)
    return tuple(out), owned


def _renamed(op: TensorOp, names: dict[str, str]) -> TensorOp:
    def r(x):
        return names.get(x, x) if isinstance(x, str) else x

    return dataclasses.replace(op, out=r(op.out), self_=r(op.self_), args=tuple(r(a) for a in op.args))


def _merge(before: dict, after: dict, guard) -> dict:
    """Ownership after a step that ran only when ``guard`` held."""
    names = set(before) | set(after)
    merged = {}
    for n in names:
        b, a = before.get(n, sympy.false), after.get(n, sympy.false)
        merged[n] = a if guard == sympy.true else simplify_guard(
            sympy.Or(sympy.And(guard, a), sympy.And(sympy.Not(guard), b)))
    return merged


def _with(step: Step, **changes) -> Step:
    fields = dict(kind=step.kind, target=step.target, guard=step.guard, text=step.text, loc=step.loc,
                  ops=step.ops, expr=step.expr, first_ops=step.first_ops, per_tensor=step.per_tensor)
    fields.update(changes)
    return Step(**fields)


def _reuse(steps: tuple[Step, ...]) -> list[Step]:
    owned: dict[str, sympy.Basic] = {}
    out: list[Step] = []
    # every step with the names the steps after it read (rule 4)
    pending = [(step, set().union(*(step_reads(s) for s in steps[i + 1:]))) for i, step in enumerate(steps)]
    while pending:
        step, later = pending.pop(0)
        if step.kind != "tensor" or step.first_ops is not None:
            out.append(step)
            continue
        name = _conflicting(step, owned, later)
        if name is not None:  # split on whether the buffer is ours (rules 1 and 4)
            cond = owned[name]
            pending[:0] = [(_with(step, guard=sympy.And(step.guard, cond)), later),
                           (_with(step, guard=sympy.And(step.guard, sympy.Not(cond))), later)]
            continue
        ops, after = _rewrite(step.ops, step.guard, owned, _takeovers(step, later))
        owned = _merge(owned, after, step.guard)
        out.append(_with(step, ops=ops))
    return out


def op_reads(op: TensorOp) -> set[str]:
    """The names an op reads: its tensor operands, and those its scalar arguments read —
    ``numel(grad)``, ``norm(grad)`` in ``maximum(param, numel(grad))`` read ``grad`` too."""
    scalars = [a for a in op.args if not isinstance(a, str)] + [v for _, v in op.kwargs]
    return op.reads() | {s.name for e in scalars for s in getattr(e, "free_symbols", ())}


def step_reads(step: Step) -> set[str]:
    """The names a step reads: its ops' (op_reads), its scalar expression's and its guard's."""
    names = {name for op in (*step.ops, *(step.first_ops or ())) for name in op_reads(op)}
    if step.expr is not None:
        names |= {s.name for s in step.expr.free_symbols}
    return names | {s.name for s in step.guard.free_symbols}


def allocates(step: Step) -> bool:
    """Whether a step creates a tensor (an op that is neither in place nor an alias)."""
    return any(not op.in_place and op.fn != "alias" for op in step.ops)


def _releases(steps: list[Step], may_own: set[str]) -> list[Step]:
    """``release`` steps after the last read of each temporary that later allocations outlive."""
    last_read = {}
    for i, step in enumerate(steps):
        for name in step_reads(step) & may_own:
            last_read[name] = i
    out: list[Step] = []
    for i, step in enumerate(steps):
        out.append(step)
        for name, last in sorted(last_read.items()):
            if last == i and any(allocates(s) for s in steps[i + 1:]):
                out.append(Step("release", name, sympy.true, f"{name} is not needed any more", step.loc))
    return out


def reuse_buffers(program: OpProgram) -> OpProgram:
    steps = _reuse(program.steps)
    # Temporaries a release may free: grad (a copy, when we made one) and locals bound on every path.
    assigned_unguarded = {s.target for s in steps if s.kind == "tensor" and s.guard == sympy.true}
    may_own = {op.out for s in steps for op in s.ops if not op.in_place and op.fn != "alias"}
    may_own &= assigned_unguarded | {"grad"}
    may_own -= set(program.tensors) - {"grad"}
    steps = _releases(steps, may_own)
    return dataclasses.replace(program, steps=tuple(steps))
