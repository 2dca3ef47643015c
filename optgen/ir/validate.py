"""Validity rules for an IR program, kept apart from lowering and from the passes.

- every name read is declared (hyperparameter, state, param, grad) or assigned before, on every
  path the read can take (guards are compared with sympy's SAT solver, optgen/ir/guards.py);
- a state declared with ``when = ...`` is only touched where that condition holds;
- every state is written by the rule (otherwise it is dead weight in every checkpoint);
- a ``first`` state (it does not exist before its first assignment) is read, and updated, only
  where an assignment before it has run on every path: before that there is no tensor to read
  (the for-loop would read None, the fused kernels uninitialised memory).  The assignment that
  creates it may read it (on the creating step it stores its ``first`` value instead);
- shapes (Note [Shapes] in optgen/passes/select_ops.py): ``norm_dim``/``mean_dim`` reduce a
  tensor, never a host scalar, and ``param`` and each tensor state keep their declared shape — a
  value with a dimension reduced is not stored into a full-size tensor (the kernels' ``copy_``
  would broadcast it, the reference rebind the name), nor a full-size value into a
  ``zeros_reduced`` state.
"""
from __future__ import annotations

import sympy

from optgen.errors import SpecError
from optgen.ir.functions import REDUCE_DIM, SCALAR_OF_TENSOR, NormDim
from optgen.ir.guards import implies
from optgen.ir.nodes import Program, Role, is_tensor_valued


def validate(program: Program) -> Program:
    defined: dict[str, list[sympy.Basic]] = {}  # local name → guards it was assigned under
    first = {s.name for s in program.spec.state.values() if s.init == "first"}
    for a in program.body:
        for name in sorted(a.reads() - {s.name for s in a.guard.free_symbols}):
            role = program.roles[name]
            if name in first and not (a.target == name and a.first is not None) \
                    and not implies(a.guard, sympy.Or(*defined.get(name, [sympy.false]))):
                raise SpecError(a.loc, f"state '{name}' is read here but it is created by its first "
                                       "assignment, which does not run before this line on every path; "
                                       "assign it first, or declare it with init = \"zeros_like(param)\"")
            if role is Role.TENSOR or role is Role.SCALAR:
                guards = defined.get(name, [])
                if not guards or not implies(a.guard, sympy.Or(*guards)):
                    raise SpecError(a.loc, f"'{name}' is read here but not assigned before it on every path "
                                           "that reaches this line")
            when = program.state_when.get(name)
            if when is not None and when != sympy.true and not implies(a.guard, when):
                raise SpecError(a.loc, f"state '{name}' only exists when {when}, but this line can run "
                                       f"without that; put it under 'if {when}:'")
        when = program.state_when.get(a.target)
        if when is not None and when != sympy.true and not implies(a.guard, when):
            raise SpecError(a.loc, f"state '{a.target}' only exists when {when}, but this line can run "
                                   f"without that; put it under 'if {when}:'")
        if a.target in first and a.first is None \
                and not implies(a.guard, sympy.Or(*defined.get(a.target, [sympy.false]))):
            raise SpecError(a.loc, f"state '{a.target}' is updated here but it is created by its first "
                                   "assignment (the first one in the rule), which does not run before this "
                                   "line on every path; create it on every path that reaches this line")
        if a.first is not None:
            _check_creating_reduction(program, a)
        defined.setdefault(a.target, []).append(a.guard)
    for state in program.spec.state.values():
        if state.name not in defined:
            raise SpecError(state.loc, f"state '{state.name}' is declared but never assigned by the update rule")
    _check_shapes(program)
    return program


def _check_creating_reduction(program: Program, a) -> None:
    """The statement that creates a ``first`` state may not reduce an expression that reads that
    state (``m = m + grad / (1 + norm(grad - m))``): the compound argument is computed before the
    statement (optgen/passes/name_reduction_arguments.py), where on the creating step the state
    does not exist yet, so the backends printed it unnamed and wrong (``grad - m.norm()``).  A
    plain name (``norm(m)``) is fine: it is read only on the steps after the first."""
    for e in sympy.preorder_traversal(a.value):
        if isinstance(e, SCALAR_OF_TENSOR):
            x = e.args[0]
            if not x.is_Symbol and a.target in {s.name for s in x.free_symbols} and is_tensor_valued(x, program.roles):
                fn = {"MachineEps": "machine_eps"}.get(type(e).__name__, type(e).__name__.lower())
                raise SpecError(a.loc, f"{fn}() of an expression that reads '{a.target}' cannot be in the statement "
                                       f"that creates '{a.target}' (its first value): on that step '{a.target}' "
                                       "does not exist yet — create it with a statement of its own before this one "
                                       f"(e.g. '{a.target} = {a.target}', which stores the first value and then keeps "
                                       "it), so that this one updates it on every step, or reduce a name "
                                       f"('{fn}({a.target})')")


def _describe(shape: frozenset) -> str:
    if not shape:
        return "the parameter's shape"
    return "the parameter's shape with dimension " + " and ".join(str(d) for d in sorted(shape)) + " of size 1"


def _check_shapes(program: Program) -> None:
    """Note [Shapes]: each tensor's shape as the set of dimensions reduced to size 1 (frozenset()
    is the parameter's shape, None a host scalar); see the module docstring for the rules."""
    declared: dict[str, frozenset[int]] = {"param": frozenset(), "grad": frozenset()}
    for s in program.spec.state.values():
        if program.roles.get(s.name) is Role.STATE:
            declared[s.name] = frozenset({s.reduced_dim}) if s.init == "zeros_reduced" else frozenset()
    shapes = dict(declared)

    def shape(expr: sympy.Basic, a) -> frozenset | None:
        if expr.is_Symbol:
            role = program.roles.get(expr.name)
            return shapes.get(expr.name, frozenset()) if role is not None and role.is_tensor else None
        if isinstance(expr, SCALAR_OF_TENSOR):
            return None
        if isinstance(expr, REDUCE_DIM):
            x, dim = expr.args
            inner = shape(x, a)
            if inner is None:
                name = "norm_dim" if isinstance(expr, NormDim) else "mean_dim"
                raise SpecError(a.loc, f"{name}() reduces a tensor over one dimension, but its argument here is "
                                       f"the host scalar '{x}' (after simplification: a tensor expression such "
                                       f"as grad - grad is the number 0) — reduce a tensor, or use the scalar "
                                       "itself")
            return inner | {int(dim)}
        parts = [p for p in (shape(e, a) for e in expr.args) if p is not None]
        # broadcasting: a dimension is of size 1 in the result where it is in every operand
        return frozenset.intersection(*parts) if parts else None

    for a in program.body:
        for value in (a.value, a.first):
            if value is None:
                continue
            got = shape(value, a)
            if a.target in declared and got is not None and got != declared[a.target]:
                fix = (f"declare it zeros_reduced(param, {min(got)})" if len(got) == 1 and not declared[a.target]
                       else "reduce the value to that shape with norm_dim/mean_dim")
                raise SpecError(a.loc, f"'{a.target}' has {_describe(declared[a.target])}, but this value has "
                                       f"{_describe(got)}, and a tensor keeps its shape — {fix}, or assign the "
                                       "value to a new local")
            if a.target not in declared and got is not None:
                shapes[a.target] = got
