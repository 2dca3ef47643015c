"""Reasoning about guards (boolean conditions over flags and hyperparameter relations).

Relations such as ``Ne(weight_decay, 0)`` are treated as opaque propositions: optgen never needs
to know what ``weight_decay != 0`` means, only that the same relation (or its negation) appears
twice. Giving sympy the relations themselves makes ``simplify_logic`` try to prove them equal
numerically, which cost most of a build's time.
"""
from __future__ import annotations

import functools

import sympy
from sympy.logic.inference import satisfiable


def _as_propositional(expr: sympy.Basic, atoms: dict) -> sympy.Basic:
    """Relations become boolean atoms so SAT and logic minimisation can reason about them."""
    if isinstance(expr, sympy.core.relational.Relational):
        # sympy rewrites Not(eps > 1) as eps <= 1: one atom for a relation and its negation.
        key, negated = expr.canonical, expr.negated.canonical
        if negated in atoms:
            return sympy.Not(atoms[negated])
        return atoms.setdefault(key, sympy.Dummy(f"rel{len(atoms)}"))
    if expr.args and isinstance(expr, sympy.logic.boolalg.Boolean):
        return expr.func(*(_as_propositional(a, atoms) for a in expr.args))
    return expr


@functools.cache
def implies(a: sympy.Basic, b: sympy.Basic) -> bool:
    atoms: dict = {}
    return not satisfiable(sympy.And(_as_propositional(a, atoms), sympy.Not(_as_propositional(b, atoms))))


@functools.cache
def simplify_guard(guard: sympy.Basic) -> sympy.Basic:
    """The smallest equivalent guard, relations kept as written."""
    if not guard.free_symbols:
        return guard
    atoms: dict = {}
    simplified = sympy.simplify_logic(_as_propositional(guard, atoms))
    return simplified.xreplace({atom: relation for relation, atom in atoms.items()})


# Note [Guards evaluate in the order they were written]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Lowering flattens nested ``if`` blocks into one guard, ``And(outer, inner)``, and sympy sorts
# the arguments of And/Or: ``if step > 2: c = beta1; if c > 0.5: ...`` became
# ``(c > 0.5) & (step > 2)``, and code that evaluates it left to right reads ``c`` where the
# outer condition is false and ``c`` was never assigned (KeyError in the interpreter, NameError in
# the Python kernels).  Every evaluator of a guard (the interpreter, each backend's printer)
# therefore takes And/Or arguments in the order of `evaluation_order`: by the position of the
# latest-assigned local each one reads.  A condition nested in an ``if`` reads locals assigned
# before it; those its outer conditions read were assigned before the outer ``if``, so earlier,
# and the outer condition comes first; with short-circuit evaluation (``and``/``or``, ``&&``)
# the inner one is then read only where its names exist.  Only locals count: a parameter, state,
# counter or hyperparameter always has a value.  Arguments that read no local keep sympy's
# order, so guards without locals print as before.

def evaluation_order(args, defined_at: dict[str, int]) -> list:
    """``args`` of an And/Or in the order to evaluate them (Note [Guards evaluate in the order
    they were written]); ``defined_at`` maps each local to the position of its first assignment."""
    def position(arg) -> int:
        return max((defined_at.get(s.name, -1) for s in getattr(arg, "free_symbols", ())), default=-1)
    return sorted(args, key=position)


def first_assignments(targets) -> dict[str, int]:
    """Each name of ``targets`` (in program order) → the position of its first assignment."""
    defined_at: dict[str, int] = {}
    for i, name in enumerate(targets):
        defined_at.setdefault(name, i)
    return defined_at
