"""Printing sympy scalars as Python source that reads like hand-written code.

``sympy``'s own printers produce ``-lr*weight_decay + 1``; optimizers are read by people, so this
printer writes ``1 - lr * weight_decay``: spaces around binary operators, constants first in a sum
when that lets the rest be subtracted, and divisions kept as divisions.  Unknown nodes fail loudly
at build time rather than producing wrong code.
"""
from __future__ import annotations

from collections.abc import Callable

import sympy
from sympy.printing.precedence import PRECEDENCE, precedence

from optgen.ir.functions import (
    REDUCE_DIM,
    SCALAR_OF_TENSOR,
    Clamp,
    IfNone,
    Lerp,
    MachineEps,
    Maximum,
    Minimum,
    Ndim,
    Norm,
    NormDim,
    Numel,
    Size,
    Where,
)
from optgen.ir.guards import evaluation_order

_FUNCTIONS = {sympy.exp: "math.exp", sympy.log: "math.log", sympy.Abs: "abs"}


class PythonScalarPrinter:
    """Scalar expressions on the host, as Python.  ``rename`` maps a symbol to the code that reads it."""

    def __init__(self, rename: Callable[[str], str] = lambda name: name, defined_at: dict[str, int] | None = None):
        self.rename = rename
        # locals → where first assigned: and/or operands in evaluation order (Note [Guards
        # evaluate in the order they were written] in optgen/ir/guards.py)
        self.defined_at = defined_at or {}

    def __call__(self, expr: sympy.Expr) -> str:
        return self.print(sympy.sympify(expr))

    def paren(self, expr, level: int, strict: bool = False) -> str:
        text = self.print(expr)
        p = precedence(expr)
        if p < level or (strict and p == level) or (text.startswith("-") and level > PRECEDENCE["Add"]):
            return f"({text})"
        return text

    def print(self, expr: sympy.Expr) -> str:
        if expr.is_Symbol:
            return self.rename(expr.name)
        if expr in (sympy.true, sympy.false):
            return str(bool(expr))
        if expr.is_Integer:
            return str(int(expr))
        if expr.is_Rational:
            return f"{float(expr)!r}"
        if expr.is_Float:
            return repr(float(expr))
        if isinstance(expr, sympy.Add):
            return self.print_add(expr)
        if isinstance(expr, sympy.Mul):
            return self.print_mul(expr)
        if expr.is_Pow:
            if expr.exp == sympy.S.Half:
                return f"math.sqrt({self.print(expr.base)})"
            if expr.exp == -1:
                return f"1 / {self.paren(expr.base, PRECEDENCE['Mul'], strict=True)}"
            if expr.exp == -sympy.S.Half:
                return f"1 / math.sqrt({self.print(expr.base)})"
            base = self.paren(expr.base, PRECEDENCE['Pow'], strict=True)
            return f"{base} ** {self.paren(expr.exp, PRECEDENCE['Pow'])}"
        if isinstance(expr, SCALAR_OF_TENSOR) or isinstance(expr, IfNone):
            return self.print_reduction(expr)
        if isinstance(expr, REDUCE_DIM):  # a tensor: only as the argument of a reduction (norm(norm_dim(x, -1)))
            fn = "norm" if isinstance(expr, NormDim) else "mean"
            return f"{self.paren(expr.args[0], PRECEDENCE['Atom'])}.{fn}(dim={int(expr.args[1])}, keepdim=True)"
        if isinstance(expr, (Maximum, Minimum)):
            fn = "max" if isinstance(expr, Maximum) else "min"
            return f"{fn}({self.print(expr.args[0])}, {self.print(expr.args[1])})"
        if isinstance(expr, Where):
            cond, a, b = expr.args
            return f"({self.print(a)} if {self.print(cond)} else {self.print(b)})"
        if isinstance(expr, Clamp):
            x, low, high = expr.args
            text = self.print(x)
            if low != -sympy.oo:
                text = f"max({text}, {self.print(low)})"
            if high != sympy.oo:
                text = f"min({text}, {self.print(high)})"
            return text
        if expr.func in _FUNCTIONS:
            return f"{_FUNCTIONS[expr.func]}({self.print(expr.args[0])})"
        if isinstance(expr, sympy.sign):
            # -1.0, 0.0 or 1.0 as the interpreter computes it; a float() of each comparison, so a
            # 0-dim tensor (a Tensor lr in the differentiable kernel) works as a number does.
            x = self.paren(expr.args[0], PRECEDENCE["Relational"], strict=True)
            return f"(float({x} > 0) - float({x} < 0))"
        if isinstance(expr, Lerp):
            a, b, w = expr.args
            return (f"({self.paren(a, PRECEDENCE['Add'])} + {self.paren(w, PRECEDENCE['Mul'])} * "
                    f"({self.print(b)} - {self.paren(a, PRECEDENCE['Add'], strict=True)}))")
        if isinstance(expr, sympy.core.relational.Relational):
            lhs, rhs = expr.lhs, expr.rhs
            if lhs.is_Symbol and lhs.name.startswith('"'):  # adjust_lr_fn == "original", not the reverse
                lhs, rhs = rhs, lhs
            return f"{self.print(lhs)} {expr.rel_op} {self.print(rhs)}"
        if isinstance(expr, (sympy.And, sympy.Or)):
            operands = evaluation_order(expr.args, self.defined_at)
            return (" and " if isinstance(expr, sympy.And) else " or ").join(map(self.paren_bool, operands))
        if isinstance(expr, sympy.Not):
            return f"not {self.paren_bool(expr.args[0])}"
        raise NotImplementedError(f"no Python form for {type(expr).__name__}: {expr}")

    def print_reduction(self, expr) -> str:
        x = self.print(expr.args[0])
        if isinstance(expr, Norm):
            return f"{x}.norm().item()"
        if isinstance(expr, Numel):
            return f"{x}.numel()"
        if isinstance(expr, Ndim):
            return f"{x}.dim()"
        if isinstance(expr, Size):
            return f"{x}.size({int(expr.args[1])})"
        if isinstance(expr, MachineEps):
            return f"torch.finfo({x}.dtype).eps"
        fallback = self.print(expr.args[1])
        return f"({x} if {x} is not None else {fallback})"

    def paren_bool(self, expr) -> str:
        text = self.print(expr)
        return f"({text})" if isinstance(expr, (sympy.And, sympy.Or)) else text

    def print_add(self, expr: sympy.Add) -> str:
        terms = list(expr.args)
        # A leading positive term reads better than a leading minus: 1 - x rather than -x + 1.
        terms.sort(key=is_negative)
        return join_sum(self.paren, terms)

    def print_mul(self, expr: sympy.Mul) -> str:
        if is_negative(expr):
            return f"-{self.paren(-expr, PRECEDENCE['Mul'])}"
        num, den = split_fraction(expr)
        text = " * ".join(self.paren(f, PRECEDENCE["Mul"]) for f in num) if num else "1"
        if len(den) == 1:
            text += f" / {self.paren(den[0], PRECEDENCE['Mul'], strict=True)}"
        elif den:  # x / (a * b): one division, as people (and torch) write it
            text += f" / ({' * '.join(self.paren(d, PRECEDENCE['Mul']) for d in den)})"
        return text


