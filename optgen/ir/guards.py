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


@functools.lru_cache(maxsize=None)
def implies(a: sympy.Basic, b: sympy.Basic) -> bool:
    atoms: dict = {}
    return not satisfiable(sympy.And(_as_propositional(a, atoms), sympy.Not(_as_propositional(b, atoms))))


@functools.lru_cache(maxsize=None)
def simplify_guard(guard: sympy.Basic) -> sympy.Basic:
    """The smallest equivalent guard, relations kept as written."""
    if not guard.free_symbols:
        return guard
    atoms: dict = {}
    simplified = sympy.simplify_logic(_as_propositional(guard, atoms))
    return simplified.xreplace({atom: relation for relation, atom in atoms.items()})
