"""Flag specialisation: fix every flag to a value, drop the statements that can no longer run."""
from __future__ import annotations

import dataclasses
import itertools

import sympy

from optgen.ir.functions import symbol
from optgen.ir.guards import simplify_guard
from optgen.ir.nodes import Program, Role


def flag_combinations(program: Program) -> list[tuple[tuple[str, bool], ...]]:
    """Every variant to generate; a fixed flag (AdamW's decoupling) has only its one value."""
    choices = []
    for h in program.spec.hyperparameters.values():
        if h.is_flag:
            values = (h.default,) if h.fixed else (False, True)
            choices.append([(h.name, v) for v in values])
    return [tuple(c) for c in itertools.product(*choices)]


def specialize(program: Program, flags: tuple[tuple[str, bool], ...]) -> Program:
    values = {symbol(name): sympy.true if v else sympy.false for name, v in flags}
    body = []
    for a in program.body:
        guard = simplify_guard(a.guard.subs(values))
        if guard == sympy.false:
            continue
        body.append(dataclasses.replace(a, guard=guard))
    state_when = {name: simplify_guard(w.subs(values))
                  for name, w in program.state_when.items()}
    roles = {name: role for name, role in program.roles.items() if role is not Role.FLAG}
    return program.with_body(body, flags=tuple(flags), state_when=state_when, roles=roles)