class TensorScalarPrinter(PythonScalarPrinter):
    """Host scalars of a kernel, which may be 0-dim tensors: ``sqrt``/``exp``/``log`` are the
    functions of optgen.runtime.tensor_scalars (``math``'s for a number, the tensor method for a
    tensor).  A counter read while torch.compile traces the step is its 0-dim tensor (Note [Counters
    under torch.compile] in optgen/runtime/tensor_scalars.py), and so is a differentiable step's
    Tensor ``lr``; ``math.sqrt`` of either would be a host sync (a graph break) or cut the gradient."""

    FUNCTIONS = {sympy.exp: "exp", sympy.log: "log", sympy.Abs: "abs"}

    def print(self, expr):
        if expr.is_Pow and expr.exp in (sympy.S.Half, -sympy.S.Half):
            text = f"sqrt({self.print(expr.base)})"
            return text if expr.exp > 0 else f"1 / {text}"
        if expr.func in self.FUNCTIONS:
            return f"{self.FUNCTIONS[expr.func]}({self.print(expr.args[0])})"
        return super().print(expr)

    def print_reduction(self, expr) -> str:
        if isinstance(expr, Norm):  # tensor_scalars.norm: .item() eagerly, the 0-dim tensor traced
            return f"norm({self.print(expr.args[0])})"
        return super().print_reduction(expr)


class TracedScalarPrinter(TensorScalarPrinter):
    """Host scalars as torch.compile traces them, where a counter or a norm is a 0-dim tensor (Note
    [Branches on traced scalars] in optgen/backends/python_base.py): a choice between values is
    ``torch.where``, and conditions combine with ``&``/``|``/``~``, since Python's ``if``/``and``/
    ``not`` would ask the tensor for its truth value (a data-dependent branch dynamo cannot trace)."""

    def print(self, expr):
        if isinstance(expr, Where):
            cond, a, b = (self.print(arg) for arg in expr.args)
            return f"torch.where({cond}, {a}, {b})"
        if isinstance(expr, (sympy.And, sympy.Or)):
            operands = evaluation_order(expr.args, self.defined_at)
            return (" & " if isinstance(expr, sympy.And) else " | ").join(f"({self.print(a)})" for a in operands)
        if isinstance(expr, sympy.Not):
            return f"~({self.print(expr.args[0])})"
        return super().print(expr)


def split_fraction(expr: sympy.Mul) -> tuple[list, list]:
    """A product's factors as written numerators and denominators: x ** -1, x ** -alpha (sympy's
    form of 1 / x ** alpha) and the denominator of a rational divide."""
    num, den = [], []
    for f in expr.as_ordered_factors():
        if f.is_Pow and (f.exp.is_negative and f.exp.is_Rational or is_negative(f.exp)):
            den.append(f.base if f.exp == -1 else f.base ** -f.exp)
        elif f.is_Rational and f.q != 1:
            if f.p != 1:
                num.append(sympy.Integer(f.p))
            den.append(sympy.Integer(f.q))
        else:
            num.append(f)
    return num, den


def is_negative(term: sympy.Expr) -> bool:
    """A term a sum prints as ``- x`` (sympy's sign, not of a whole sum)."""
    return term.could_extract_minus_sign() and not term.is_Add


def join_sum(paren: Callable[..., str], terms: list) -> str:
    """``terms`` of a sum, in this order, as infix text: ``a + b - c``.  ``paren(expr, level,
    strict=False)`` prints an operand (every printer's own, with its own parentheses)."""
    out = paren(terms[0], PRECEDENCE["Add"])
    for t in terms[1:]:
        if is_negative(t):
            out += f" - {paren(-t, PRECEDENCE['Add'], strict=True)}"
        else:
            out += f" + {paren(t, PRECEDENCE['Add'])}"
    return out
