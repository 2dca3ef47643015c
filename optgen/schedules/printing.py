"""Printing schedule formulas as Python that reads like torch's schedulers.

Extends :class:`~optgen.backends.printing.PythonScalarPrinter` (spaces around operators, ``1 - x``
rather than ``-x + 1``) with what schedules need: ``math.cos``/``math.pi``, ``math.floor``, ``%``,
``min``/``max``, conditional expressions for ``where``, the spec's string comparisons
(``self._anneal_strategy == "cos"``), helper and method calls, and the milestone counts.
Unknown nodes fail loudly at build time.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import sympy
from sympy.printing.precedence import PRECEDENCE

from optgen.backends.printing import PythonScalarPrinter
from optgen.schedules.expressions import CountEQ, CountLE

_FLIPPED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_MATH = {sympy.cos: "math.cos", sympy.sin: "math.sin", sympy.floor: "math.floor", sympy.ceiling: "math.ceil",
         sympy.exp: "math.exp", sympy.log: "math.log"}


class SchedulePrinter(PythonScalarPrinter):
    """``rename`` maps a symbol name to the code that reads it; ``choices`` maps the boolean symbol of
    ``name == 'value'`` to (name, value); ``call`` maps a helper/method name to the callee's code."""

    def __init__(self, rename: Callable[[str], str], choices: dict[str, tuple[str, str]],
                 call: Callable[[str], str], counter: Callable[[str], str], first: frozenset = frozenset()):
        super().__init__(rename)
        self.first = first  # names a comparison prints on its left (the spec's definitions)
        self.choices = choices
        self.call = call
        self.counter = counter  # a Counter hyperparameter's attribute

    def paren(self, expr, level: int, strict: bool = False) -> str:
        if isinstance(expr, sympy.Piecewise):
            return f"({self.print(expr)})"
        return super().paren(expr, level, strict)

    def print(self, expr) -> str:
        expr = sympy.sympify(expr)
        if expr is sympy.pi:
            return "math.pi"
        if expr is sympy.E:
            return "math.e"
        if expr is sympy.true or expr is sympy.false:
            return "True" if expr is sympy.true else "False"
        if expr.is_Symbol and expr.name in self.choices:
            name, value = self.choices[expr.name]
            return f'{self.rename(name)} == "{value}"'
        if isinstance(expr, sympy.Not) and expr.args[0].is_Symbol and expr.args[0].name in self.choices:
            name, value = self.choices[expr.args[0].name]
            return f'{self.rename(name)} != "{value}"'
        if isinstance(expr, sympy.Piecewise):
            return self.conditional(expr)
        if isinstance(expr, sympy.Mod):
            a, b = expr.args
            return f"{self.paren(a, PRECEDENCE['Mul'])} % {self.paren(b, PRECEDENCE['Mul'], strict=True)}"
        if isinstance(expr, (sympy.Min, sympy.Max)):
            name = "min" if isinstance(expr, sympy.Min) else "max"
            return f"{name}({', '.join(self.print(a) for a in _ordered(expr.args))})"
        if expr.func in _MATH:
            return f"{_MATH[expr.func]}({', '.join(self.print(a) for a in expr.args)})"
        if isinstance(expr, CountLE):
            return f"bisect_right(sorted({self.counter(expr.args[0].name)}.elements()), {self.print(expr.args[1])})"
        if isinstance(expr, CountEQ):
            return f"{self.counter(expr.args[0].name)}[{self.print(expr.args[1])}]"
        if isinstance(expr, sympy.core.function.AppliedUndef):
            return f"{self.call(expr.func.__name__)}({', '.join(self.print(a) for a in expr.args)})"
        if isinstance(expr, sympy.core.relational.Relational):
            lhs, op, rhs = expr.lhs, expr.rel_op, expr.rhs
            if self.reads_first(rhs) and not self.reads_first(lhs):  # t <= end_up, not end_up >= t
                lhs, op, rhs = rhs, _FLIPPED[op], lhs
            return f"{self.print(lhs)} {op} {self.print(rhs)}"
        return super().print(expr)

    def reads_first(self, expr) -> bool:
        """Whether a comparison reads better with this side first: the step count or a local value."""
        return expr.has(sympy.Symbol("t", integer=True)) or (expr.is_Symbol and expr.name in self.first)

    def conditional(self, expr: sympy.Piecewise) -> str:
        """``a if c else b`` (nested for more cases); the last case must be unconditional."""
        *cases, (last, cond) = expr.args
        if cond is not sympy.true:
            raise NotImplementedError(f"a where() without a final unconditional case: {expr}")
        text = self.print(last)
        for value, c in reversed(cases):
            text = f"{self.print(value)} if {self.print(c)} else {text}"
        return text

    def condition(self, expr) -> str:
        return self.print(expr)


def _ordered(args):
    """min/max arguments in a stable, readable order: numbers first (``max(1, t)``)."""
    return sorted(args, key=lambda a: (not a.is_number, sympy.default_sort_key(a)))


def flatten(expr):
    """A where() nested in the last case of another is one more ``elif`` of it."""
    if not isinstance(expr, sympy.Piecewise):
        return expr
    cases = list(expr.args)
    while isinstance(cases[-1][0], sympy.Piecewise) and cases[-1][1] is sympy.true:
        cases = cases[:-1] + list(cases[-1][0].args)
    return sympy.Piecewise(*cases, evaluate=False)


class ExpressionPrinter(Protocol):
    def print(self, expr) -> str: ...


def statements(name: str, expr, printer: ExpressionPrinter) -> list[str]:
    """``name = expr`` as Python lines; a top-level where() becomes an if/elif/else block."""
    expr = flatten(expr)
    if isinstance(expr, sympy.Piecewise) and len(expr.args) > 1:
        lines = []
        for i, (value, cond) in enumerate(expr.args):
            if cond is sympy.true:
                lines.append("else:")
            else:
                lines.append(f"{'if' if i == 0 else 'elif'} {printer.print(cond)}:")
            lines.append(f"    {name} = {printer.print(value)}")
        return lines
    return [f"{name} = {printer.print(expr)}"]
