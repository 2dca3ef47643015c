"""Validity rules for an IR program, kept apart from lowering and from the passes.

- every name read is declared (hyperparameter, state, param, grad) or assigned before, on every
  path the read can take (guards are compared with sympy's SAT solver, optgen/ir/guards.py);
- a state declared with ``when = ...`` is only touched where that condition holds;
- every state is written by the rule (otherwise it is dead weight in every checkpoint);
- a ``first`` state (it does not exist before its first assignment) is read, and updated, only
  where an assignment before it has run on every path: before that there is no tensor to read
  (the for-loop would read None, the fused kernels uninitialised memory).  The assignment that
  creates it may read it (on the creating step it stores its ``first`` value instead).
"""
from __future__ import annotations

import sympy

from optgen.errors import SpecError
from optgen.ir.guards import implies
from optgen.ir.nodes import Program, Role


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
        defined.setdefault(a.target, []).append(a.guard)
    for state in program.spec.state.values():
        if state.name not in defined:
            raise SpecError(state.loc, f"state '{state.name}' is declared but never assigned by the update rule")
    return program
